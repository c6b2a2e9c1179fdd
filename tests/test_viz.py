"""neurodyn.viz: each plot function returns Axes holding exactly the data it was given (Agg canvas)."""

from __future__ import annotations

import doctest
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import neurodyn
from neurodyn import viz

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def rot(t, y):
    """Rotation field (y1, -y0): solution y0 cos t + y1 sin t, ..."""
    return torch.stack([y[..., 1], -y[..., 0]], -1)


def exact_rotation(ts, y0):
    c, s = torch.cos(ts)[:, None, None], torch.sin(ts)[:, None, None]
    return torch.stack([y0[..., 0] * c[..., 0] + y0[..., 1] * s[..., 0],
                        -y0[..., 0] * s[..., 0] + y0[..., 1] * c[..., 0]], -1)


@pytest.fixture
def ax():
    return viz.new_figure((4.0, 3.0)).subplots()


@pytest.fixture
def batch_solution():
    y0 = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]], dtype=torch.float64)
    ts = torch.linspace(0, 3, 31, dtype=torch.float64)
    return neurodyn.solve(rot, y0, ts, rtol=1e-10, atol=1e-12, dense=True), y0


def test_plot_solution_lines_are_the_solution(ax, batch_solution):
    sol, y0 = batch_solution
    out = viz.plot_solution(sol, ax=ax)
    assert out is ax
    assert len(ax.lines) == 3 * 2  # samples x components, samples outermost
    exact = exact_rotation(sol.ts, y0).numpy()
    for s in range(3):
        for c in range(2):
            line = ax.lines[2 * s + c]
            np.testing.assert_array_equal(line.get_xdata(), sol.ts.numpy())
            np.testing.assert_allclose(line.get_ydata(), exact[:, s, c], atol=1e-8)  # against the closed form
            assert line.get_color() == f"C{c}"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["y[0]", "y[1]"]


def test_plot_solution_selection_dense_and_pairs(batch_solution):
    sol, y0 = batch_solution
    ax = viz.plot_solution(sol, ax=viz.new_figure().subplots(), samples=[2], components=[1], labels=["v"])
    assert len(ax.lines) == 1
    np.testing.assert_allclose(ax.lines[0].get_ydata(), exact_rotation(sol.ts, y0)[:, 2, 1].numpy(), atol=1e-8)

    ax = viz.plot_solution(sol, ax=viz.new_figure().subplots(), samples=1, dense=200, markers=True)
    t_line = ax.lines[0].get_xdata()
    assert len(t_line) == 200 and t_line[0] == 0.0 and t_line[-1] == pytest.approx(3.0)
    dense_exact = exact_rotation(torch.as_tensor(t_line), y0).numpy()
    np.testing.assert_allclose(ax.lines[1].get_ydata(), dense_exact[:, 0, 1], atol=1e-8)
    assert len(ax.lines) == 4  # 2 dense curves + 2 marker lines at the outputs
    np.testing.assert_array_equal(ax.lines[2].get_xdata(), sol.ts.numpy())

    ts = torch.linspace(0, 1, 5)
    ax = viz.plot_solution((ts, torch.exp(-ts)), ax=viz.new_figure().subplots())  # a (ts, ys) pair, 1-d state
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.exp(-np.linspace(0, 1, 5)), rtol=1e-6)
    assert ax.get_legend() is None


def test_plot_solution_bad_input(batch_solution):
    sol, _ = batch_solution
    with pytest.raises(ValueError, match="components"):
        viz.plot_solution(sol, ax=viz.new_figure().subplots(), components=[5])
    with pytest.raises(ValueError, match="sample indices"):
        viz.plot_solution(sol, ax=viz.new_figure().subplots(), samples=[7])
    with pytest.raises(ValueError, match="complex"):
        viz.plot_solution((torch.zeros(3), torch.zeros(3, 2, dtype=torch.complex64)), ax=viz.new_figure().subplots())
    with pytest.raises(TypeError, match="Solution or a \\(ts, ys\\) pair"):
        viz.plot_solution("sol")


def test_plot_phase(ax, batch_solution):
    sol, y0 = batch_solution
    out = viz.plot_phase(sol, ax=ax, samples=2)
    assert out is ax and len(ax.lines) == 2
    exact = exact_rotation(sol.ts, y0).numpy()
    for s in range(2):
        np.testing.assert_allclose(ax.lines[s].get_xydata(), exact[:, s, :], atol=1e-8)
    np.testing.assert_allclose(ax.collections[0].get_offsets(), y0[:2].numpy())  # start markers
    swapped = viz.plot_phase(sol.ys, ax=viz.new_figure().subplots(), dims=(1, 0), start=False)
    np.testing.assert_allclose(swapped.lines[0].get_xydata(), exact[:, 0, ::-1], atol=1e-8)
    assert not swapped.collections
    with pytest.raises(ValueError, match="D >= 2"):
        viz.plot_phase(torch.zeros(4, 3, 1))
    with pytest.raises(ValueError, match="two different components"):
        viz.plot_phase(sol, dims=(0, 0))


def test_plot_vector_field_quiver_and_stream(ax):
    out = viz.plot_vector_field(rot, ax=ax, xlim=(-1.0, 1.0), ylim=(-2.0, 2.0), n=5)
    assert out is ax
    q = ax.collections[0]
    X, Y = np.meshgrid(np.linspace(-1, 1, 5), np.linspace(-2, 2, 5))
    r = np.hypot(X, Y).ravel()
    r_safe = np.maximum(r, 1e-12)
    np.testing.assert_allclose(q.U, np.where(r > 0, Y.ravel() / r_safe, 0.0), atol=1e-6)  # unit arrows
    np.testing.assert_allclose(q.V, np.where(r > 0, -X.ravel() / r_safe, 0.0), atol=1e-6)
    np.testing.assert_allclose(q.get_array(), r, atol=1e-6)  # coloured by speed |f| = r
    assert ax.get_xlim() == (-1.0, 1.0) and ax.get_ylim() == (-2.0, 2.0)

    raw = viz.plot_vector_field(lambda t, y: y * (1.0 + t), ax=viz.new_figure().subplots(), t=1.0, n=3,
                                normalize=False).collections[0]
    X, Y = np.meshgrid(np.linspace(-2, 2, 3), np.linspace(-2, 2, 3))
    np.testing.assert_allclose(raw.U, 2.0 * X.ravel())  # f evaluated at t = 1
    np.testing.assert_allclose(raw.V, 2.0 * Y.ravel())

    class Field(torch.nn.Module):  # a module f(t, y): evaluated in its parameters' dtype (float64 here)
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2).double()

        def forward(self, t, y):
            return self.lin(y)

    field = Field()
    stream = viz.plot_vector_field(field, ax=viz.new_figure().subplots(), kind="stream", n=8)
    assert stream.collections  # the stream lines
    q = viz.plot_vector_field(field, ax=viz.new_figure().subplots(), n=3, normalize=False).collections[0]
    grid = torch.tensor(np.stack(np.meshgrid(np.linspace(-2, 2, 3), np.linspace(-2, 2, 3)), -1).reshape(-1, 2))
    with torch.no_grad():
        np.testing.assert_allclose(q.U, field.lin(grid)[:, 0].numpy(), rtol=1e-12)


def test_plot_vector_field_bad_input():
    with pytest.raises(ValueError, match="xlim"):
        viz.plot_vector_field(rot, xlim=(1.0, -1.0))
    with pytest.raises(ValueError, match="kind"):
        viz.plot_vector_field(rot, kind="arrows")
    with pytest.raises(ValueError, match="must return a tensor of the points' shape"):
        viz.plot_vector_field(lambda t, y: y.sum(-1), ax=viz.new_figure().subplots())


def test_plot_density_function_and_samples(ax):
    log_prob = lambda y: -0.5 * (y**2).sum(-1) - math.log(2 * math.pi)  # standard normal
    out = viz.plot_density(log_prob, ax=ax, xlim=(-3, 3), ylim=(-2, 2), n=7, batch_size=10)  # 5 chunks
    assert out is ax
    X, Y = np.meshgrid(np.linspace(-3, 3, 7), np.linspace(-2, 2, 7))
    expected = np.exp(-0.5 * (X**2 + Y**2)) / (2 * np.pi)
    np.testing.assert_allclose(np.asarray(ax.collections[0].get_array()).reshape(7, 7), expected, rtol=1e-6)
    logged = viz.plot_density(log_prob, ax=viz.new_figure().subplots(), n=4, log=True)
    X, Y = np.meshgrid(np.linspace(-4, 4, 4), np.linspace(-4, 4, 4))
    np.testing.assert_allclose(np.asarray(logged.collections[0].get_array()).reshape(4, 4),
                               -0.5 * (X**2 + Y**2) - math.log(2 * math.pi), rtol=1e-6)

    # samples: 2 x 2 bins of area 0.25 on the unit square; density = count / (N * area)
    pts = torch.tensor([[0.1, 0.1], [0.2, 0.3], [0.6, 0.1], [0.7, 0.8]])
    hist = viz.plot_density(pts, ax=viz.new_figure().subplots(), xlim=(0, 1), ylim=(0, 1), n=2)
    np.testing.assert_allclose(np.asarray(hist.collections[0].get_array()).reshape(2, 2), [[2.0, 1.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        viz.plot_density(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="log-densities"):
        viz.plot_density(lambda y: y, ax=viz.new_figure().subplots(), n=3)


def test_default_axes_come_from_pyplot(batch_solution):
    import matplotlib.pyplot as plt

    sol, _ = batch_solution
    ax = viz.plot_solution(sol)
    try:
        assert ax.figure in [plt.figure(n) for n in plt.get_fignums()]
    finally:
        plt.close(ax.figure)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(viz.MissingMatplotlib, match=r"neurodyn\[demo\]"):
        viz.new_figure()
    with pytest.raises(ImportError, match=r"neurodyn\[demo\]"):
        viz.plot_vector_field(rot)
    with pytest.raises(ImportError, match=r"neurodyn\[demo\]"):
        viz.plot_density(torch.randn(10, 2))


def test_import_viz_does_not_import_matplotlib():
    code = "import sys, neurodyn.viz; print('matplotlib' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_loss_curve_panels_and_legends_clear_of_the_points(tmp_path):
    losses = list(np.geomspace(1.0, 1e-3, 200) * (1 + 0.3 * np.sin(np.arange(200))))
    eval_iters = list(range(20, 201, 20))
    eval_values = list(np.geomspace(0.5, 1e-3, 10))
    eval_values[3] = None  # a failed evaluation: a gap
    path = viz.plot_loss_curve(losses, tmp_path / "loss.png", eval_iters=eval_iters, eval_values=eval_values,
                               vlines=[(160, "windows grow")], title="t")
    assert path.stat().st_size > 1000
    # the function writes the file and returns its path: catch the figure at savefig to inspect it
    import matplotlib.figure

    captured = {}
    original = matplotlib.figure.Figure.savefig

    def keep(self, *args, **kwargs):
        captured["fig"] = self
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.figure.Figure, "savefig", keep)
        viz.plot_loss_curve(losses, tmp_path / "loss2.png", eval_iters=eval_iters, eval_values=eval_values,
                            vlines=[(160, "windows grow")])
    fig = captured["fig"]
    top, bottom = fig.axes[:2]
    assert top is not bottom and len(fig.axes) == 2  # window loss and full-trajectory error on separate axes
    eval_line = [ln for ln in bottom.lines if ln.get_marker() == "o"][0]
    np.testing.assert_array_equal(eval_line.get_xdata(), eval_iters)
    assert np.isnan(eval_line.get_ydata()[3])
    assert not any(ln.get_marker() == "o" for ln in top.lines)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for a in (top, bottom):
        box = a.get_legend().get_window_extent(renderer)
        plot_area = a.get_window_extent(renderer)
        assert box.y0 >= plot_area.y1 - 1  # above the plotting area: it hides no data
        pts = [ln.get_xydata() for ln in a.lines if len(ln.get_xydata()) > 2]
        for xy in pts:
            disp = a.transData.transform(xy[np.isfinite(xy).all(1)])
            inside = ((disp[:, 0] > box.x0) & (disp[:, 0] < box.x1) & (disp[:, 1] > box.y0) & (disp[:, 1] < box.y1))
            assert not inside.any()


def test_viz_doctests():
    result = doctest.testmod(viz, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


def test_readme_plotting_example(tmp_path, monkeypatch):
    """The README's plotting example runs as written and draws what it says."""
    import re
    from pathlib import Path

    import matplotlib.pyplot as plt

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- plotting[^>]*-->\n```python\n(.*?)^```", readme, flags=re.S | re.M).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(block, "README.md plotting", "exec"), namespace)
    fig = namespace["fig"]
    try:
        ax1, ax2 = fig.axes[:2]
        assert len(ax1.lines) == 2 * 2 and len(ax1.lines[0].get_xdata()) == 400
        assert len(ax2.lines) == 8 and ax2.collections  # 8 trajectories over the quiver
        assert (tmp_path / "oscillator.png").stat().st_size > 10_000
    finally:
        plt.close(fig)


def test_plot_density_of_a_cnf_integrates_to_one():
    """A CNF's ``log_prob`` (exact trace, autograd inside) drawn on a grid: the density's Riemann sum over
    [-5, 5]^2 is 1 (a base normal pushed through a flow keeps its mass; tails beyond 5 are < 1e-5)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    cnf = neurodyn.CNF(net, 2, rtol=1e-6, atol=1e-6)
    ax = viz.plot_density(cnf.log_prob, ax=viz.new_figure().subplots(), xlim=(-5, 5), ylim=(-5, 5), n=41)
    density = np.asarray(ax.collections[0].get_array())
    assert density.shape == (41, 41) and (density > 0).all()
    assert density.sum() * (10 / 40) ** 2 == pytest.approx(1.0, abs=5e-3)
