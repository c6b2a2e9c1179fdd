"""The ``.ts`` reader on small synthetic files (every header, missing values, time stamps, malformed input) and on
the UEA files of the aeon wheel (shapes against the files' own headers and the published sizes); random drops."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from neurodyn.data import drop_observations, labelled_series, load_uea, parse_ts, read_ts, uea_path
from neurodyn.errors import InputError

HEADER = "@problemName toy\n@timeStamps false\n@missing true\n@univariate false\n@dimensions 2\n" \
         "@equalLength false\n@classLabel true a b c\n@data\n"
needs_aeon = pytest.mark.skipif(importlib.util.find_spec("aeon") is None,
                                reason="aeon (the wheel with the UEA files) is not installed")


def test_parse_unequal_length_missing_values_and_labels():
    f = parse_ts("# comment\n" + HEADER + "1,2,3:4,?,6:b\n\n0.5,NaN:-1e3,2:c\n7:8:a\n", "toy.ts")
    assert [x.shape for x in f.series] == [(3, 2), (2, 2), (1, 2)]
    assert f.series[0][:, 0].tolist() == [1.0, 2.0, 3.0]
    assert f.series[0][0, 1] == 4.0 and math.isnan(f.series[0][1, 1]) and f.series[0][2, 1] == 6.0
    assert math.isnan(f.series[1][1, 0]) and f.series[1][0, 1] == -1000.0
    assert f.labels == ["b", "c", "a"] and f.class_names == ("a", "b", "c")
    assert f.header["problemname"] == "toy" and f.header["dimensions"] == 2 and f.times is None
    s = labelled_series(f)
    assert s.values.shape == (3, 3, 2) and s.lengths.tolist() == [3, 2, 1] and s.labels.tolist() == [1, 2, 0]
    assert s.times.tolist() == [[0, 1, 2], [0, 1, 1], [0, 0, 0]]
    assert s.mask[0, :, 1].tolist() == [1, 0, 1] and s.mask[2, 1:].sum() == 0
    assert bool(s.nan_values()[0, 1, 1].isnan()) and s.values[0, 1, 1] == 0


def test_parse_dimensions_of_unequal_length_in_one_case_pad_with_nan():
    f = parse_ts("@dimensions 2\n@classLabel true x\n@data\n1,2,3:4:x\n")
    assert f.series[0][:, 1][0] == 4.0 and bool(f.series[0][1:, 1].isnan().all())


def test_parse_time_stamps_union_grid_and_targets():
    text = "@timeStamps true\n@univariate false\n@dimensions 2\n@targetLabel true\n@data\n" \
           "(0,1.5),(2,2.5):(1,7),(2,8):0.25\n(0.5,?):(0.5,3):-1\n"
    f = parse_ts(text)
    assert f.times[0].tolist() == [0.0, 1.0, 2.0]
    x = f.series[0]
    assert x[0, 0] == 1.5 and math.isnan(x[1, 0]) and x[2, 0] == 2.5
    assert math.isnan(x[0, 1]) and x[1, 1] == 7.0 and x[2, 1] == 8.0
    assert f.targets.tolist() == [0.25, -1.0] and f.labels is None


def test_parse_univariate_without_labels_infers_one_dimension():
    f = parse_ts("@univariate true\n@classLabel false\n@data\n1,2\n3,4,5\n")
    assert [x.shape for x in f.series] == [(2, 1), (3, 1)] and f.labels is None


@pytest.mark.parametrize("text, message", [
    (HEADER + "1,2:3,4\n", "line 9: the case has 1 dimensions, expected 2"),
    (HEADER + "1,x:3,4:a\n", "line 9: dimension 1: 'x' is not a number"),
    (HEADER + "1,2:3,4:d\n", "case 1 has label 'd'"),
    (HEADER + "1,2::a\n", "line 9: dimension 2 is empty"),
    ("@problemName t\n@foo 1\n@data\n", "line 2: unknown header @foo"),
    ("@dimensions 2\n@dimensions 2\n", "line 2: @dimensions given twice"),
    ("@equalLength maybe\n", "line 1: @equalLength takes true or false"),
    ("@dimensions 0\n", "@dimensions takes one positive integer"),
    ("@classLabel true\n", "needs the class names"),
    ("1,2,3\n", "line 1: data before the @data line"),
    ("@classLabel true a\n@data\n1:a\n@dimensions 1\n", "line 4: header line '@dimensions' after @data"),
    ("@equalLength true\n@seriesLength 3\n@classLabel true a\n@data\n1,2,3:a\n1,2:a\n",
     "line 6: the case has length 2"),
    ("@equalLength true\n@classLabel true a\n@data\n1,2:3:a\n", "dimensions of unequal length"),
    ("@missing false\n@classLabel true a\n@data\n1,?:a\n", "line 4: a missing value in a file with @missing false"),
    ("@timeStamps true\n@classLabel true a\n@data\n1,2:a\n", "must be (time,value) pairs"),
    ("@timeStamps true\n@classLabel true a\n@data\n(1,2),(0,3):a\n", "strictly increasing"),
    ("@univariate true\n@dimensions 3\n@data\n", "@univariate true with @dimensions 3"),
    ("@problemName t\n", "no @data line"),
    ("@classLabel true a\n@data\n", "no cases after @data"),
    ("@classLabel true a\n@data\n1,2\n", "the case has no label"),
])
def test_malformed_input_names_the_source_line_and_problem(text, message):
    with pytest.raises(InputError) as err:
        parse_ts(text, "bad.ts")
    assert str(err.value).startswith("bad.ts") and message in str(err.value)


def test_read_ts_file_and_missing_file(tmp_path):
    p = tmp_path / "t.ts"
    p.write_text(HEADER + "1:2:a\n")
    assert read_ts(p).series[0].tolist() == [[1.0, 2.0]]
    with pytest.raises(InputError, match="no file"):
        read_ts(tmp_path / "none.ts")
    with pytest.raises(InputError, match="has no class labels"):
        labelled_series(parse_ts("@targetLabel true\n@data\n1:0.5\n"))


def _check_against_file(path, data, n, channels, classes):
    """The loader's tensors against a line-by-line reading of the raw file (independent of parse_ts)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith(("#", "@"))]
    assert len(lines) == len(data) == n and data.values.shape[-1] == channels and len(data.classes) == classes
    for i in (0, n // 2, n - 1):
        dims = lines[i].split(":")
        label, dims = dims[-1], dims[:-1]
        assert len(dims) == channels and data.classes[int(data.labels[i])] == label
        first = [float(v) for v in dims[0].split(",")]
        assert int(data.lengths[i]) == len(first)
        assert torch.allclose(data.values[i, :len(first), 0].double(), torch.tensor(first, dtype=torch.float64),
                              atol=1e-6)
        last = [float(v) for v in dims[-1].split(",")]
        assert float(data.values[i, len(last) - 1, -1]) == pytest.approx(last[-1], abs=1e-6)


@needs_aeon
def test_japanese_vowels_from_the_aeon_wheel_without_importing_aeon():
    sys.modules.pop("aeon", None)
    train, test = load_uea("JapaneseVowels", "train"), load_uea("JapaneseVowels", "test")
    assert "aeon" not in sys.modules  # found by importlib.util.find_spec, its __init__ not run
    _check_against_file(uea_path("JapaneseVowels", "train"), train, 270, 12, 9)
    _check_against_file(uea_path("JapaneseVowels", "test"), test, 370, 12, 9)
    lengths = torch.cat([train.lengths, test.lengths])
    assert int(lengths.min()) == 7 and int(lengths.max()) == 29  # the data set's documented 7-29
    assert train.labels.bincount().tolist() == [30] * 9  # "30 utterances for each speaker"
    assert train.classes == tuple(str(k) for k in range(1, 10))
    assert float(train.mask.sum()) == 12 * float(train.lengths.sum())  # no missing values in the file
    assert bool((train.times[0, :7] == torch.arange(7.0)).all())


@needs_aeon
def test_basic_motions_from_the_aeon_wheel():
    for split in ("train", "test"):
        d = load_uea("BasicMotions", split)
        _check_against_file(uea_path("BasicMotions", split), d, 40, 6, 4)
        assert d.values.shape == (40, 100, 6) and bool((d.lengths == 100).all())
        assert d.labels.bincount().tolist() == [10] * 4
    assert d.classes == ("Standing", "Running", "Walking", "Badminton")


def test_uea_path_rejects_unknown_names():
    with pytest.raises(InputError, match="unknown data set 'Nope'"):
        uea_path("Nope")
    with pytest.raises(InputError, match="split must be"):
        uea_path("JapaneseVowels", "val")


def test_drop_observations_per_time_and_per_value():
    mask = torch.ones(50, 20, 3)
    lengths = torch.randint(1, 21, (50,), generator=torch.Generator().manual_seed(0))
    mask = mask * (torch.arange(20)[None, :, None] < lengths[:, None, None])
    for rate in (0.0, 0.3, 0.5, 0.7):
        m = drop_observations(mask, rate, lengths=lengths, seed=3)
        assert bool((m == m[..., :1]).all())  # whole time points
        kept = m[..., 0].sum(-1)
        assert kept.tolist() == [n - math.floor(rate * n) for n in lengths.tolist()]
        assert float((m * (1 - mask)).sum()) == 0  # padding never becomes observed
        assert torch.equal(m, drop_observations(mask, rate, lengths=lengths, seed=3))
    assert not torch.equal(drop_observations(mask, 0.5, lengths=lengths, seed=3),
                           drop_observations(mask, 0.5, lengths=lengths, seed=4))
    # each time point equally likely to go: over many draws each position is dropped about half the time
    hits = sum(drop_observations(torch.ones(1, 10, 1), 0.5, seed=s)[0, :, 0] for s in range(2000)) / 2000
    assert bool(((hits - 0.5).abs() < 0.05).all())
    v = drop_observations(mask, 0.5, lengths=lengths, seed=1, per="value")
    per_row = mask.sum((1, 2))
    assert v.sum((1, 2)).tolist() == [n - math.floor(0.5 * n) for n in per_row.tolist()]
    assert not bool((v == v[..., :1]).all())
    with pytest.raises(InputError, match="rate must be in"):
        drop_observations(mask, 1.0)
    with pytest.raises(InputError, match="per must be"):
        drop_observations(mask, 0.5, per="row")
