"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny problems: intra-op threads only add contention on a loaded machine. One thread for the module, restored
    after it (``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_compile_caches():
    """Inductor's graph cache and AOTAutograd's cache off for one test, so compile-time passes run (restored after;
    ``monkeypatch.setattr`` on these config modules deletes the entry on undo instead of restoring it)."""
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(
            enable_autograd_cache=False):
        yield


@pytest.fixture
def compiled_adjoint_calls(monkeypatch):
    """A list recording, per evaluation that neurodyn.compile.adjoint's compiled programs were asked for, whether a
    program gave the values (True) or the evaluation fell back to eager (False)."""
    pytest.importorskip("torch._inductor")
    from neurodyn.compile import adjoint as compiled_adjoint

    calls = []
    run = compiled_adjoint.AdjointFields._run

    def spy(self, *args):
        out = run(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(compiled_adjoint.AdjointFields, "_run", spy)
    return calls
