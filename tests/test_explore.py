"""``neurodyn explore``'s JSON API and numbers (FastAPI's TestClient; the browser test is test_explore_browser.py)."""

from __future__ import annotations

import json
import math
import shutil
import socket
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the explore extra (fastapi, uvicorn, httpx) is not installed")
pytest.importorskip("httpx", reason="the explore extra (fastapi, uvicorn, httpx) is not installed")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's deprecation notice for its TestClient on httpx
    from fastapi.testclient import TestClient

from neurodyn.cli import main  # noqa: E402
from neurodyn.explore.app import MAX_POINTS, create_app  # noqa: E402
from neurodyn.explore.models import QUICK, latent_posterior, linear_fit, load_or_train  # noqa: E402


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("explore-cache")


@pytest.fixture(scope="module")
def models(cache_dir):
    return load_or_train(QUICK, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def client(models):
    return TestClient(create_app(models))


def _numpy_linear_accuracy(z: np.ndarray, y: np.ndarray, z_eval: np.ndarray, y_eval: np.ndarray) -> float:
    a = np.concatenate([z, np.ones((len(z), 1))], 1)
    w = np.linalg.lstsq(a.astype(np.float64), y.astype(np.float64), rcond=None)[0]
    pred = np.concatenate([z_eval, np.ones((len(z_eval), 1))], 1) @ w >= 0
    return float(np.mean(pred == (y_eval > 0)))


# ------------------------------------------------------------------------------------------------------ numbers
def test_rings_accuracy_near_chance_at_t0_and_high_for_anode_at_t1(client, models):
    r0 = client.post("/api/rings", json={"t": 0.0}).json()["models"]
    r1 = client.post("/api/rings", json={"t": 1.0}).json()["models"]
    # at t = 0 the state is the input (padded with zeros): rings are not linearly separable, half the points each
    for name in ("node", "anode"):
        assert 0.4 <= r0[name]["accuracy"] <= 0.6, (name, r0[name]["accuracy"])
    assert r1["anode"]["accuracy"] >= 0.95
    # the same number from numpy's least squares on z(1) from the model's own forward pass (NeuralODE over [0, 1])
    for name in ("node", "anode"):
        m = models.rings[name].model
        with torch.no_grad():
            z_fit = m.ode(m.augment(models.x_linear)).numpy()
            z_show = m.ode(m.augment(models.x_display)).numpy()
        ref = _numpy_linear_accuracy(z_fit, models.y_linear.numpy(), z_show, models.y_display.numpy())
        assert abs(r1[name]["accuracy"] - ref) <= 2 / len(models.y_display), (name, r1[name]["accuracy"], ref)
        assert r1[name]["state_dim"] == (2 if name == "node" else 2 + QUICK.aug_dim)


def test_rings_points_are_the_flow_projected(client, models):
    body = client.post("/api/rings", json={"t": 0.5, "models": ["anode"]}).json()
    assert list(body["models"]) == ["anode"]
    rm = models.rings["anode"]
    from neurodyn import solve

    with torch.no_grad():
        z = solve(lambda t, y: rm.model.func(y), rm.model.augment(models.x_display), torch.tensor([0.0, 0.5]),
                  method="rk4", step_size=0.01).ys[-1]
    got = torch.tensor(body["models"]["anode"]["points"])
    assert got.shape == (len(models.y_display), 2)
    torch.testing.assert_close(got, z @ rm.basis, atol=5e-3, rtol=0)
    t0 = torch.tensor(client.post("/api/rings", json={"t": 0.0}).json()["models"]["anode"]["points"])
    assert float((got - t0).abs().max()) > 0.05  # the slider moves the points


def test_linear_fit_matches_numpy():
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(50, 4, generator=g), torch.randn(50, generator=g).sign()
    a = np.concatenate([z.numpy(), np.ones((50, 1))], 1).astype(np.float64)
    ref = np.linalg.lstsq(a, y.numpy().astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(linear_fit(z, y).numpy(), ref, rtol=1e-5, atol=1e-6)


POINTS = [{"t": 0.3, "x": 1.2}, {"t": 2.0, "x": 0.4}, {"t": 1.1, "x": 1.9}, {"t": 3.7, "x": 1.0}]


def test_latent_posterior_mean_equals_the_model_called_directly(client, models):
    body = client.post("/api/latent", json={"points": POINTS}).json()
    assert body["n_points"] == len(POINTS)
    pts = sorted((p["t"], p["x"]) for p in POINTS)
    t = torch.tensor([p[0] for p in pts])
    x = torch.tensor([p[1] for p in pts])[None, :, None]
    grid = torch.tensor(body["grid"])
    assert float(grid[0]) == 0.0 and float(grid[-1]) == QUICK.t_max
    with torch.no_grad():
        pred, _ = models.latent(x, t, torch.ones_like(x), grid, use_mean=True)
    np.testing.assert_allclose(body["mean"], pred[0, 0, :, 0].numpy(), rtol=1e-5, atol=1e-5)
    # the band: mean +- 2 std of decoded posterior samples z0 = mean + std * eps (eps seeded as documented)
    with torch.no_grad():
        mean, std, t0 = models.latent.encode(x, t, torch.ones_like(x), grid[0])
        eps = torch.randn((32, 1, mean.shape[1]), generator=torch.Generator().manual_seed(0))
        samples = models.latent.decode(mean + std * eps, t0, grid)["pred"][:, 0, :, 0]
    np.testing.assert_allclose(body["upper"], (samples.mean(0) + 2 * samples.std(0)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(body["lower"], (samples.mean(0) - 2 * samples.std(0)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(body["samples"], samples[:5].numpy(), rtol=1e-4, atol=1e-5)


def test_latent_order_invariant_and_points_change_the_band(client):
    a = client.post("/api/latent", json={"points": POINTS}).json()
    b = client.post("/api/latent", json={"points": POINTS[::-1]}).json()
    assert a["mean"] == b["mean"] and a["upper"] == b["upper"]
    c = client.post("/api/latent", json={"points": POINTS + [{"t": 4.5, "x": 2.5}]}).json()
    assert max(abs(u - v) for u, v in zip(a["upper"], c["upper"])) > 1e-4


def test_latent_prior_when_no_points_and_ties_allowed(client, models):
    body = client.post("/api/latent", json={"points": []}).json()
    grid = torch.tensor(body["grid"])
    with torch.no_grad():
        ref = models.latent.decode(torch.zeros(1, 1, QUICK.latent_size), grid[0], grid)["pred"][0, 0, :, 0]
    np.testing.assert_allclose(body["mean"], ref.numpy(), rtol=1e-5, atol=1e-5)
    tie = client.post("/api/latent", json={"points": [{"t": 1.0, "x": 1.0}, {"t": 1.0, "x": 1.5}]})
    assert tie.status_code == 200 and all(math.isfinite(v) for v in tie.json()["mean"])


def test_latent_prior_band_is_the_decoded_standard_normal(models):
    grid = torch.linspace(0.0, 5.0, 51)
    prior = latent_posterior(models.latent, torch.empty(0), torch.empty(0), grid, n_samples=8, seed=4)
    assert prior["z0_std"].tolist() == [1.0] * QUICK.latent_size
    eps = torch.randn((8, 1, QUICK.latent_size), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = models.latent.decode(eps, grid[0], grid)["pred"][:, 0, :, 0]
    np.testing.assert_allclose(prior["samples"].numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prior["upper"].numpy(), (ref.mean(0) + 2 * ref.std(0)).numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- bad requests
BAD = [
    ("/api/rings", '{"t": ', 400, "malformed JSON"),
    ("/api/latent", '{"points": [{"t": 1, "x": 2}', 400, "malformed JSON"),
    ("/api/rings", '{"t": NaN}', 422, "finite"),
    ("/api/rings", '{"t": Infinity}', 422, "finite"),
    ("/api/rings", '{"t": 1.5}', 422, "less than or equal to 1"),
    ("/api/rings", '{"t": -0.1}', 422, "greater than or equal to 0"),
    ("/api/rings", '{"t": "soon"}', 422, "valid number"),
    ("/api/rings", '{}', 422, "t: Field required"),
    ("/api/rings", '{"t": 0.5, "models": ["resnet"]}', 422, "'node' or 'anode'"),
    ("/api/rings", '{"t": 0.5, "models": []}', 422, "at least 1"),
    ("/api/rings", '{"t": 0.5, "depth": 3}', 422, "Extra inputs"),
    ("/api/rings", '[0.5]', 422, "dictionary"),
    ("/api/latent", '{"points": [{"t": 9.0, "x": 0.0}]}', 422, "t=9 is outside [0, 5]"),
    ("/api/latent", '{"points": [{"t": -1, "x": 0.0}]}', 422, "t=-1 is outside [0, 5]"),
    ("/api/latent", '{"points": [{"t": 1.0, "x": 1e6}]}', 422, "x=1e+06 is outside [-5, 5]"),
    ("/api/latent", '{"points": [{"t": NaN, "x": 0.0}]}', 422, "points.0.t: Input should be a finite number"),
    ("/api/latent", '{"points": [{"t": 1.0, "x": -Infinity}]}', 422, "points.0.x: Input should be a finite number"),
    ("/api/latent", '{"points": [{"t": 1.0}]}', 422, "points.0.x: Field required"),
    ("/api/latent", '{"points": [{"t": 1.0, "x": "high"}]}', 422, "valid number"),
    ("/api/latent", '{"points": {"t": 1.0, "x": 1.0}}', 422, "valid list"),
    ("/api/latent", '{"pts": []}', 422, "points: Field required"),
    ("/api/latent", '"points"', 422, "dictionary"),
    ("/api/latent", "", 422, "Field required"),
]


@pytest.mark.parametrize("url, body, status, words", BAD)
def test_bad_requests_get_a_clear_4xx(client, url, body, status, words):
    r = client.post(url, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()["error"]


def test_too_many_points(client):
    pts = [{"t": 5.0 * i / MAX_POINTS, "x": 1.0} for i in range(MAX_POINTS + 1)]
    r = client.post("/api/latent", json={"points": pts})
    assert r.status_code == 422
    assert f"at most {MAX_POINTS} items" in r.json()["error"]
    assert client.post("/api/latent", json={"points": pts[:MAX_POINTS]}).status_code == 200


def test_other_bad_requests_and_the_server_keeps_serving(client):
    assert client.post("/api/rings", content=b"t=0.5", headers={"Content-Type": "text/plain"}).status_code == 422
    assert client.post("/api/latent", content=b"\xff\xfe", headers={"Content-Type": "application/json"}
                       ).status_code in (400, 422)
    assert client.get("/api/latent").status_code == 405
    assert client.get("/static/missing.js").status_code == 404
    deep = '{"points": ' + "[" * 5000 + "]" * 5000 + "}"
    assert client.post("/api/latent", content=deep, headers={"Content-Type": "application/json"}).status_code in (
        400, 422)
    assert client.post("/api/rings", json={"t": 0.25}).status_code == 200


def test_page_and_assets_are_local(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/static/explore.js">' in page.text
    for asset in ("/static/explore.js", "/static/explore.css"):
        r = client.get(asset)
        assert r.status_code == 200 and len(r.text) > 100
        assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from elsewhere
    assert "http" not in page.text.replace('href="/static', "").replace('src="/static', "")
    info = client.get("/api/info").json()
    assert info["max_points"] == MAX_POINTS and info["t_range"] == [0.0, QUICK.t_max]
    assert len(info["labels"]) == QUICK.n_display


# ---------------------------------------------------------------------------------------------- cache and CLI
def test_cache_is_reused_and_a_broken_cache_is_retrained(tmp_path, cache_dir, models):
    cfg = QUICK
    rings_file = f"explore-rings-{cfg.key('rings')}.pt"
    shutil.copy(cache_dir / rings_file, tmp_path / rings_file)
    (tmp_path / f"explore-latent-{cfg.key('latent')}.pt").write_bytes(b"not a torch file")
    lines: list[str] = []
    first = load_or_train(cfg, cache_dir=tmp_path, log=lines.append)
    assert any("unreadable" in s for s in lines)
    assert f"rings: built in, loaded from the cache {tmp_path / rings_file}" in first.source
    assert "latent ODE: built in, trained at startup" in first.source and list(first.train_seconds) == ["latent"]
    again = load_or_train(cfg, cache_dir=tmp_path)
    assert again.source.count("loaded from the cache") == 2 and again.train_seconds == {}
    # deterministic: the module's latent ODE (trained in another directory) has the same weights
    for a, b, c in zip(models.latent.state_dict().values(), first.latent.state_dict().values(),
                       again.latent.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_models_from_the_demos_saved_runs(tmp_path):
    from neurodyn.demos import circles, latent

    runs = tmp_path / "runs"
    ccfg = circles.CirclesConfig(out=str(runs / "circles"), iters=8, iters_1d=2, n_train=64, n_test=128, evals=1,
                                 aug_dim=2, plots=False)
    metrics = circles.train(ccfg, stream=open(tmp_path / "log.txt", "w"))  # noqa: SIM115
    lcfg = latent.LatentConfig(out=str(runs / "latent"), n_series=20, budget=1e-3, epochs=1, extrap_share=0.0,
                               plots=False)
    latent.train(lcfg)
    lines: list[str] = []
    m = load_or_train(QUICK, cache_dir=tmp_path / "cache", runs_dir=runs, log=lines.append)
    assert f"rings: the circles demo's run {runs / 'circles'}" in m.source
    assert f"latent ODE: the latent demo's run {runs / 'latent'}" in m.source
    assert not (tmp_path / "cache").exists()  # nothing built in was needed
    assert m.rings["anode"].basis.shape == (4, 2) and m.latent.latent_size == 10
    # the loaded ANODE is the demo's: its head accuracy on the demo's test set is the one in metrics.json
    gen = torch.Generator().manual_seed(ccfg.seed)
    circles.make_rings(ccfg.n_train, gen)
    x_te, y_te = circles.make_rings(ccfg.n_test, gen)
    with torch.no_grad():
        out = m.rings["anode"].model(x_te).squeeze(-1)
    acc = float((torch.where(out >= 0, 1.0, -1.0) == y_te).float().mean())
    assert acc == pytest.approx(metrics["anode"]["accuracy"], abs=1e-6)
    # a broken run falls back to the built-in model, saying why
    (runs / "latent" / "interpolation_model.pt").write_bytes(b"junk")
    m2 = load_or_train(QUICK, cache_dir=tmp_path / "cache", runs_dir=runs, log=lines.append)
    assert "latent ODE: built in" in m2.source and any("cannot use" in s for s in lines)


@pytest.mark.parametrize("port, words", [("0", "out of range"), ("70000", "out of range"), ("web", "not a port")])
def test_cli_rejects_bad_ports(capsys, port, words):
    with pytest.raises(SystemExit) as exc:
        main(["explore", "--port", port])
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_cli_port_in_use(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["explore", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err


def test_cli_without_the_extra(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["explore"]) == 2
    assert "pip install 'neurodyn[explore]'" in capsys.readouterr().err


def test_info_is_json_serialisable(client):
    json.dumps(client.get("/api/info").json(), allow_nan=False)
