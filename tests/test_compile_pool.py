"""Scratch buffers of compiled while_loops allocated once per call (compile.pool, patches.pooled_loop_buffers)."""

from __future__ import annotations

import pytest
import torch
from problems import TanhMLP

import neurodyn as nd
from neurodyn.compile import patches, pool

ALLOC = ("AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(2, int_array_1, int_array_2, "
         "cached_torch_dtype_float64, cached_torch_device_type_cpu, 0, &{0}_handle));")


def _buffer(name: str, indent: str = "        ") -> list[str]:
    return [f"{indent}AtenTensorHandle {name}_handle;", indent + ALLOC.format(name),
            f"{indent}RAIIAtenTensorHandle {name}({name}_handle);"]


def _input(inner: str, outer: str, indent: str = "        ") -> list[str]:
    return [f"{indent}AtenTensorHandle {inner}_handle;",
            f"{indent}AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_assign_tensors_out({outer}, &{inner}_handle));",
            f"{indent}RAIIAtenTensorHandle {inner}({inner}_handle);"]


def _loop(body: list[str]) -> list[str]:
    return ["    static constexpr int64_t int_array_1[] = {1L, 64L};",
            "    static constexpr int64_t int_array_2[] = {64L, 1L};",
            "    RAIIAtenTensorHandle slot;",
            "    while (1) {", *body, "    }", "    slot.reset();"]


def test_scratch_buffer_pooled_and_carried_output_left():
    body = [*_input("arg0", "slot"), *_buffer("tmp"), *_buffer("out"),
            "        kernel((const double*)(arg0.data_ptr()), (double*)(tmp.data_ptr()), (double*)(out.data_ptr()));",
            "        auto tmp2 = std::move(tmp);  // reuse",
            "        kernel2((double*)(tmp2.data_ptr()));",
            "        arg0.reset();",
            "        tmp2.reset();",
            "        slot.reset();",
            "        slot = std::move(out);"]
    lines, changed = pool.pool_loop_buffers(_loop(body))
    text = "\n".join(lines)
    assert changed == 3  # tmp pooled, arg0 a reference, the carried out recycled
    assert "auto& tmp = tmp_pool;" in text and "auto& tmp2 = tmp;  // reuse" in text
    assert "tmp2.reset();" not in text and "arg0.reset();" not in text
    assert "auto& arg0 = slot;" in text
    assert "&out_handle));" in text and "out_pool" not in text  # leaves the iteration: not pooled, but recycled
    assert "if (out_spare.get() != nullptr) { out_handle = out_spare.release(); } else { " in text
    assert "if (slot_recycle) { out_spare = std::move(slot); } else { slot.reset(); } slot_recycle = true;" in text
    # the pool is declared once, before the loop, in a block that encloses it
    head = text.index("tmp_pool_handle));")
    assert head < text.index("while (1) {") < text.index("auto& tmp = tmp_pool;")
    assert text.count("{") == text.count("}")


def test_buffers_that_may_leave_the_iteration_are_left():
    body = [*_buffer("a"), *_buffer("b"), *_buffer("c"), *_buffer("d"),
            "        auto av = wrap_with_raii_handle_if_needed(reinterpret_tensor_wrapper(a, 1, int_array_1, "
            "int_array_1, 0L));  // alias",
            "        slot = std::move(av);",  # a view of a, carried
            "        AtenTensorHandle inner_handle;",
            "        AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_assign_tensors_out(b, &inner_handle));",
            "        RAIIAtenTensorHandle inner(inner_handle);",
            "        inner = std::move(other);",  # a nested loop's carried value starting from b
            "        AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_view(c, &cv_handle));",  # may return a view of c
            "        cpp_kernel(d);"]  # the handle itself, not its data pointer
    lines, changed = pool.pool_loop_buffers(_loop(body))
    assert changed == 0 and lines == _loop(body)


def _carried_loop(body: list[str]) -> list[str]:
    return ["    static constexpr int64_t int_array_1[] = {1L, 64L};",
            "    static constexpr int64_t int_array_2[] = {64L, 1L};",
            "    static constexpr int64_t *int_array_3=nullptr;",
            "    RAIIAtenTensorHandle cond_result;",
            "    RAIIAtenTensorHandle slot(initial_handle);",
            "    while (1) {",
            "        AtenTensorHandle c_handle;",
            "        AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(0, int_array_3, int_array_3, "
            "cached_torch_dtype_bool, cached_torch_device_type_cpu, 0, &c_handle));",
            "        RAIIAtenTensorHandle c(c_handle);",
            "        cond_kernel((const double*)(slot.data_ptr()), (bool*)(c.data_ptr()));",
            "        cond_result.reset();",
            "        cond_result = std::move(c);",
            "        bool cond_result_scalar;",
            "        AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_item_bool(cond_result, &cond_result_scalar));",
            "        if (!cond_result_scalar) break;",
            "        auto& arg0 = slot;",
            *body,
            "    }",
            "    use(slot);"]


def test_carried_values_recycled():
    """The condition's result and the body's output, fresh buffers moved into handles declared before the loop:
    the buffer a handle held in the iteration before is the next allocation of the same buffer (from the third
    iteration on), the loop's initial value (first iteration) is freed as before."""
    body = [*_buffer("o"), "        auto o2 = std::move(o);  // reuse",
            "        body_kernel((const double*)(arg0.data_ptr()), (double*)(o2.data_ptr()));",
            "        slot.reset();", "        slot = std::move(o2);"]
    lines, changed = pool.pool_loop_buffers(_carried_loop(body))
    text = "\n".join(lines)
    assert changed == 2
    pre = text.index("while (1) {")
    for decl in ("RAIIAtenTensorHandle c_spare;", "bool cond_result_recycle = false;", "RAIIAtenTensorHandle o_spare;",
                 "bool slot_recycle = false;"):
        assert 0 <= text.index(decl) < pre
    assert "if (c_spare.get() != nullptr) { c_handle = c_spare.release(); } else { AOTI_TORCH_ERROR_CODE_CHECK(" \
           "aoti_torch_empty_strided(0, int_array_3, int_array_3, cached_torch_dtype_bool" in text
    assert "if (cond_result_recycle) { c_spare = std::move(cond_result); } else { cond_result.reset(); } " \
           "cond_result_recycle = true;" in text
    assert "if (o_spare.get() != nullptr) { o_handle = o_spare.release(); } else { " in text
    assert "if (slot_recycle) { o_spare = std::move(slot); } else { slot.reset(); } slot_recycle = true;" in text
    assert text.count("{") == text.count("}")


@pytest.mark.parametrize("line", [
    "        other = std::move(o2);",  # another carried value, not reset first
    "        AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_view(slot, &v_handle));",  # may keep a view of slot
    "        AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_view(o2, &v_handle));",  # may keep a view of the new buffer
    "        keep_kernel(slot);",  # the handle itself, not its data pointer
    "        while (1) {  }",  # a nested loop
])
def test_carried_values_left_where_they_may_be_kept(line):
    body = [*_buffer("o"), "        auto o2 = std::move(o);  // reuse",
            "        body_kernel((const double*)(arg0.data_ptr()), (double*)(o2.data_ptr()));", line,
            "        slot.reset();", "        slot = std::move(o2);"]
    lines, _ = pool.pool_loop_buffers(_carried_loop(body))
    assert not any("_spare" in ln or "_recycle" in ln for ln in lines)


def test_carried_view_left():
    """A carried value that is a view of another buffer (not a buffer allocated in the iteration): nothing recycled,
    the condition's result neither."""
    body = ["        auto v = wrap_with_raii_handle_if_needed(reinterpret_tensor_wrapper(arg0, 2, int_array_1, "
            "int_array_2, 0L));  // alias", "        slot.reset();", "        slot = std::move(v);"]
    lines, _ = pool.pool_loop_buffers(_carried_loop(body))
    assert not any("_spare" in ln or "_recycle" in ln for ln in lines)


def test_non_constant_sizes_and_budget():
    body = ["        const int64_t int_array_9[] = {s0, 2L};",
            "        AtenTensorHandle x_handle;",
            "        AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(2, int_array_9, int_array_2, "
            "cached_torch_dtype_float64, cached_torch_device_type_cpu, 0, &x_handle));",
            "        RAIIAtenTensorHandle x(x_handle);",
            "        kernel((double*)(x.data_ptr()));",
            *_buffer("y"),
            "        kernel((double*)(y.data_ptr()));"]
    _, changed = pool.pool_loop_buffers(_loop(body))
    assert changed == 1  # y only
    _, changed = pool.pool_loop_buffers(_loop(body), budget=64 * 8 - 1)
    assert changed == 0  # y's 512 bytes exceed the budget


def test_code_without_loops_unchanged():
    lines = ["    auto x = 1;", "    kernel(x);"]
    assert pool.pool_loop_buffers(lines) == (lines, 0)



@pytest.mark.slow  # 17 s on one core (two fresh compiles); every default compiled-loop test runs the pooled rewrite
@pytest.mark.skipif(patches.pooled_loop_buffers.locate() is None, reason="no C++ wrapper in this torch")
def test_compiled_loop_pooled_and_bit_identical(monkeypatch, no_compile_caches):
    """The whole loop compiled with and without the rewrite: the rewrite pools buffers, and the outputs are equal."""
    torch._dynamo.reset()
    counts = []
    rewrite = pool.pool_loop_buffers

    def counted(lines, *args):
        out = rewrite(lines, *args)
        counts.append(out[1])
        return out

    monkeypatch.setattr(pool, "pool_loop_buffers", counted)
    y0 = torch.tensor([[0.5, -0.3]], dtype=torch.float64)
    t = torch.linspace(0, 2, 5, dtype=torch.float64)
    plain, pooled = TanhMLP(16), TanhMLP(16)
    saved = patches.pooled_loop_buffers.__enter__
    with torch.no_grad():
        monkeypatch.setattr(patches.pooled_loop_buffers, "__enter__", lambda self: setattr(self, "saved", None))
        a = nd.solve(plain, y0, t, rtol=1e-7, atol=1e-9, compile=True)
        assert not counts
        monkeypatch.setattr(patches.pooled_loop_buffers, "__enter__", saved)
        b = nd.solve(pooled, y0, t, rtol=1e-7, atol=1e-9, compile=True)
    assert a.stats["compiled"] == b.stats["compiled"] == "loop"
    assert counts and max(counts) > 0
    assert torch.equal(a.ys, b.ys)
    assert a.stats["nfe"] == b.stats["nfe"]
