"""The poster's table (Özdenizci & Legenstein, ICML 2021): BCS vs the Random and Fixed static masks, per
objective and sparsity, on rsp's runs, with the poster's numbers in the adjacent columns and the seed spread.

    # this CPU (docs/paper.md): the paper's VGG-16 at width 0.25 on the CIFAR-10 subset
    python scripts/paper_table.py --data-dir ../shared/data/cifar-10-subset --model-kwargs '{width: 0.25}' \\
        --epochs 3 --seed 0 --seed 1 --root runs/paper --jobs 2 \\
        --train-flags '--batch-size 32 --attack-steps 3 --attack-step-size 3/255' \\
        --verify-flags '--n-examples 200 --no-sanity --latency-runs 5'
    # the paper's scale (a GPU, full CIFAR-10): full width, 200 epochs, all six objectives
    python scripts/paper_table.py --data-dir ~/data --epochs 200 --device cuda --jobs 4 --all-objectives \\
        --seed 0 --seed 1 --root runs/paper-gpu
    python scripts/paper_table.py ... --dry-run     # print the commands;  --report: the table of what finished

Each row (objective x method x sparsity x seed) is `rsp train` (the paper's initialisation and weight decay:
--sparse-init reference --decay-scope all), `rsp export --format onnx`, and `rsp verify --preset reference` (the
reference's evaluation: PGD-50 x 10, random start, step 2.5 eps / 50, every test image, eps 8/255) on the
ONNX artifact. Rows resume and run --jobs at a time (scripts/study.py). Model selection is on the validation
split cut from the training data (the reference selects on test accuracy). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # study.py, also when loaded by path (tests)
import study  # noqa: E402

METHODS = ["random", "fixed", "bcs"]  # the poster's column order: Random, Fixed, Ours
OBJECTIVES = ["natural", "pgd-at", "mixed-at", "trades", "mart", "rst"]
CPU_OBJECTIVES = ["natural", "pgd-at", "trades"]
# the reference code where rsp's defaults differ (rsp.train options that say so): start under the budget and
# fill it at the first step, SGDW decay on every trainable parameter, rebirths per layer in proportion to its size
PAPER_TRAIN_FLAGS = ["--sparse-init", "reference", "--decay-scope", "all", "--regrow", "layer-size"]

# The poster's table, CIFAR-10, VGG-16: clean / robust accuracy in %, robust = PGD-50 x 10 (Foolbox).
POSTER_DENSE = {"natural": (93.2, 0.0), "pgd-at": (78.4, 44.9), "mixed-at": (84.0, 41.1), "trades": (80.0, 46.1),
                "mart": (75.3, 46.8), "rst": (83.1, 52.1)}
POSTER = {  # objective -> sparsity -> method -> (clean, robust)
    "natural": {0.9: {"random": (90.4, 0.0), "fixed": (90.6, 0.0), "bcs": (91.8, 0.0)},
                0.99: {"random": (56.9, 0.0), "fixed": (86.2, 0.0), "bcs": (87.7, 0.0)}},
    "pgd-at": {0.9: {"random": (73.9, 43.3), "fixed": (75.8, 42.6), "bcs": (78.3, 44.5)},
               0.99: {"random": (42.0, 27.0), "fixed": (64.6, 39.3), "bcs": (69.8, 42.1)}},
    "mixed-at": {0.9: {"random": (78.8, 33.8), "fixed": (81.3, 39.2), "bcs": (83.0, 40.2)},
                 0.99: {"random": (67.3, 29.7), "fixed": (72.7, 33.9), "bcs": (77.8, 37.6)}},
    "trades": {0.9: {"random": (75.5, 43.1), "fixed": (76.0, 44.3), "bcs": (78.2, 45.7)},
               0.99: {"random": (49.1, 30.8), "fixed": (68.6, 38.2), "bcs": (72.4, 41.7)}},
    "mart": {0.9: {"random": (72.8, 42.2), "fixed": (73.4, 44.3), "bcs": (76.0, 45.2)},
             0.99: {"random": (48.0, 34.7), "fixed": (63.9, 42.4), "bcs": (68.2, 45.4)}},
    "rst": {0.9: {"random": (77.0, 46.0), "fixed": (78.1, 46.8), "bcs": (80.9, 49.6)},
            0.99: {"random": (54.4, 32.2), "fixed": (69.9, 38.5), "bcs": (74.0, 42.3)}},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--model", default="vgg16")
    ap.add_argument("--model-kwargs", default=None, help="YAML mapping, e.g. '{width: 0.25}'")
    ap.add_argument("--objective", action="append", choices=OBJECTIVES,
                    help=f"repeatable [default: {' '.join(CPU_OBJECTIVES)}]")
    ap.add_argument("--all-objectives", action="store_true", help=f"the poster's six: {' '.join(OBJECTIVES)}")
    ap.add_argument("--method", action="append", choices=METHODS, help=f"repeatable [default: {' '.join(METHODS)}]")
    ap.add_argument("--sparsity", type=float, action="append", help="repeatable [default: 0.9 and 0.99]")
    ap.add_argument("--seed", type=int, action="append", help="repeatable [default: 0 and 1]")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--extra-data", default=None, help="rst: the pseudo-labelled set (rsp pseudo-label)")
    ap.add_argument("--root", default="runs/paper")
    ap.add_argument("--train-flags", default="", help="more rsp train flags for every run")
    ap.add_argument("--verify-flags", default="", help="more rsp verify flags for every run")
    ap.add_argument("--jobs", type=int, default=1, help="rows run at a time (each row's steps stay in order)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--report", action="store_true", help="run nothing: the table of the runs finished so far")
    args = ap.parse_args(argv)
    objectives = OBJECTIVES if args.all_objectives else (args.objective or CPU_OBJECTIVES)
    if "rst" in objectives and not args.extra_data and not (args.dry_run or args.report):
        ap.error("--objective rst needs --extra-data (make it with rsp pseudo-label)")
    root = Path(args.root)
    write = not args.dry_run and not args.report
    device = "cuda" if args.device in ("cuda", "auto") and study.cuda_available() else "cpu"
    rows = []
    for objective in objectives:
        for sparsity in args.sparsity or [0.9, 0.99]:
            for method in args.method or METHODS:
                for seed in args.seed or [0, 1]:
                    run = root / f"{objective}-{method}-{sparsity:g}-s{seed}"
                    extra = ["--extra-data", args.extra_data] if objective == "rst" else []
                    train = ["train", *study.model_config(run, args.model_kwargs, write), "--dataset", args.dataset,
                             "--data-dir", args.data_dir, "--model", args.model, "--method", method,
                             "--sparsity", str(sparsity), "--objective", objective, "--epochs", str(args.epochs),
                             "--seed", str(seed), "--device", args.device, *PAPER_TRAIN_FLAGS, *extra,
                             "--output", str(run / "train"), *shlex.split(args.train_flags)]
                    export = ["export", str(run / "train"), "--target", "x86-cpu", "--format", "onnx",
                              "--data-dir", args.data_dir, "--output", str(run / "export")]
                    verify = ["verify", str(run / "export"), "--data-dir", args.data_dir, "--backend", "onnx",
                              "--preset", "reference", "--seed", str(seed), "--device", device,
                              "--latency-runs", "20",  # the table reads accuracy; latency is a side figure
                              "--output", str(run / "verify"), *shlex.split(args.verify_flags)]
                    rows.append(study.Row(run, train, export, verify, {"objective": objective, "method": method,
                                                                       "target_sparsity": sparsity, "seed": seed}))
    codes = study.run_rows(rows, args.jobs, args.dry_run, args.report)
    records = []
    for row, rc in zip(rows, codes):
        rec = {**row.labels, "commands": row.commands()}
        found = None if args.dry_run else study.results(row)
        if found:
            rec.update(found)
        elif not args.dry_run:
            rec["error"] = "not finished yet" if args.report else f"exit code {rc}, see {row.run / 'log.txt'}"
        records.append(rec)
    table = markdown(records, args, objectives)
    print(table)
    if write:
        root.mkdir(parents=True, exist_ok=True)
        (root / "paper.md").write_text(table)
    print(json.dumps({"rows": records, "summary": ordering(records)}))
    return 0


def _cell(values: list[float]) -> str:
    """Mean over seeds in %, and the spread (sample standard deviation) where there are two or more."""
    if not values:
        return "–"
    pct = [100 * v for v in values]
    mean = statistics.fmean(pct)
    return f"{mean:.1f}" if len(pct) < 2 else f"{mean:.1f} ± {statistics.stdev(pct):.1f}"


def _group(records, objective, sparsity, method, key):
    return [r[key] for r in records if r["objective"] == objective and r["target_sparsity"] == sparsity
            and r["method"] == method and key in r]


def ordering(records) -> dict:
    """Per sparsity: for each objective, whether the mean score orders bcs > fixed > random (the score is robust
    accuracy, clean accuracy for natural training), and the mean bcs - random gap in points with the largest
    seed spread of the cells involved."""
    out = {}
    for sparsity in sorted({r["target_sparsity"] for r in records}):
        per = {}
        for objective in dict.fromkeys(r["objective"] for r in records):
            key = "clean_acc" if objective == "natural" else "robust_acc"
            groups = {m: _group(records, objective, sparsity, m, key) for m in METHODS}
            if not all(groups.values()):
                continue
            mean = {m: 100 * statistics.fmean(v) for m, v in groups.items()}
            spread = max((100 * statistics.stdev(v) for v in groups.values() if len(v) > 1), default=None)
            per[objective] = {"score": key, "mean": mean, "holds": mean["bcs"] > mean["fixed"] > mean["random"],
                              "bcs_minus_random": mean["bcs"] - mean["random"],
                              "bcs_minus_fixed": mean["bcs"] - mean["fixed"], "max_seed_sd": spread}
        if per:
            out[f"{sparsity:g}"] = per
    return out


def _sentences(summary: dict) -> list[str]:
    lines = []
    gaps = {}
    for sparsity, per in summary.items():
        held = [o for o, v in per.items() if v["holds"]]
        gap = statistics.fmean(v["bcs_minus_random"] for v in per.values())
        gaps[sparsity] = gap
        sds = [v["max_seed_sd"] for v in per.values() if v["max_seed_sd"] is not None]
        sd = f"; the largest seed standard deviation of a cell is {max(sds):.1f} points" if sds else ""
        lines.append(f"- At {float(sparsity):.0%} sparsity the poster's ordering bcs > fixed > random holds for "
                     f"{len(held)} of {len(per)} objectives ({', '.join(held) or 'none'}); bcs - random is "
                     f"{gap:+.1f} points and bcs - fixed "
                     f"{statistics.fmean(v['bcs_minus_fixed'] for v in per.values()):+.1f} points on average{sd}.")
    if len(gaps) > 1:
        hi = max(gaps, key=lambda s: float(s))
        lo = min(gaps, key=lambda s: float(s))
        lines.append(f"- The bcs - random gap is {'larger' if gaps[hi] > gaps[lo] else 'not larger'} at "
                     f"{float(hi):.0%} ({gaps[hi]:+.1f}) than at {float(lo):.0%} ({gaps[lo]:+.1f}); the poster has it "
                     f"largest at 99 %.")
    return lines


def _reading(summary: dict) -> list[str]:
    """One bullet per sparsity: each objective's mean score per method and whether the poster's order holds."""
    lines = []
    for sparsity, per in summary.items():
        parts = []
        for objective, v in per.items():
            score = "clean" if v["score"] == "clean_acc" else "robust"
            sd = f", largest seed sd {v['max_seed_sd']:.1f}" if v["max_seed_sd"] is not None else ""
            parts.append(f"{objective} ({score}): " + ", ".join(f"{m} {v['mean'][m]:.1f}" for m in ("bcs", "fixed", "random"))
                         + f" — {'holds' if v['holds'] else 'does not hold'}{sd}")
        lines.append(f"- **{float(sparsity):.0%}**: " + "; ".join(parts) + ".")
    return lines


def _collapse(records) -> list[str]:
    """How many finished runs per sparsity were selected as one-class predictors, and what such a run scores."""
    finished = [r for r in records if "error" not in r]
    collapsed = [r for r in finished if r.get("selected_collapsed")]
    if not collapsed:
        return []
    counts = []
    for sparsity in sorted({r["target_sparsity"] for r in finished}, reverse=True):
        done = [r for r in finished if r["target_sparsity"] == sparsity]
        counts.append(f"{sum(1 for r in done if r.get('selected_collapsed'))} of the {len(done)} finished runs "
                      f"at {sparsity:.0%}")
    shares = sorted({f"{100 * r['clean_acc']:.1f} %" for r in collapsed if "clean_acc" in r})
    return ["", f"Collapse: {' and '.join(counts)} were selected as collapsed classifiers (most validation images "
            "in one class; the epoch rsp picks on validation is still one, and its manifest says so). A collapsed "
            f"network scores the share of its class among the test images ({', '.join(shares)} in these runs), so a "
            "cell whose runs all collapsed compares one-class predictors, not methods."]


def markdown(records, args, objectives) -> str:
    kw = f" {args.model_kwargs}" if args.model_kwargs else ""
    seeds = sorted({r["seed"] for r in records})
    n_seen = ", ".join(sorted({str(r["n_examples"]) for r in records if r.get("n_examples")})) or "all"
    head = (f"{args.model}{kw} on {args.dataset} ({args.data_dir}), --epochs {args.epochs}, seeds "
            f"{', '.join(map(str, seeds))}, {' '.join(PAPER_TRAIN_FLAGS)}{' ' + args.train_flags if args.train_flags else ''}; "
            f"model selection on the validation split cut from the training data. Clean / robust accuracy in % of "
            f"the ONNX artifact from `rsp verify --preset reference` (PGD-50 x 10, step 2.5 eps / 50, eps 8/255, "
            f"worst case per example) on {n_seen} test images: mean ± sample standard deviation over seeds. "
            f"Poster: CIFAR-10 (50 000 training images), full-width VGG-16, 200 epochs; its dense VGG-16 in the "
            f"last column.\n\n")
    methods = args.method or METHODS
    cols = " | ".join(f"{m} rsp | {m} poster" for m in methods)
    lines = [f"| objective | sparsity | {cols} | poster dense |", "|---|---|" + "---|---|" * len(methods) + "---|"]
    for objective in objectives:
        for sparsity in args.sparsity or [0.9, 0.99]:
            cells = []
            for m in methods:
                clean = _cell(_group(records, objective, sparsity, m, "clean_acc"))
                robust = _cell(_group(records, objective, sparsity, m, "robust_acc"))
                ref = POSTER.get(objective, {}).get(sparsity, {}).get(m)
                cells.append(f"{clean} / {robust} | " + (f"{ref[0]:.1f} / {ref[1]:.1f}" if ref else "–"))
            dense = POSTER_DENSE.get(objective)
            lines.append(f"| {objective} | {sparsity:g} | {' | '.join(cells)} | "
                         + (f"{dense[0]:.1f} / {dense[1]:.1f}" if dense else "–") + " |")
    notes = [""] + _sentences(ordering(records))
    collapsed = [r for r in records if r.get("selected_collapsed")]
    if collapsed:  # a one-class classifier scores the share of its class: no method comparison in that cell
        notes += ["", f"{len(collapsed)} of {len(records)} runs are collapsed classifiers at selection (most "
                  "validation images in one class; their train manifests say so): "
                  + ", ".join(f"{r['objective']}-{r['method']}-{r['target_sparsity']:g}-s{r['seed']}" for r in collapsed)
                  + "."]
    summary = ordering(records)
    if summary:
        notes += ["", "**Reading, per sparsity** (the score is clean accuracy for natural training, robust accuracy "
                  "otherwise; sd is the sample standard deviation over seeds):", ""] + _reading(summary)
    notes += _collapse(records)
    cmds = study.footer(records, lambda r: f"{r['objective']}-{r['method']}-{r['target_sparsity']:g}-s{r['seed']}",
                        lambda r: f"{r['objective']} {r['method']} @ {r['target_sparsity']:g} seed {r['seed']}")
    return head + "\n".join(lines + notes + cmds) + "\n"


if __name__ == "__main__":
    sys.exit(main())
