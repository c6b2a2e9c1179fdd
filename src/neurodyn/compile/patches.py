"""Changes to Inductor's CPU lowering made while compiling neurodyn's steps and loops (internal; performance only).

Each is a context manager that replaces one entry of a private Inductor object on entering and puts the original back
on leaving; where this torch has no such entry, nothing is patched and the compiled code is Inductor's default.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# A digest of the source of neurodyn.compile (this module's lowerings, the passes and the wrapper rewrite of the other
# modules), named in the compile options of every program neurodyn compiles: Inductor's on-disk cache of compiled
# graphs keys on the graph and the options, not on the code of a lowering, so without it a program compiled by an
# earlier neurodyn (another formula under the same option values) could be reused after an upgrade.
SOURCE_DIGEST = hashlib.sha256(
    b"".join(f.read_bytes() for f in sorted(Path(__file__).parent.glob("*.py")))).hexdigest()[:16]

# tanh of at least this many elements calls ATen's kernel inside compiled code (library_tanh); measured crossover of a
# library call against Sleef's inlined code, float64, one core: ~500 elements.
LIBRARY_TANH_ELEMENTS = 2048


def _intel_cpu() -> bool:
    """Whether this machine's CPU is Intel's (``vendor_id`` of ``/proc/cpuinfo``, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return "GenuineIntel" in line
    except OSError:
        pass
    return "intel" in platform.processor().lower()


# Whether torch's CPU kernels here include MKL's running on an Intel CPU (its vector math and products take their tuned
# paths there, generic ones on other CPUs): the choices below and loop.batch_column_major's follow it.
MKL_ON_INTEL = torch.backends.mkl.is_available() and _intel_cpu()
# The vector width of Inductor's CPU kernels (its ``cpp.simdlen``): 256 bits on Intel CPUs, where a field's short rows
# and 64-wide layers ran ~1.5x faster per evaluation than with the 512-bit vectors Inductor picks by default where the
# CPU has them (Intel Xeon, 2026-11-22); elsewhere Inductor's default (None), the widest the CPU has. On an AMD EPYC
# with AVX-512 the 512-bit kernels are the faster ones (bench_suite, compiled, CPU time: small 0.265 against 0.306 ms,
# batched 23.1 against 27.7 ms); AVX2-only CPUs get 256 bits either way. The per-sample row loop (compile.rows) keeps
# Inductor's default everywhere.
SIMD_BITS = 256 if _intel_cpu() else None
# Whether float32 tanh of at least LIBRARY_TANH_ELEMENTS elements is computed in compiled code by a fused formula
# (tanh_formula: a rational function, no exp; ~5 ulp at most) rather than ATen's kernel (library_tanh). ATen's float32
# tanh is MKL's VML where torch has MKL: fast on Intel CPUs (~0.3 ns per element), and on other CPUs, which MKL runs
# through its generic code, slower than Inductor's own (AMD EPYC, AVX2, one core: a (512, 128) tanh 211 us in ATen,
# 218 us as Inductor's Sleef code with the bias add fused, ~40 us as this formula with it; Cephes' tanhf formula, used
# before, ~105 us). So ATen's kernel only where MKL runs on an Intel CPU; without MKL ATen's tanh is Sleef's, as
# Inductor's.
TANH_FORMULA_FLOAT32 = not MKL_ON_INTEL
# Likewise for float64 tanh (tanh_formula_float64: a rational function and the double-angle formula, no exp; <= 1.63
# ulp measured against long double tanh). ATen's float64 tanh is MKL's VML too, and on other CPUs it is slower than
# Inductor's Sleef code (AMD EPYC, AVX2, one core, tanh(x + b) per call: (256, 64) ATen ~170 us, Sleef ~170 us, Cephes'
# formula (used before) ~105 us, this formula ~80 us; (2048, 64): Cephes' ~540 us, this formula ~340 us; a compiled
# (x + b) * 1 alone: ~52 / ~110 us).
TANH_FORMULA_FLOAT64 = not MKL_ON_INTEL
# Whether float32 matrix products in compiled x86 CPU code call oneDNN's kernel (the library behind torch's mkldnn ops;
# onednn_mm) instead of ATen's mm, which is MKL's. Where MKL runs its generic code (not an Intel CPU) oneDNN's kernels
# are the faster ones: AMD EPYC with AVX-512, one core, (512, 64) x (64, 128) 43 us against 78 us, (4096, 64) x
# (64, 128) 275 against 619 us. oneDNN has no float64 product.
ONEDNN_FLOAT32 = (torch.backends.mkldnn.is_available() and not MKL_ON_INTEL
                  and platform.machine().lower() in ("x86_64", "amd64"))
# ... for products of at least this many multiply-adds (m k n) and at least ONEDNN_MIN_INNER terms each: oneDNN's call
# costs ~10 us more than MKL's ((16, 64) x (64, 128): 11.6 against 4.0 us; (64, 64) x (64, 64): 11.2 against 5.8 us;
# (1024, 16) x (16, 128): 26 against 40 us).
ONEDNN_MIN_MACS = 1 << 20
ONEDNN_MIN_INNER = 16
# The formula's name, in the compile options beside TANH_FORMULA_FLOAT32 (Inductor's cache key): code compiled with
# another formula is not reused.
TANH_FORMULA = "rational [9/8] on [-9, 9], clamped to [-1, 1]"


# The compile-option entries naming the lowering changes of this module (no Inductor settings: Inductor's cache of
# compiled graphs keys on the options, so programs compiled with and without a change, or by other code, are told
# apart). Every option set neurodyn compiles with on the CPU includes them.
LOWERING_MARKS = {"neurodyn_library_tanh": LIBRARY_TANH_ELEMENTS,
                  "neurodyn_tanh_formula": TANH_FORMULA_FLOAT32 and TANH_FORMULA,
                  "neurodyn_tanh_formula_float64": TANH_FORMULA_FLOAT64,
                  "neurodyn_onednn_float32": ONEDNN_FLOAT32 and ONEDNN_MIN_MACS,
                  "neurodyn_source": SOURCE_DIGEST}


@torch.library.custom_op("neurodyn::onednn_mm", mutates_args=())
def onednn_mm(a: Tensor, wt: Tensor) -> Tensor:
    """``a @ wt.T`` (``a`` of shape ``(m, k)``, ``wt`` of shape ``(n, k)``; result ``(m, n)``) by oneDNN's product
    (``torch.ops.mkldnn._linear_pointwise``, the kernel of an ``nn.Linear`` without bias). The compiled CPU code's
    float32 products call it where :data:`ONEDNN_FLOAT32` is set (:class:`neurodyn.compile.loop.LoopProducts`);
    compiled, it is a direct call of the library (:func:`register_onednn_lowering`).

    Examples
    --------
    >>> a, wt = torch.ones(3, 4), torch.ones(2, 4)
    >>> onednn_mm(a, wt).shape
    torch.Size([3, 2])
    """
    return torch.ops.mkldnn._linear_pointwise(a, wt, None, "none", [-1], "")


@onednn_mm.register_fake
def _onednn_mm_fake(a: Tensor, wt: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], wt.shape[0])


_ONEDNN_LOWERING: list = []


def register_onednn_lowering() -> bool:
    """Registers (once) Inductor's lowering of :func:`onednn_mm`: oneDNN's product called from the compiled code
    (Inductor's own extern kernel of ``mkldnn._linear_pointwise``, its C shim where the wrapper is C++), both operands
    contiguous. Returns whether this torch has that kernel (without it the op is not used)."""
    if not _ONEDNN_LOWERING:
        try:
            from torch._inductor import lowering, mkldnn_ir
            from torch._inductor.ir import TensorBox

            @lowering.register_lowering(torch.ops.neurodyn.onednn_mm.default)
            def _lower(a: Any, wt: Any) -> Any:
                return TensorBox.create(mkldnn_ir.LinearUnary.create(a, wt, None, "none", [-1], ""))

            _ONEDNN_LOWERING.append(True)
        except (ImportError, AttributeError):  # another torch: the products stay ATen's
            _ONEDNN_LOWERING.append(False)
    return _ONEDNN_LOWERING[0]


class _InductorPatch:
    """Base of the compile-time patches below: on entering, one entry of a private Inductor object (an attribute, or
    an item where :attr:`item` is set) is replaced by :meth:`replace` of its value; on leaving, the value is put back.
    :meth:`locate` finds the object once per class; where this torch has no such object or entry, nothing is
    patched. Performance only."""

    item = False
    _target = None  # per class: the object holding the entry, or False where this torch has none

    @classmethod
    def locate(cls) -> tuple[Any, Any] | None:
        """``(object, name or key)`` of the entry to patch, or None where this torch has none."""
        raise NotImplementedError

    def replace(self, saved: Any) -> Any:
        """The value the entry holds while patched, given its own."""
        raise NotImplementedError

    def __enter__(self) -> None:
        cls = type(self)
        if cls.__dict__.get("_target") is None:
            try:
                cls._target = cls.locate() or False
            except (ImportError, AttributeError, KeyError):  # another torch: nothing to adjust
                cls._target = False
        self.saved = None
        if cls._target:
            obj, key = cls._target
            self.saved = obj.get(key) if cls.item else getattr(obj, key, None)
            if self.saved is not None:
                self._put(self.replace(self.saved))

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            self._put(self.saved)

    def _put(self, value: Any) -> None:
        obj, key = type(self)._target
        if self.item:
            obj[key] = value
        else:
            setattr(obj, key, value)


class vectorize_strided_loads(_InductorPatch):
    """While compiling: let Inductor's CPU code generator vectorize loops with more strided loads than it would by
    default (a batch-1 state through ``nn.Linear(2, 64)`` reads the weight with stride 2, and the layer's tanh then
    runs one element at a time: ~10% of an evaluation of a small MLP). Performance only; a no-op where this torch
    has no such knob."""

    @classmethod
    def locate(cls) -> tuple[Any, str]:
        from torch._inductor.codegen.cpp import KernelOpStats
        return KernelOpStats, "OVERHEAD_RATIO_THRESHOLD"

    def replace(self, saved: float) -> float:
        return max(saved, 0.5)


class library_tanh(_InductorPatch):
    """While compiling on the CPU: ``tanh`` of a tensor with at least :data:`LIBRARY_TANH_ELEMENTS` elements runs as
    ATen's own kernel (the one eager mode calls: Intel VML where torch has MKL) instead of Inductor's inlined
    vectorised code (Sleef ``tanh_u10``, ~4x slower per float64 element here), which dominates a batched MLP field
    (the batched protocol case: 256 x 64 x 2 ``tanh`` per evaluation). Where :data:`TANH_FORMULA_FLOAT32` is set
    (MKL not on an Intel CPU), such a float32 ``tanh`` is instead the fused kernel of :func:`tanh_formula` (with the
    bias add before it), and where :data:`TANH_FORMULA_FLOAT64` is set a float64 one that of
    :func:`tanh_formula_float64`. Smaller ``tanh`` (a batch-1 state's 64-wide layers) stay fused: a library call per
    evaluation costs more than it saves there. Performance only; a no-op where this torch has no such lowering table."""

    item = True

    @classmethod
    def locate(cls) -> tuple[Any, Any]:
        from torch._inductor import lowering
        op = torch.ops.aten.tanh.default
        lowering.lowerings[op]  # noqa: B018 (present in this torch?)
        return lowering.lowerings, op

    def replace(self, saved: Callable) -> Callable:
        from torch._inductor import lowering
        library = lowering.fallback_handler(torch.ops.aten.tanh.default, add_to_fallback_set=False)
        formulas = {torch.float32: lowering.make_pointwise(tanh_formula),
                    torch.float64: lowering.make_pointwise(tanh_formula_float64)}
        wanted = {torch.float32: TANH_FORMULA_FLOAT32, torch.float64: TANH_FORMULA_FLOAT64}

        def lower(x, *args, **kwargs):
            try:
                size = [int(d) for d in x.get_size()]
                big = math.prod(size) >= LIBRARY_TANH_ELEMENTS and x.get_device().type == "cpu"
                dtype = x.get_dtype()
                fused = big and wanted.get(dtype, False) and not args and not kwargs
            except (TypeError, AttributeError):  # symbolic sizes, or not a tensor: the default lowering
                big = fused = False
            if fused:
                return formulas[dtype](x)
            return (library if big else saved)(x, *args, **kwargs)

        return lower

    def __enter__(self) -> None:
        super().__enter__()
        if self.saved is not None:
            # Inductor notes (a logged warning, per compilation) that ATen's tanh has no C shim and is called
            # through its generic op dispatcher: expected here, and no concern of the user's.
            logging.getLogger("torch._inductor.ir").addFilter(_no_shim_notice)

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            logging.getLogger("torch._inductor.ir").removeFilter(_no_shim_notice)
        super().__exit__(*exc)


# tanh(x) = x P(x^2) / Q(x^2) on [-9, 9] (degree 4 / 4 in x^2, P(0) = Q(0) = 1): a minimax fit of tanh(x) / x in
# relative error (2.7e-8 in exact arithmetic), its coefficients rounded to float32. tanh(9) rounds to 1 in float32, and
# so does the formula at 9: the input is clamped there.
_TANH_NUM = (1.0, 0.13384070992469788, 0.003499083686619997, 2.066171873593703e-05, 1.3418016031607749e-08)
_TANH_DEN = (1.0, 0.4671739339828491, 0.025890590623021126, 0.00032911429298110306, 7.804536608091439e-07)
_TANH_CLAMP = 9.0


def tanh_formula(x: Any) -> Any:
    """float32 ``tanh`` of one element in Inductor's pointwise operations (``ops``: the body of a fused kernel):
    ``c P(c^2) / Q(c^2)`` with ``c`` the input clamped to ``[-9, 9]`` (``_TANH_NUM``, ``_TANH_DEN``), then clamped to
    ``[-1, 1]``: two polynomials and one division, no ``exp``. Float32 evaluation (no fused multiply-adds): relative
    error at most ~3.4e-7 against float64 ``tanh`` (~5.4 ulp; 0.5 ulp on average over [-12, 12]; ATen's: 0.5 ulp at
    most); ``+-0`` as it is, ``+-inf`` to ``+-1``, NaN stays NaN (the clamps propagate it)."""
    from torch._inductor.virtualized import ops

    def c(v: float) -> Any:
        return ops.constant(v, torch.float32)

    xc = ops.maximum(ops.minimum(x, c(_TANH_CLAMP)), c(-_TANH_CLAMP))
    s = ops.mul(xc, xc)

    def horner(coefs: tuple) -> Any:
        acc = c(coefs[-1])
        for coef in coefs[-2::-1]:
            acc = ops.add(ops.mul(acc, s), c(coef))
        return acc

    t = ops.truediv(ops.mul(xc, horner(_TANH_NUM)), horner(_TANH_DEN))
    return ops.maximum(ops.minimum(t, c(1.0)), c(-1.0))  # rounding can give 1 + 1 ulp near |x| = 9


# tanh(h) = h P(h^2) / Q(h^2) on [-9.55, 9.55] (degree 8 / 8 in h^2, P(0) = Q(0) = 1): a near-minimax fit of
# tanh(h) / h in relative error (2.5e-20 in exact arithmetic), derived by benchmarks/fit_tanh_float64.py, which prints
# the two tuples here: _TANH_DIF64, the coefficients of D = (P - Q) / h^2 (degree 7), and _TANH_DEN64, those of Q
# (constant term first). tanh_formula_float64 evaluates P / Q - 1 = h^2 D / Q at h = |x| / 2 and doubles the angle.
# float64 tanh rounds to +-1 from |x| ~ 19.06 on, and the formula gives exactly +-1 at its clamp |x| = 19.1.
_TANH_DIF64 = (-0.3333333333333333, -0.02809814111453701, -0.0007109491388478381, -7.4827968955470994e-06,
               -3.6175171446246824e-08, -7.930188916170272e-11, -6.881020740600995e-14, -1.557878124806015e-17)
_TANH_DEN64 = (1.0, 0.484294423343611, 0.03394585484922603, 0.0007996826355913474, 8.0934613377308e-06,
               3.813613105669163e-08, 8.203608371826234e-11, 7.011345127611764e-14, 1.5670488607190552e-17)
_TANH_CLAMP64 = 19.1
# Below this |x| the formula's result is x + x (tanh(x) / x - 1), rounded once at the end; from it on, the doubling's
# quotient, in which the rational's rounding errors are damped.
_TANH_SMALL64 = 0.75


def tanh_formula_float64(x: Any) -> Any:
    """float64 ``tanh`` of one element in Inductor's pointwise operations (``ops``: the body of a fused kernel), with
    no ``exp``: for ``a`` the input clamped to ``[-19.1, 19.1]``, ``h = a / 2`` and ``s = h^2``, ``m = s D(s) /
    Q(s)`` (``_TANH_DIF64``, ``_TANH_DEN64``, both by Horner's rule in fused multiply-adds; ``tanh(h) = h (1 + m)``),
    ``u = a + a m`` (``2 tanh(h)``) and ``v = u / 2``; then ``tanh(a) = u / (1 + v^2)``, for ``|a| < 0.75`` written
    ``a + a (m - v^2) / (1 + v^2)`` (no rounding near 1 there). Two divisions, one select; odd in ``x`` as written
    (``m`` is ``+0`` at ``x = +-0``, so ``-0`` stays ``-0``).

    The doubling damps the rational's rounding errors by ``(1 - v^2) / (1 + v^2)``, which is small where they are
    largest (``|x|`` of a few units and up). Measured against long double ``tanh`` on 6.6e6 points: <= 1.63 ulp
    (ATen's 0.75, Sleef's 1.0; Cephes' formula, used before, 1.39); ``+-0`` and subnormals as they are, ``+-1`` from
    ``|x| = 19.1`` on (``+-inf`` included), NaN stays NaN (the clamps propagate it)."""
    from torch._inductor.virtualized import ops

    def c(v: float) -> Any:
        return ops.constant(v, torch.float64)

    a = ops.maximum(ops.minimum(x, c(_TANH_CLAMP64)), c(-_TANH_CLAMP64))
    h = ops.mul(a, c(0.5))
    s = ops.mul(h, h)

    def horner(coefs: tuple) -> Any:
        acc = c(coefs[-1])
        for coef in coefs[-2::-1]:
            acc = ops.fma(acc, s, c(coef))
        return acc

    m = ops.fma(s, ops.truediv(horner(_TANH_DIF64), horner(_TANH_DEN64)), c(0.0))  # s D / Q, but +0 at s = 0
    u = ops.fma(a, m, a)
    v = ops.mul(u, c(0.5))
    small = ops.lt(s, c(_TANH_SMALL64 ** 2 / 4))  # |a| < _TANH_SMALL64 (the bound's square over 4 is exact)
    r = ops.truediv(ops.where(small, ops.fma(ops.neg(v), v, m), u), ops.fma(v, v, c(1.0)))
    return ops.where(small, ops.fma(a, r, a), r)


class thin_products(_InductorPatch):
    """While compiling on the CPU: let Inductor write matrix products with a short inner dimension (at most ``inner``
    terms) as fused loops rather than a library ``mm``/``addmm`` call each (Inductor does so by default only for
    products with one row): a field's first layer on a state of a few components in the forward loop
    (:data:`LOOP_THIN_INNER`), the weight gradients of a small state in the compiled backward pass
    (:func:`neurodyn.compile.train.decompose_thin_products`). Performance only; a no-op where this torch has no such
    pass.

    Examples
    --------
    >>> with thin_products(8):
    ...     pass  # torch.compile calls made here fuse products with <= 8 terms
    """

    def __init__(self, inner: int):
        self.inner = inner

    @classmethod
    def locate(cls) -> tuple[Any, str]:
        from torch._inductor.fx_passes import decompose_mem_bound_mm
        return decompose_mem_bound_mm, "should_decompose_mm"

    def replace(self, saved: Callable) -> Callable:
        inner = self.inner

        def rule(mat1, mat2) -> bool:
            if saved(mat1, mat2):
                return True
            a, b = (getattr(m, "meta", {}).get("val") for m in (mat1, mat2))
            return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() == 2 and b.dim() == 2
                    and a.device.type == "cpu" and b.device.type == "cpu"
                    and isinstance(a.shape[1], int) and a.shape[1] <= inner
                    and all(isinstance(d, int) for d in (*a.shape, *b.shape)))

        return rule


class small_cats(_InductorPatch):
    """While compiling on the CPU: a concatenation of at most ``parts`` tensors of one dtype, each of size 1 along the
    joined dimension (``torch.stack`` of a field's few components along the last dimension, or of a few scalars), is
    written as one fused loop into one buffer; Inductor's own lowering writes each part through a view of the output,
    and inside a compiled ``while_loop`` every such view is a tensor object created and freed at each iteration. Same
    values (each element is its part's value). Performance only; a no-op where this torch has no such lowering.

    Examples
    --------
    >>> with small_cats(8):
    ...     pass  # torch.compile calls made here write small stacks as one loop
    """

    item = True

    def __init__(self, parts: int):
        self.parts = parts

    @classmethod
    def locate(cls) -> tuple[Any, Any]:
        from torch._inductor import lowering
        op = torch.ops.aten.cat.default
        lowering.lowerings[op]  # noqa: B018 (present in this torch?)
        lowering.pointwise_cat  # noqa: B018
        return lowering.lowerings, op

    def replace(self, saved: Callable) -> Callable:
        from torch._inductor import lowering
        parts = self.parts

        def lower(inputs, dim=0):
            try:
                size = inputs[0].get_size()
                d = dim + len(size) if dim < 0 else dim
                dtype = inputs[0].get_dtype()
                small = (1 < len(inputs) <= parts and inputs[0].get_device().type == "cpu"
                         and all(x.get_dtype() == dtype and len(x.get_size()) == len(size)
                                 and int(x.get_size()[d]) == 1 for x in inputs))
            except (TypeError, AttributeError, IndexError):  # symbolic sizes, other IR: Inductor's own lowering
                small = False
            if not small:
                return saved(inputs, dim)
            out = lowering.pointwise_cat(inputs, d)
            out.realize()
            return out

        return lower


def _no_shim_notice(record: logging.LogRecord) -> bool:
    """False (drop) for Inductor's notice that ``aten.tanh`` has no C shim; True for every other record."""
    try:
        text = record.getMessage()
    except (TypeError, ValueError):  # a malformed record: let logging report it as usual
        return True
    return not ("aten.tanh" in text and "c-shim" in text)



class pooled_loop_buffers(_InductorPatch):
    """While compiling on the CPU with Inductor's C++ wrapper: the scratch buffers of each compiled ``while_loop`` are
    allocated once per call, before the loop, instead of at every iteration (:func:`neurodyn.compile.pool.
    pool_loop_buffers`: the wrapper code is rewritten just before Inductor adds its return statement). Same kernels
    on the same data: bit-identical outputs. Performance only; a no-op where this torch has no such wrapper, and code
    the rewrite does not recognise is left as Inductor wrote it.

    Examples
    --------
    >>> with pooled_loop_buffers():
    ...     pass  # torch.compile calls made here allocate their loops' buffers once
    """

    @classmethod
    def locate(cls) -> tuple[Any, str]:
        from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
        return CppWrapperCpu, "generate_return"

    def replace(self, saved: Callable) -> Callable:
        from .pool import pool_loop_buffers

        def generate_return(wrapper, output_refs):
            code = getattr(wrapper, "wrapper_call", None)
            lines = getattr(code, "_lines", None)
            if isinstance(lines, list):
                try:
                    new, pooled = pool_loop_buffers(lines)
                except Exception:  # noqa: BLE001 (an unforeseen form of code: left as Inductor wrote it)
                    new, pooled = lines, 0
                if pooled:
                    lines[:] = new
            return saved(wrapper, output_refs)

        return generate_return
