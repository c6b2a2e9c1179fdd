"""The cost of the demo cde's per-batch re-drop (``--redrop``): recomputing a training batch's NeuralCDE path.

On JapaneseVowels at 70% dropped (the demo's defaults: cumsum + basepoint, 25 path channels; the 216 training series
of seed 0 in batches of 32) with hidden 64, one thread: the median over the batches of (a) the path of a re-dropped
batch (probability 0.2: :func:`neurodyn.demos.cde.cde_input` and ``series_coeffs``), (b) a training step
(forward, backward, AdamW) on the batch's fixed path, (c) the re-drop, the path and the step together. The re-drop
is written out here, so the script also runs on trees without ``--redrop``: alternate an old and a new tree,

    PYTHONPATH=/tmp/old/src taskset -c 1 python benchmarks/bench_cde_redrop.py --label old
    PYTHONPATH=src taskset -c 1 python benchmarks/bench_cde_redrop.py --label new
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import neurodyn.demos.cde as demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="tree")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the batches per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = demo.replace(demo.CDEConfig(), cde_hidden=64)
    data = demo._data(cfg)
    train, _ = demo.split_validation(data["train"], 0.2, 0)
    d = demo._with_drop(train, 0.7, 0, cfg, "NeuralCDE")
    gen = torch.Generator().manual_seed(0)

    def redropped(b: dict) -> dict:
        observed = b["mask"].amax(-1) > 0
        keep = observed & (torch.rand(observed.shape, generator=gen) >= 0.2)
        keep = torch.where((keep.sum(-1) >= 2)[:, None], keep, observed)
        k = keep[..., None].to(b["mask"].dtype)
        b = {**b, "mask": b["mask"] * k, "x": b["x"] * k}
        grid, lengths = demo.cde_grid(b, cfg.augment)
        v = demo.cde_input(b, cfg.time_scale, cfg.intensity, cfg.augment, cfg.extra)
        return {**b, "coeffs": demo.series_coeffs(v, grid, lengths)}

    order = torch.randperm(len(d["y"]), generator=torch.Generator().manual_seed(1))
    batches = [demo._rows(d, idx) for idx in order.split(cfg.batch_size)]
    torch.manual_seed(0)
    model = demo.make_model("NeuralCDE", data["channels"], data["classes"], cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(b: dict) -> None:
        loss = torch.nn.functional.cross_entropy(model(b), b["y"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def median_ms(fn) -> float:
        times = []
        for _ in range(args.rounds):
            for b in batches:
                t0 = time.perf_counter()
                fn(b)
                times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    step(redropped(batches[0]))  # warm-up
    path, plain, both = median_ms(redropped), median_ms(step), median_ms(lambda b: step(redropped(b)))
    print(f"{args.label}: path {path:.1f} ms, step on a fixed path {plain:.1f} ms, re-drop + path + step "
          f"{both:.1f} ms per batch of {cfg.batch_size}")


if __name__ == "__main__":
    main()
