"""The structured-rewiring study's setting (Seidel, TU Graz, ../shared/seeds/003_8dc80cc29e6b0d7a.txt) from one
command: VGG-11 trained with BCS under natural training and TRADES at 95 % and 99 % sparsity, each rebirth rule
(random = the study's "unstructured", l2 = "structured", l2-magnitude-seeded = "structured weight-based"),
then the study's k = 1 pruning; zero vectors before and after it and clean test accuracy after it, with the
study's Table 1 and Table 2 in the adjacent columns.

    # this CPU (docs/structured-rewiring.md): VGG-11 at width 0.25 on the CIFAR-10 subset, 2 seeds, 24 rows
    python scripts/rewiring_table.py --data-dir ../shared/data/cifar-10-subset --model-kwargs '{width: 0.25}' \\
        --epochs 15 --root runs/rewiring --jobs 2 \\
        --train-flags '--batch-size 32 --attack-steps 3 --attack-step-size 3/255 --threads 1'
    # the study's scale (a GPU, full CIFAR-10): full width, 100 epochs, batch 128
    python scripts/rewiring_table.py --data-dir ~/data --epochs 100 --device cuda --jobs 4 --root runs/rewiring-gpu
    python scripts/rewiring_table.py ... --dry-run     # print the commands;  --report: the table of what finished

Each row (objective x sparsity x regrow x seed) is `rsp train --method bcs --model vgg11 --regrow R` (the BCS
reference's initialisation and weight decay, as the study trains "with the configurations of Özdenizci and
Legenstein 2021") and `rsp structure --k 1 --no-regroup --attack-steps 0` on the train folder. The figures come
from structure's analysis.json: its "original" step (the train folder's weights as trained) and its "prune" step
(every vector holding at most k = 1 non-zero zeroed, the study's "we pruned all weights that singlehandedly
occupied a vector"); a vector is one (in, kh, kw) position across all output channels (the innermost, output-
channel axis of the study's HWIO kernels; see rsp.structure.vector_view), counted over all conv and linear
layers. Accuracy: clean, on the test images (up to --n-examples); model selection happened in rsp train on the
validation split. Rows resume and run --jobs at a time (scripts/study.py). The last line is one JSON object.
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

OBJECTIVES = ["natural", "trades"]
SPARSITIES = [0.95, 0.99]
REGROWS = ["random", "l2", "l2-magnitude-seeded"]  # the study's order: unstructured, structured, weight-based
REGROW_CHOICES = REGROWS + ["layer-size"]  # layer-size: the BCS reference code's rebirth draw, also "unstructured"
STUDY_COLUMN = {"random": "unstructured", "layer-size": "unstructured", "l2": "structured",
                "l2-magnitude-seeded": "structured weight-based"}
K = 1  # the study's pruning: vectors with a single non-zero
# the study trains as Özdenizci & Legenstein (2021) did (its section 4): their code's start and decay (paper_table.py)
STUDY_TRAIN_FLAGS = ["--sparse-init", "reference", "--decay-scope", "all", "--batch-size", "128", "--lr", "0.1"]
# "The model in Table 3 was trained using the TRADES loss as defined in Equation 2 with beta = 0.6" (section 4.2.2;
# the BCS paper uses 6): the study's stated value is the default here, --trades-beta changes it
STUDY_TRADES_BETA = 0.6

# The study (Seidel, TU Graz, WS 2022/23), VGG-11 on CIFAR-10, 100 epochs, one run per cell, all in %.
# objective -> sparsity -> rule -> value; a cell the study does not have is absent.
# Table 1, "Amount of lowest dimensional zero tensors" (share of vectors containing only zeros), as trained:
STUDY_ZERO_VECTORS = {
    "natural": {0.99: {"random": 2.066, "l2": 7.45, "l2-magnitude-seeded": 11.77},
                0.95: {"random": 0.0, "l2": 0.94, "l2-magnitude-seeded": 1.086}},
    "trades": {0.95: {"random": 0.018, "l2": 0.57, "l2-magnitude-seeded": 1.06}},
}
# Table 1, "After pruning" (rows "~99% natural" and "~95% TRADES"; no 95 % natural row):
STUDY_ZERO_VECTORS_PRUNED = {
    "natural": {0.99: {"random": 9.48, "l2": 19.145, "l2-magnitude-seeded": 24.05}},
    "trades": {0.95: {"random": 0.14, "l2": 1.125, "l2-magnitude-seeded": 1.72}},
}
# Table 2, "Test accuracy", as trained:
STUDY_ACC = {
    "natural": {0.99: {"random": 84.89, "l2": 84.91, "l2-magnitude-seeded": 84.44},
                0.95: {"random": 87.7, "l2": 87.8, "l2-magnitude-seeded": 87.6}},
    "trades": {0.95: {"random": 71.21, "l2": 71.01, "l2-magnitude-seeded": 70.21}},
}
# Table 2, "After pruning" (rows "~99% natural" and "~95% TRADES"):
STUDY_ACC_PRUNED = {
    "natural": {0.99: {"random": 76.12, "l2": 58.29, "l2-magnitude-seeded": 73.11}},
    "trades": {0.95: {"random": 58.85, "l2": 46.76, "l2-magnitude-seeded": 64.11}},
}
# The study has no 99 % TRADES network at all.


def study_value(table: dict, objective: str, sparsity: float, regrow: str) -> float | None:
    rule = "random" if regrow == "layer-size" else regrow
    return table.get(objective, {}).get(sparsity, {}).get(rule)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--model", default="vgg11")
    ap.add_argument("--model-kwargs", default=None, help="YAML mapping, e.g. '{width: 0.25}'")
    ap.add_argument("--objective", action="append", choices=OBJECTIVES, help="repeatable [default: natural trades]")
    ap.add_argument("--sparsity", type=float, action="append", help="repeatable [default: 0.95 and 0.99]")
    ap.add_argument("--regrow", action="append", choices=REGROW_CHOICES,
                    help=f"repeatable [default: {' '.join(REGROWS)}]")
    ap.add_argument("--seed", type=int, action="append", help="repeatable [default: 0 and 1]")
    ap.add_argument("--epochs", type=int, default=100, help="the study's 100 [default]")
    ap.add_argument("--trades-beta", type=float, default=STUDY_TRADES_BETA,
                    help="TRADES beta [default: the study's stated 0.6]")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-examples", type=int, default=10000, help="structure: the first N test images (all: 10000)")
    ap.add_argument("--root", default="runs/rewiring")
    ap.add_argument("--train-flags", default="", help="more rsp train flags for every run, e.g. '--threads 2'")
    ap.add_argument("--structure-flags", default="", help="more rsp structure flags for every run")
    ap.add_argument("--jobs", type=int, default=1, help="rows run at a time (each row's steps stay in order)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--report", action="store_true", help="run nothing: the table of the runs finished so far")
    args = ap.parse_args(argv)
    objectives = args.objective or OBJECTIVES
    sparsities = args.sparsity or SPARSITIES
    regrows = list(dict.fromkeys(args.regrow or REGROWS))
    seeds = args.seed or [0, 1]
    root = Path(args.root)
    write = not args.dry_run and not args.report
    device = "cuda" if args.device in ("cuda", "auto") and study.cuda_available() else "cpu"
    rows = []
    for objective in objectives:
        for sparsity in sparsities:
            for regrow in regrows:
                for seed in seeds:
                    run = root / f"{objective}-{sparsity:g}-{regrow}-s{seed}"
                    beta = ["--beta", f"{args.trades_beta:g}"] if objective == "trades" else []
                    train = ["train", *study.model_config(run, args.model_kwargs, write), "--dataset", args.dataset,
                             "--data-dir", args.data_dir, "--model", args.model, "--method", "bcs",
                             "--regrow", regrow, "--sparsity", str(sparsity), "--objective", objective, *beta,
                             "--epochs", str(args.epochs), "--seed", str(seed), "--device", args.device,
                             *STUDY_TRAIN_FLAGS, "--output", str(run / "train"), *shlex.split(args.train_flags)]
                    structure = ["structure", str(run / "train"), "--k", str(K), "--no-regroup",
                                 "--n-examples", str(args.n_examples), "--attack-steps", "0",
                                 "--data-dir", args.data_dir, "--seed", str(seed), "--device", device,
                                 "--output", str(run / "structure"), *shlex.split(args.structure_flags)]
                    rows.append(study.Row(run, train, labels={"objective": objective, "target_sparsity": sparsity,
                                                              "regrow": regrow, "seed": seed},
                                          stages=[("structure", structure)]))
    codes = study.run_rows(rows, args.jobs, args.dry_run, args.report)
    records = []
    for row, rc in zip(rows, codes):
        rec = {**row.labels, "commands": row.commands()}
        found = None if args.dry_run else results(row.run)
        if found:
            rec.update(found)
        elif not args.dry_run:
            rec["error"] = "not finished yet" if args.report else f"exit code {rc}, see {row.run / 'log.txt'}"
        records.append(rec)
    summary = ordering(records)
    table = markdown(records, args, objectives, sparsities, regrows, summary)
    print(table)
    if write:
        root.mkdir(parents=True, exist_ok=True)
        (root / "rewiring.md").write_text(table)
    print(json.dumps({"rows": records, "summary": summary}))
    return 0


def results(run: Path) -> dict | None:
    """The figures a finished row recorded: structure's analysis.json ("original" and "prune" steps) and
    manifest, and the train manifest; None until both stages are complete."""
    if not (study.done(run / "train") and study.done(run / "structure")):
        return None
    analysis = json.loads((run / "structure" / "analysis.json").read_text())
    steps = {s["step"]: s for s in analysis["steps"]}
    if "original" not in steps or "prune" not in steps:
        return None
    smani = json.loads((run / "structure" / "manifest.json").read_text())
    tmani = json.loads((run / "train" / "manifest.json").read_text())
    before, after = steps["original"], steps["prune"]
    metrics = tmani.get("metrics", {})
    return {"sparsity": before["analysis"]["overall"]["sparsity"],
            "sparsity_pruned": after["analysis"]["overall"]["sparsity"],
            "zero_vectors": before["analysis"]["overall"]["zero_vectors"],
            "zero_vectors_pruned": after["analysis"]["overall"]["zero_vectors"],
            "clean_acc": before.get("clean_acc"), "clean_acc_pruned": after.get("clean_acc"),
            "collapsed_pruned": after.get("collapsed"), "n_test": after.get("n"),
            "k": smani.get("structure", {}).get("k"), "prune_unit": smani.get("structure", {}).get("prune_unit"),
            "prune_note": after.get("note"), "regrow_recorded": tmani.get("method_config", {}).get("regrow"),
            "val_clean_acc": metrics.get("val_clean_acc"), "selected_epoch": metrics.get("epoch"),
            "selected_collapsed": metrics.get("selected_collapsed"),
            "train_time_s": tmani.get("training", {}).get("time_s")}


def _values(records, objective, sparsity, regrow, key) -> list[float]:
    return [r[key] for r in records if r["objective"] == objective and r["target_sparsity"] == sparsity
            and r["regrow"] == regrow and r.get(key) is not None]


def _cell(values: list[float]) -> str:
    """Mean over seeds in %, and the spread (sample standard deviation) where there are two or more."""
    if not values:
        return "–"
    pct = [100 * v for v in values]
    mean = statistics.fmean(pct)
    return f"{mean:.2f}" if len(pct) < 2 else f"{mean:.2f} ± {statistics.stdev(pct):.2f}"


def _ref(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def ordering(records) -> dict:
    """Per (objective, sparsity) with all three rules present: the mean zero-vector shares (in %) before and
    after k = 1 pruning, whether they order random < l2 < l2-magnitude-seeded as in the study, the mean clean
    accuracies after pruning and the largest seed spread of the cells involved."""
    out = {}
    for objective in dict.fromkeys(r["objective"] for r in records):
        for sparsity in dict.fromkeys(r["target_sparsity"] for r in records if r["objective"] == objective):
            base = next((g for g in ("random", "layer-size")
                         if _values(records, objective, sparsity, g, "zero_vectors")), None)
            rules = [base, "l2", "l2-magnitude-seeded"]
            entry = {"rules": rules}
            for key in ("zero_vectors", "zero_vectors_pruned", "clean_acc_pruned"):
                groups = {g: _values(records, objective, sparsity, g, key) for g in rules if g}
                if base is None or not all(groups.get(g) for g in rules):
                    break
                mean = [100 * statistics.fmean(groups[g]) for g in rules]
                sds = [100 * statistics.stdev(v) for v in groups.values() if len(v) > 1]
                entry[key] = {"mean": dict(zip(rules, mean)), "max_seed_sd": max(sds, default=None)}
                if key != "clean_acc_pruned":
                    entry[key]["holds"] = mean[0] < mean[1] < mean[2]
            else:
                out[f"{objective} {sparsity:g}"] = entry
    return out


def _sentence(name: str, entry: dict) -> str:
    objective, sparsity = name.split()
    rules = entry["rules"]

    def part(key, what):
        e = entry[key]
        m = e["mean"]
        values = " < ".join(f"{g} {m[g]:.2f}" for g in rules) if e["holds"] else \
            ", ".join(f"{g} {m[g]:.2f}" for g in rules)
        sd = f", seed sd up to {e['max_seed_sd']:.2f}" if e["max_seed_sd"] is not None else ""
        return f"{what} {'holds' if e['holds'] else 'does not hold'} ({values} %{sd})"

    sp = float(sparsity)
    study = []
    for what, table in (("zero vectors as trained", STUDY_ZERO_VECTORS),
                        ("after pruning", STUDY_ZERO_VECTORS_PRUNED), ("accuracy after pruning", STUDY_ACC_PRUNED)):
        ref = [study_value(table, objective, sp, g) for g in rules]
        if all(v is not None for v in ref):
            study.append(f"{what} {' / '.join(f'{v:g}' for v in ref)} %")
    acc = entry["clean_acc_pruned"]["mean"]
    return (f"- {objective}, {sp:.0%} sparsity: the study's ordering {rules[0]} < l2 < "
            f"l2-magnitude-seeded in zero vectors " + part("zero_vectors", "as trained") + "; "
            + part("zero_vectors_pruned", f"after k = {K} pruning") + "; clean accuracy after pruning "
            + ", ".join(f"{g} {acc[g]:.1f} %" for g in rules)
            + (f". Study ({' / '.join(rules)}): {'; '.join(study)}." if study else
               ". The study has no number for this setting."))


def markdown(records, args, objectives, sparsities, regrows, summary) -> str:
    kw = f" {args.model_kwargs}" if args.model_kwargs else ""
    seeds = sorted({r["seed"] for r in records})
    n_seen = ", ".join(sorted({str(r["n_test"]) for r in records if r.get("n_test")})) or f"up to {args.n_examples}"
    head = (f"{args.model}{kw} on {args.dataset} ({args.data_dir}), rsp train --method bcs, --epochs {args.epochs}, "
            f"seeds {', '.join(map(str, seeds))}, {' '.join(STUDY_TRAIN_FLAGS)}, TRADES beta {args.trades_beta:g}"
            f"{', ' + args.train_flags if args.train_flags else ''}; model selection on the validation split. "
            f"Zero vectors: share (%) of vectors (one (in, kh, kw) position across all output channels) of all conv "
            f"and linear layers holding only zeros, as trained and after `rsp structure --k {K} --no-regroup` "
            f"(every vector with <= {K} non-zero zeroed, no fine-tuning); clean accuracy (%) on {n_seen} test "
            f"images, as trained and after that pruning. rsp: mean ± sample standard deviation over seeds. Study "
            f"(Seidel): full-width VGG-11, full CIFAR-10, 100 epochs, one run; Table 1 (zero vectors) and Table 2 "
            f"(test accuracy); columns unstructured / structured / structured weight-based = random / l2 / "
            f"l2-magnitude-seeded; '–': the study has no number (it has 99 % natural, 95 % natural and 95 % TRADES "
            f"as trained, and only 99 % natural and 95 % TRADES after pruning).\n\n")
    lines = ["| objective | sparsity | regrow | runs | sparsity after k=1 | zero vectors rsp | study T1 | "
             "zero vectors after k=1 rsp | study T1 | clean rsp | study T2 | clean after k=1 rsp | study T2 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for objective in objectives:
        for sparsity in sparsities:
            for regrow in regrows:
                n = len(_values(records, objective, sparsity, regrow, "zero_vectors"))
                pruned_sp = _values(records, objective, sparsity, regrow, "sparsity_pruned")
                lines.append(
                    f"| {objective} | {sparsity:g} | {regrow} | {n} | "
                    f"{f'{statistics.fmean(pruned_sp):.4f}' if pruned_sp else '–'} | "
                    f"{_cell(_values(records, objective, sparsity, regrow, 'zero_vectors'))} | "
                    f"{_ref(study_value(STUDY_ZERO_VECTORS, objective, sparsity, regrow))} | "
                    f"{_cell(_values(records, objective, sparsity, regrow, 'zero_vectors_pruned'))} | "
                    f"{_ref(study_value(STUDY_ZERO_VECTORS_PRUNED, objective, sparsity, regrow))} | "
                    f"{_cell(_values(records, objective, sparsity, regrow, 'clean_acc'))} | "
                    f"{_ref(study_value(STUDY_ACC, objective, sparsity, regrow))} | "
                    f"{_cell(_values(records, objective, sparsity, regrow, 'clean_acc_pruned'))} | "
                    f"{_ref(study_value(STUDY_ACC_PRUNED, objective, sparsity, regrow))} |")
    notes = ["", "Reading (from the rows above):", ""]
    notes += [_sentence(name, entry) for name, entry in summary.items()] or \
        ["- no (objective, sparsity) has all three rules finished yet."]
    collapsed = [r for r in records if r.get("collapsed_pruned")]
    if collapsed:
        notes += ["", f"{len(collapsed)} pruned model(s) predict one class for most test images: "
                  + ", ".join(f"{r['objective']}-{r['target_sparsity']:g}-{r['regrow']}-s{r['seed']}"
                              for r in collapsed)]
    cmds = study.footer(records, lambda r: f"{r['objective']}-{r['target_sparsity']:g}-{r['regrow']}-s{r['seed']}",
                        lambda r: f"{r['objective']} {r['target_sparsity']:g} {r['regrow']} seed {r['seed']}")
    return head + "\n".join(lines + notes + cmds) + "\n"


if __name__ == "__main__":
    sys.exit(main())
