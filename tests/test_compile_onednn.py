"""oneDNN's float32 products in neurodyn's compiled CPU code (patches.onednn_mm, LoopProducts' oneDNN rule): which
products the rule rewrites, and that compiled forward and backward passes with them equal eager's to float32
rounding."""

from __future__ import annotations

import pytest
import torch

from neurodyn.compile import loop as compile_loop
from neurodyn.compile.patches import ONEDNN_MIN_MACS, onednn_mm

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def test_onednn_mm_is_the_product_with_the_transposed_weight():
    g = torch.Generator().manual_seed(0)
    a, wt = torch.randn(300, 48, generator=g), torch.randn(20, 48, generator=g)
    torch.testing.assert_close(onednn_mm(a, wt), a @ wt.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn_mm(a, wt), (a.double() @ wt.double().T).float(), rtol=1e-5, atol=1e-5)


class Spy(compile_loop.CustomGraphPass):
    """The compiled blocks' post-grad pass (BlockProducts), recording each graph's call targets after it."""

    def __init__(self):
        self.graphs = []
        self.inner = compile_loop.GRAPH_OPTIONS["post_grad_custom_post_pass"]

    def uuid(self):
        return None  # no caching: every compilation runs the pass

    def __call__(self, graph):
        self.inner(graph)
        self.graphs.append([n.target for n in graph.nodes if n.op == "call_function"])


def _mlp_loss(x, w1, b1, w2, b2):
    y = x
    for _ in range(2):  # two steps: the weights are read by several products (BlockProducts' rules apply)
        y = y + 0.1 * (torch.tanh(y @ w1.T + b1) @ w2.T + b2)
    return y.square().sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_products_call_onednn_in_float32_and_match_eager(monkeypatch, dtype):
    """Batch 256, 64 -> 128 -> 64 (2.1e6 multiply-adds per product): with the rule on, the forward's products and the
    backward's input-gradient products are oneDNN's in float32 (never in float64); the loss and every gradient equal
    eager's to rounding."""
    monkeypatch.setattr(compile_loop, "ONEDNN_FLOAT32", True)
    assert 256 * 64 * 128 >= ONEDNN_MIN_MACS
    g = torch.Generator().manual_seed(1)
    vals = [torch.randn(256, 64, generator=g), torch.randn(128, 64, generator=g) / 8, torch.randn(128, generator=g),
            torch.randn(64, 128, generator=g) / 11, torch.randn(64, generator=g)]
    vals = [v.to(dtype) for v in vals]
    args = [v.clone().requires_grad_(True) for v in vals]
    ref = [v.clone().requires_grad_(True) for v in vals]
    spy = Spy()
    options = {**compile_loop.GRAPH_OPTIONS, "post_grad_custom_post_pass": spy}
    torch._dynamo.reset()
    loss = torch.compile(_mlp_loss, options=options, fullgraph=True, dynamic=False)(*args)
    loss.backward()
    loss_ref = _mlp_loss(*ref)
    loss_ref.backward()
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, loss_ref, **tol)
    for a, r in zip(args, ref):
        torch.testing.assert_close(a.grad, r.grad, **tol)
    assert len(spy.graphs) == 2  # forward, backward
    op = torch.ops.neurodyn.onednn_mm.default
    counts = [targets.count(op) for targets in spy.graphs]
    if dtype == torch.float32:
        assert counts[0] == 4  # two layers, two steps
        assert counts[1] >= 4  # the input gradients through both layers at both steps
    else:
        assert counts == [0, 0]


def test_small_products_stay_atens(monkeypatch):
    """Below ONEDNN_MIN_MACS multiply-adds (a library call's fixed cost would outweigh oneDNN's faster kernel) the
    products stay ATen's."""
    monkeypatch.setattr(compile_loop, "ONEDNN_FLOAT32", True)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(16, 64, generator=g), torch.randn(128, 64, generator=g)
    assert 16 * 64 * 128 < ONEDNN_MIN_MACS
    spy = Spy()
    options = {**compile_loop.GRAPH_OPTIONS, "post_grad_custom_post_pass": spy}
    torch._dynamo.reset()
    out = torch.compile(lambda x, w: torch.tanh(x @ w.T), options=options, fullgraph=True, dynamic=False)(x, w)
    torch.testing.assert_close(out, torch.tanh(x @ w.T), rtol=1e-5, atol=1e-6)
    assert torch.ops.neurodyn.onednn_mm.default not in spy.graphs[0]
    assert torch.ops.aten.mm.default in spy.graphs[0]
