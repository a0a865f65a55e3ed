"""Training-step throughput: dense vs fixed mask vs BCS, same objective, same hardware, one run.

    python bench/train_step.py            # VGG-16 and ResNet-18, PGD-AT (10 steps), batch 128
    python bench/train_step.py --quick    # a CPU run under a minute: natural objective, batch 16

Prints a table and, as its last line, one JSON object: images/s per (model, method, sparsity), and the
ratios that matter, e.g. bcs_over_fixed_cost (step time of BCS / step time of the fixed mask at equal
sparsity; the goal is <= 1.05) and dense_over_bcs_speed. Methods are interleaved round by round so
drifting clocks or a busy neighbour hit all of them alike; the median step time is reported.

It also times one exact L2 rewiring (`--regrow l2` and `l2-magnitude-seeded`, `_rebirth_near`) on the
BCS state those steps left, over the BCS training step at the same sparsity: l2_rewire_over_step with as
many rebirths as the timed steps had deaths (their median), l2_rewire_over_step_at_10pct with 10 % of the
connections dead (the early-training death rate, a stress case). Goal: <= 0.10. With --quick, only
`l2`, once per case; the quick step (natural objective, batch 16) is far smaller than a training step.
The l2 figure at VGG-16 size, CPU:

    OPENBLAS_NUM_THREADS=1 python bench/train_step.py --models vgg16 --objective pgd-at --batch-size 32 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsp.attacks import PGDConfig  # noqa: E402
from rsp.models import create_model  # noqa: E402
from rsp.objectives import Objective  # noqa: E402
from rsp.sparse import make_sparse  # noqa: E402
from rsp.train import TrainStep  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(model_name, method, sparsity, objective, device, bf16, channels_last):
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).to(device)
    if channels_last and method == "dense":
        model = model.to(memory_format=torch.channels_last)
    sparse = make_sparse(method, model, sparsity, torch.Generator(device).manual_seed(0), model_name=model_name)
    return TrainStep(model, sparse, objective, lr=0.1, bf16=bf16)


def time_l2_rewiring(sparse, dead_count, rule, reps, device, seed=0):
    """Median ms of one exact L2 rewiring of `dead_count` random live connections under `rule`."""
    regrow, ts = sparse.regrow, []
    sparse.regrow = rule
    gen = torch.Generator().manual_seed(seed)
    try:
        for _ in range(reps):
            dead = torch.zeros(sparse.budget, dtype=torch.bool)
            dead[torch.randperm(sparse.budget, generator=gen)[:dead_count]] = True
            dead = dead.to(sparse.slots.device)
            sparse.theta_buf[sparse.slots[dead]] = 0.0
            sparse.buf[dead] = 0.0
            _sync(device)
            t0 = time.perf_counter()
            sparse._rebirth_near(dead)
            _sync(device)
            ts.append(time.perf_counter() - t0)
            assert int((sparse.theta > 0).sum()) == sparse.budget
    finally:
        sparse.regrow = regrow
    return statistics.median(ts) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU run under a minute (natural objective, batch 16)")
    ap.add_argument("--models", default="vgg16,resnet18")
    ap.add_argument("--sparsities", default="0.9,0.99")
    ap.add_argument("--objective", default=None, help="default: pgd-at (natural with --quick)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    quick = args.quick
    objective_name = args.objective or ("natural" if quick else "pgd-at")
    batch = args.batch_size or (16 if quick else 128)
    steps = args.steps or (3 if quick else 20)
    bf16 = channels_last = device.type == "cuda"
    objective = Objective(objective_name, PGDConfig(steps=10))
    sparsities = [float(s) for s in args.sparsities.split(",")]
    configs = [("dense", 0.0)] + [(m, s) for s in sparsities for m in ("fixed", "bcs")]

    results, ratios = {}, {}
    for model_name in args.models.split(","):
        gen = torch.Generator(device).manual_seed(0)
        x = torch.rand(batch, 3, 32, 32, device=device, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), device=device, generator=gen)
        steppers = {c: build(model_name, c[0], c[1], objective, device, bf16, channels_last) for c in configs}
        deaths = {c: [] for c in configs if c[0] == "bcs"}
        for c in deaths:  # the dead count of each timed step's rewiring, read after timing (no sync)
            sparse, rebirth = steppers[c].sparse, steppers[c].sparse._rebirth
            sparse._rebirth = (lambda dead=None, _r=rebirth, _d=deaths[c]: (_d.append(dead.sum()), _r(dead))[1])
        times = {c: [] for c in configs}
        for st in steppers.values():  # warm-up (allocations, cuDNN autotune)
            st(x, y, 0.1, gen)
        _sync(device)
        for _ in range(steps):
            for c, st in steppers.items():
                _sync(device)
                t0 = time.perf_counter()
                st(x, y, 0.1, gen)
                _sync(device)
                times[c].append(time.perf_counter() - t0)
        for (method, sp), ts in times.items():
            med = statistics.median(ts)
            key = f"{model_name}/{method}" + (f"@{sp:g}" if method != "dense" else "")
            results[key] = {"images_per_s": batch / med, "step_ms": med * 1e3}
        for sp in sparsities:
            fixed = statistics.median(times[("fixed", sp)])
            bcs = statistics.median(times[("bcs", sp)])
            dense = statistics.median(times[("dense", 0.0)])
            ratios[f"{model_name}@{sp:g}"] = {"bcs_over_fixed_cost": bcs / fixed, "dense_over_bcs_speed": dense / bcs}
            sparse = steppers[("bcs", sp)].sparse
            del sparse._rebirth
            observed = max(1, int(statistics.median(int(d) for d in deaths[("bcs", sp)][1:] or [0])))
            for rule in ("l2",) if quick else ("l2", "l2-magnitude-seeded"):  # --quick: l2 once, to stay fast
                tag = "" if rule == "l2" else "_magnitude_seeded"
                for label, count in (("", observed), ("_at_10pct", sparse.budget // 10)):
                    ms = time_l2_rewiring(sparse, count, rule, 1 if quick else 5, device)
                    results[f"{model_name}/bcs@{sp:g}/{rule}-rewire{label}"] = {"rewire_ms": ms, "rebirths": count}
                    ratios[f"{model_name}@{sp:g}"][f"l2{tag}_rewire_over_step{label}"] = ms * 1e-3 / bcs
        del steppers

    print(f"{'configuration':<28}{'images/s':>12}{'step ms':>12}")
    for k, v in results.items():
        if "step_ms" in v:
            print(f"{k:<28}{v['images_per_s']:>12.1f}{v['step_ms']:>12.1f}")
    for k, v in results.items():
        if "rewire_ms" in v:
            print(f"{k:<48}{v['rewire_ms']:>10.1f} ms  ({v['rebirths']} rebirths)")
    for k, v in ratios.items():
        print(f"{k:<28} bcs/fixed step time {v['bcs_over_fixed_cost']:.3f}   dense/bcs {v['dense_over_bcs_speed']:.3f}"
              f"   l2 rewiring / bcs step {v['l2_rewire_over_step']:.3f}"
              f" ({v['l2_rewire_over_step_at_10pct']:.3f} at 10 % dead)")
    worst = max(v["bcs_over_fixed_cost"] for v in ratios.values())
    l2 = [(k, v) for r in ratios.values() for k, v in r.items() if k.startswith("l2")]
    worst_l2 = max(v for k, v in l2 if not k.endswith("10pct"))
    worst_l2_stress = max(v for k, v in l2 if k.endswith("10pct"))
    print(json.dumps({"bench": "train_step", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "objective": objective_name, "batch_size": batch, "timed_steps": steps,
                      "quick": quick, "results": results, "ratios": ratios, "worst_bcs_over_fixed_cost": worst,
                      "goal_bcs_over_fixed_cost_max": 1.05, "goal_met": worst <= 1.05,
                      "worst_l2_rewire_over_step": worst_l2, "worst_l2_rewire_over_step_at_10pct": worst_l2_stress,
                      "goal_l2_rewire_over_step_max": 0.10, "l2_goal_met": worst_l2 <= 0.10}))


if __name__ == "__main__":
    main()
