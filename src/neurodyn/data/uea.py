"""Real multivariate series: a reader of the sktime/aeon ``.ts`` format, the UEA data sets that the ``aeon`` wheel
ships (``JapaneseVowels``, ``BasicMotions``), and observations dropped at random as in Kidger et al. (2020).

The ``.ts`` files are located inside the installed ``aeon`` package without importing it (its ``__init__`` is never
run, so none of its dependencies is needed): ``pip install --no-deps aeon==1.6.0`` is enough. Nothing is downloaded.

Format read by :func:`parse_ts`: ``#`` comment lines; header lines ``@problemName``, ``@timeStamps``, ``@missing``,
``@univariate``, ``@dimension``/``@dimensions``, ``@equalLength``, ``@seriesLength``, ``@classLabel`` (``true`` and
the class names, or ``false``), ``@targetLabel`` (``true``/``false``: one float target per case) and ``@data``; then one
case per line: the dimensions separated by ``:``, the values of a dimension by ``,``, the class label (or target) as
the last ``:`` field; ``?`` or ``NaN`` for a missing value; with ``@timeStamps true`` a dimension is a list of
``(time,value)`` pairs with numeric times.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError
from .batch import IrregularBatch

_BOOL = {"true": True, "false": False}
_PAIR = re.compile(r"\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)")
UEA_SETS = ("JapaneseVowels", "BasicMotions")
"""The UEA/UCR data sets the aeon wheel ships in its data folder that `load_uea` and `uea_path` know."""


@dataclass
class TSFile:
    """The content of one ``.ts`` file.

    Attributes
    ----------
    series : list of Tensor
        One ``(n_i, C)`` float64 tensor per case (NaN for a missing value; a dimension shorter than the case's
        longest is NaN after its end).
    times : list of Tensor or None
        One ``(n_i,)`` float64 tensor per case (``@timeStamps true``; the union of the dimensions' time stamps,
        sorted), else None.
    labels : list of str or None
        The class label of each case (``@classLabel true``), else None.
    targets : Tensor or None
        ``(N,)`` float64 regression targets (``@targetLabel true``), else None.
    class_names : tuple of str
        The classes declared by ``@classLabel`` (in the file's order).
    header : dict
        The header values (keys lower case: ``problemname``, ``dimensions``, ``equallength``, ...).
    """

    series: list[Tensor]
    times: list[Tensor] | None
    labels: list[str] | None
    targets: Tensor | None
    class_names: tuple[str, ...]
    header: dict[str, object] = field(default_factory=dict)


def _bool(src: str, lineno: int, key: str, words: list[str]) -> bool:
    if len(words) != 1 or words[0].lower() not in _BOOL:
        raise InputError(f"{src}, line {lineno}: @{key} takes true or false, got {' '.join(words)!r}.")
    return _BOOL[words[0].lower()]


def _int(src: str, lineno: int, key: str, words: list[str]) -> int:
    if len(words) != 1 or not words[0].isdigit() or int(words[0]) < 1:
        raise InputError(f"{src}, line {lineno}: @{key} takes one positive integer, got {' '.join(words)!r}.")
    return int(words[0])


def _float(src: str, lineno: int, text: str, what: str) -> float:
    text = text.strip()
    if text == "?":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{src}, line {lineno}: {what}: {text!r} is not a number (use '?' or NaN for a missing "
                         f"value).") from None


def _dimension(src: str, lineno: int, text: str, d: int, stamped: bool) -> tuple[list[float], list[float] | None]:
    """Values (and time stamps) of dimension ``d`` of a case."""
    text = text.strip()
    if not text:
        raise InputError(f"{src}, line {lineno}: dimension {d + 1} is empty (write '?' for a missing value).")
    if not stamped:
        return [_float(src, lineno, v, f"dimension {d + 1}") for v in text.split(",")], None
    pairs = _PAIR.findall(text)
    if not pairs or _PAIR.sub("", text).replace(",", "").strip():
        raise InputError(f"{src}, line {lineno}: dimension {d + 1} must be (time,value) pairs separated by ',' "
                         f"(@timeStamps true), got {text[:60]!r}.")
    ts = [_float(src, lineno, a, f"time stamp in dimension {d + 1}") for a, _ in pairs]
    if any(math.isnan(a) for a in ts):
        raise InputError(f"{src}, line {lineno}: dimension {d + 1} has a missing time stamp; every pair needs a time.")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise InputError(f"{src}, line {lineno}: the time stamps of dimension {d + 1} must be strictly increasing.")
    return [_float(src, lineno, v, f"dimension {d + 1}") for _, v in pairs], ts


def parse_ts(text: str, source: str = "<string>") -> TSFile:
    """Parse the text of a ``.ts`` file (format in the module docstring).

    Parameters
    ----------
    text : str
        The file's content.
    source : str
        The name used in error messages (a path).

    Returns
    -------
    TSFile
        Cases as ``(n_i, C)`` float64 tensors, labels / targets, the header.

    Raises :class:`~neurodyn.errors.InputError` naming ``source`` and the line for malformed input: an unknown or
    repeated header key, data before ``@data``, a case whose number of dimensions differs from ``@dimensions``
    (or from the first case), a value that is not a number, a label not declared by ``@classLabel``, lengths that
    contradict ``@equalLength`` / ``@seriesLength``, a file with no cases.

    Examples
    --------
    >>> f = parse_ts("@problemName toy\\n@univariate false\\n@dimensions 2\\n@classLabel true a b\\n@data\\n"
    ...              "1,2,3:4,?,6:b\\n")
    >>> f.series[0].tolist(), f.labels
    ([[1.0, 4.0], [2.0, nan], [3.0, 6.0]], ['b'])
    """
    header: dict[str, object] = {}
    series: list[Tensor] = []
    times: list[Tensor] = []
    raw_labels: list[str] = []
    in_data = False
    keys = {"problemname", "timestamps", "missing", "univariate", "dimension", "dimensions", "equallength",
            "serieslength", "classlabel", "targetlabel", "data"}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            if in_data:
                raise InputError(f"{source}, line {lineno}: header line {line.split()[0]!r} after @data.")
            words = line[1:].split()
            key, rest = words[0].lower(), words[1:]
            if key not in keys:
                raise InputError(f"{source}, line {lineno}: unknown header @{words[0]}; known: "
                                 f"{', '.join('@' + k for k in sorted(keys))}.")
            key = "dimensions" if key == "dimension" else key
            if key in header:
                raise InputError(f"{source}, line {lineno}: @{words[0]} given twice.")
            if key == "problemname":
                if not rest:
                    raise InputError(f"{source}, line {lineno}: @problemName needs a name.")
                header[key] = " ".join(rest)
            elif key in ("timestamps", "missing", "univariate", "equallength", "targetlabel"):
                header[key] = _bool(source, lineno, words[0], rest)
            elif key in ("dimensions", "serieslength"):
                header[key] = _int(source, lineno, words[0], rest)
            elif key == "classlabel":
                if not rest or rest[0].lower() not in _BOOL:
                    raise InputError(f"{source}, line {lineno}: @classLabel takes true followed by the class names, "
                                     f"or false.")
                if _BOOL[rest[0].lower()] and len(rest) < 2:
                    raise InputError(f"{source}, line {lineno}: @classLabel true needs the class names after it.")
                if not _BOOL[rest[0].lower()] and len(rest) > 1:
                    raise InputError(f"{source}, line {lineno}: @classLabel false takes no class names.")
                if len(set(rest[1:])) != len(rest[1:]):
                    raise InputError(f"{source}, line {lineno}: @classLabel names a class twice.")
                header[key] = tuple(rest[1:]) if _BOOL[rest[0].lower()] else None
            else:  # data
                if rest:
                    raise InputError(f"{source}, line {lineno}: @data takes nothing after it.")
                if header.get("classlabel") and header.get("targetlabel"):
                    raise InputError(f"{source}, line {lineno}: both @classLabel true and @targetLabel true.")
                if header.get("univariate") and header.get("dimensions", 1) != 1:
                    raise InputError(f"{source}, line {lineno}: @univariate true with @dimensions "
                                     f"{header['dimensions']}.")
                if header.get("univariate"):
                    header["dimensions"] = 1
                in_data = True
            continue
        if not in_data:
            raise InputError(f"{source}, line {lineno}: data before the @data line.")
        parts = line.split(":")
        labelled = bool(header.get("classlabel")) or bool(header.get("targetlabel"))
        if labelled:
            if len(parts) < 2:
                raise InputError(f"{source}, line {lineno}: the case has no label (expected dims:...:label).")
            raw_labels.append(parts[-1].strip())
            parts = parts[:-1]
        n_dims = header.setdefault("dimensions", len(parts))
        if len(parts) != n_dims:
            raise InputError(f"{source}, line {lineno}: the case has {len(parts)} dimensions, expected {n_dims}"
                             f"{'' if labelled else ' (a label without @classLabel true?)'}.")
        stamped = bool(header.get("timestamps"))
        dims = [_dimension(source, lineno, p, d, stamped) for d, p in enumerate(parts)]
        if stamped:
            grid = sorted({a for _, ts in dims for a in ts})  # type: ignore[union-attr]
            pos = {a: i for i, a in enumerate(grid)}
            x = torch.full((len(grid), n_dims), math.nan, dtype=torch.float64)
            for d, (vs, ts) in enumerate(dims):
                x[[pos[a] for a in ts], d] = torch.tensor(vs, dtype=torch.float64)  # type: ignore[union-attr]
            times.append(torch.tensor(grid, dtype=torch.float64))
        else:
            n = max(len(vs) for vs, _ in dims)
            x = torch.full((n, n_dims), math.nan, dtype=torch.float64)
            for d, (vs, _) in enumerate(dims):
                x[:len(vs), d] = torch.tensor(vs, dtype=torch.float64)
            if header.get("equallength") and any(len(vs) != n for vs, _ in dims):
                raise InputError(f"{source}, line {lineno}: dimensions of unequal length in a file with "
                                 f"@equalLength true.")
        series.append(x)
        length = header.get("serieslength")
        if header.get("equallength") and length is not None and x.shape[0] != length:
            raise InputError(f"{source}, line {lineno}: the case has length {x.shape[0]}, @seriesLength is {length}.")
        if header.get("equallength") and x.shape[0] != series[0].shape[0]:
            raise InputError(f"{source}, line {lineno}: the case has length {x.shape[0]}, the first case "
                             f"{series[0].shape[0]}, but @equalLength is true.")
        if header.get("missing") is False and bool(x.isnan().any()) and not stamped:
            raise InputError(f"{source}, line {lineno}: a missing value in a file with @missing false.")
    if not in_data:
        raise InputError(f"{source}: no @data line; is this a .ts file?")
    if not series:
        raise InputError(f"{source}: no cases after @data.")
    names: tuple[str, ...] = header.get("classlabel") or ()  # type: ignore[assignment]
    labels = targets = None
    if names:
        for i, lab in enumerate(raw_labels):
            if lab not in names:
                raise InputError(f"{source}: case {i + 1} has label {lab!r}, not among the declared classes "
                                 f"{', '.join(names)}.")
        labels = raw_labels
    elif header.get("targetlabel"):
        targets = torch.tensor([_float(source, 0, v, f"target of case {i + 1}") for i, v in enumerate(raw_labels)],
                               dtype=torch.float64)
    return TSFile(series, times if header.get("timestamps") else None, labels, targets, names, header)


def read_ts(path: str | Path) -> TSFile:
    """Read a ``.ts`` file (see :func:`parse_ts`); errors name the file and line.

    >>> f = read_ts(uea_path("BasicMotions", "train"))  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"read_ts: no file {path}.")
    return parse_ts(path.read_text(encoding="utf-8"), str(path))


def uea_path(name: str, split: str = "train") -> Path:
    """The ``.ts`` file of the UEA data set ``name`` (``"train"`` or ``"test"`` split) inside the installed ``aeon``
    package, found without importing ``aeon``.

    >>> uea_path("JapaneseVowels", "test").name  # doctest: +SKIP
    'JapaneseVowels_TEST.ts'
    """
    if split not in ("train", "test"):
        raise InputError(f"uea_path: split must be 'train' or 'test', got {split!r}.")
    if name not in UEA_SETS:
        raise InputError(f"uea_path: unknown data set {name!r}; available: {', '.join(UEA_SETS)}.")
    spec = importlib.util.find_spec("aeon")  # finds the package; its __init__ is not executed
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"uea_path: the UEA data set {name} is read from the aeon wheel, which is not installed; "
                         f"run `pip install --no-deps aeon==1.6.0` (the 'uea' extra of neurodyn names it).")
    for root in spec.submodule_search_locations:
        path = Path(root) / "datasets" / "data" / name / f"{name}_{split.upper()}.ts"
        if path.is_file():
            return path
    raise InputError(f"uea_path: the installed aeon has no {name}_{split.upper()}.ts under datasets/data; install "
                     f"aeon==1.6.0 (`pip install --no-deps aeon==1.6.0`).")


@dataclass
class LabelledSeries:
    """Padded labelled series, ready for the sequence models (:class:`~neurodyn.models.NeuralCDE`,
    :class:`~neurodyn.models.ODERNN`, :class:`~neurodyn.models.GRUD`, :class:`~neurodyn.models.DiagonalSSM`).

    Attributes
    ----------
    times : Tensor, shape ``(N, T)``
        Observation times of each series (``0, 1, ..., n_i - 1`` when the file has no time stamps), padded by
        repeating the last time.
    values : Tensor, shape ``(N, T, C)``
        Values, 0 where ``mask`` is 0.
    mask : Tensor, shape ``(N, T, C)``
        1 where a value is observed, 0 where it is missing or padding.
    lengths : Tensor, shape ``(N,)`` int64
        Real time points of each series.
    labels : Tensor, shape ``(N,)`` int64
        Class index of each series into ``classes``.
    classes : tuple of str
    name : str
    """

    times: Tensor
    values: Tensor
    mask: Tensor
    lengths: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    name: str = ""

    @property
    def batch(self) -> IrregularBatch:
        """The series as an :class:`~neurodyn.data.IrregularBatch` (without the labels)."""
        return IrregularBatch(self.times, self.values, self.mask, self.lengths)

    def nan_values(self) -> Tensor:
        """``values`` with NaN where ``mask`` is 0 (the missing-value convention of the control paths)."""
        return self.values.masked_fill(self.mask == 0, math.nan)

    def __len__(self) -> int:
        return self.labels.shape[0]


def labelled_series(f: TSFile, name: str = "", dtype: torch.dtype = torch.float32) -> LabelledSeries:
    """Pad the cases of a classification ``.ts`` file into a :class:`LabelledSeries` (times ``0..n_i-1`` when the
    file has no time stamps).

    >>> f = parse_ts("@classLabel true x y\\n@data\\n1,2:3,4:y\\n5:6:x\\n")
    >>> s = labelled_series(f)
    >>> s.times.tolist(), s.lengths.tolist(), s.labels.tolist()
    ([[0.0, 1.0], [0.0, 0.0]], [2, 1], [1, 0])
    """
    if f.labels is None:
        raise InputError(f"labelled_series: {name or 'the file'} has no class labels (@classLabel true).")
    N, T = len(f.series), max(x.shape[0] for x in f.series)
    C = f.series[0].shape[1]
    values = torch.zeros(N, T, C, dtype=dtype)
    mask = torch.zeros(N, T, C, dtype=dtype)
    times = torch.zeros(N, T, dtype=dtype)
    lengths = torch.tensor([x.shape[0] for x in f.series], dtype=torch.int64)
    for i, x in enumerate(f.series):
        n = x.shape[0]
        seen = ~x.isnan()
        values[i, :n] = torch.where(seen, x, 0.0).to(dtype)
        mask[i, :n] = seen.to(dtype)
        t = f.times[i] if f.times is not None else torch.arange(n, dtype=torch.float64)
        times[i, :n] = t.to(dtype)
        times[i, n:] = float(t[-1])
    index = {c: k for k, c in enumerate(f.class_names)}
    labels = torch.tensor([index[c] for c in f.labels], dtype=torch.int64)
    return LabelledSeries(times, values, mask, lengths, labels, f.class_names, name)


def load_uea(name: str, split: str = "train", dtype: torch.dtype = torch.float32) -> LabelledSeries:
    """A UEA classification data set shipped inside the ``aeon`` wheel (no download), padded for the models.

    Parameters
    ----------
    name : ``"JapaneseVowels"`` (12 channels, lengths 7-29, 9 classes; 270 train / 370 test) or ``"BasicMotions"``
        (6 channels, length 100, 4 classes; 40 / 40).
    split : ``"train"`` or ``"test"``
    dtype : the floating dtype of times, values and mask.

    Returns
    -------
    LabelledSeries
        ``times (N, T)`` (sample index, padded by repeating the last), ``values (N, T, C)``, ``mask (N, T, C)``,
        ``lengths (N,)``, ``labels (N,)`` (indices into ``classes``).

    Examples
    --------
    >>> data = load_uea("JapaneseVowels", "train")  # doctest: +SKIP
    >>> data.values.shape, len(data.classes)  # doctest: +SKIP
    (torch.Size([270, 29, 12]), 9)
    """
    return labelled_series(read_ts(uea_path(name, split)), f"{name} ({split})", dtype)


def drop_observations(mask: Tensor, rate: float, *, lengths: Tensor | None = None, seed: int = 0,
                      per: str = "time") -> Tensor:
    """Drop a fraction of each series' observations at random (Kidger et al. 2020): the new mask.

    Parameters
    ----------
    mask : Tensor, shape ``(N, T, C)``
        1 where observed.
    rate : float in ``[0, 1)``
        Fraction dropped per series: ``floor(rate * n)`` of its ``n`` items, chosen uniformly without replacement
        (so at least one remains).
    lengths : Tensor, shape ``(N,)``, optional
        Real time points of each series (default: all ``T``); padding is never chosen.
    seed : int
        Seed of the draw (the same seed gives the same drop).
    per : ``"time"`` or ``"value"``
        ``"time"``: whole time points are dropped (every channel at once; ``n`` = the series' length), as Kidger et
        al. do for CharacterTrajectories and the UEA sets (a time channel built from the times stays complete).
        ``"value"``: single (time, channel) entries among the observed ones (``n`` = their number).

    Returns
    -------
    Tensor, the shape and dtype of ``mask``: 0 at the dropped items, else ``mask``.

    Examples
    --------
    >>> m = drop_observations(torch.ones(2, 10, 3), 0.3, seed=1)
    >>> m[..., 0].sum(-1).tolist(), bool((m == m[..., :1]).all())
    ([7.0, 7.0], True)
    """
    if mask.dim() != 3:
        raise InputError(f"drop_observations: mask must have shape (N, T, C), got {tuple(mask.shape)}.")
    if not 0.0 <= rate < 1.0:
        raise InputError(f"drop_observations: rate must be in [0, 1), got {rate}.")
    if per not in ("time", "value"):
        raise InputError(f"drop_observations: per must be 'time' or 'value', got {per!r}.")
    N, T, C = mask.shape
    lengths = torch.full((N,), T, dtype=torch.int64) if lengths is None else lengths
    if lengths.shape != (N,) or bool((lengths < 1).any()) or bool((lengths > T).any()):
        raise InputError(f"drop_observations: lengths must have shape ({N},) with values in [1, {T}].")
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(N, T, C, dtype=torch.bool)
    for i in range(N):
        n = int(lengths[i])
        if per == "time":
            k = math.floor(rate * n)
            keep[i, torch.randperm(n, generator=g)[:k]] = False
        else:
            where = (mask[i, :n] != 0).reshape(-1).nonzero().squeeze(-1)
            k = math.floor(rate * where.numel())
            flat = keep[i, :n].reshape(-1)
            flat[where[torch.randperm(where.numel(), generator=g)[:k]]] = False
            keep[i, :n] = flat.view(n, C)
    return mask * keep.to(device=mask.device, dtype=mask.dtype)


__all__ = ["LabelledSeries", "TSFile", "drop_observations", "labelled_series", "load_uea", "parse_ts",
                          "read_ts", "uea_path", "UEA_SETS"]
