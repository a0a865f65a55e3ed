"""The method comparison of docs/methods.md: every `rsp train --method` at the same budget, scored by rsp verify.

    python scripts/methods_table.py --data-dir ../shared/data/cifar-10-subset --model resnet18 \\
        --sparsity 0.9 --sparsity 0.99 --epochs 30 --root runs/methods --device cuda      # the table (a GPU)
    python scripts/methods_table.py ... --dry-run                                        # print the commands

For each method and sparsity: `rsp train` (same data, model, objective, --epochs budget and seed), `rsp export
--format onnx` for this host, `rsp verify` (its default preset: PGD-50 x 10, then APGD-CE and APGD-T on
PGD's survivors, eps 8/255, worst case per example, sanity checks) on the ONNX artifact. A finished step is skipped when the script runs again, so an interrupted table resumes
(train itself resumes with --resume). Prints the Markdown table, one row per run with the command that
produced it, and writes it to ROOT/methods.md; the last line is one JSON object with all figures.

Natural vs adversarial (the pruning brief: do natural training's phenomena hold under adversarial training?):
`--objective` is repeatable; with more than one, each run folder is ROOT/OBJECTIVE-METHOD-SPARSITY and the
table gets an objective column. Where a table holds lth, lth-reinit and edge-popup rows, it ends with one
sentence per objective and sparsity on each phenomenon, scored by clean accuracy under natural training and
robust accuracy otherwise:

    winning tickets: lth (rewound) beats lth-reinit (the same rounds, survivors re-drawn at random)
    random-weight subnetworks: edge-popup (scores only, weights never trained) reaches the trained network at
    the same budget (lth) within 1 point, or beats it

    # natural vs PGD-AT on this CPU (docs/methods.md)
    python scripts/methods_table.py --data-dir ../shared/data/cifar-10-subset --model vgg16 \\
        --model-kwargs '{width: 0.25}' --sparsity 0.9 --epochs 5 --objective natural --objective pgd-at \\
        --method lth --method lth-reinit --method edge-popup --root runs/methods-nat-adv --jobs 1 \\
        --n-examples 200 --train-flags '--lr 0.05 --attack-steps 5 --threads 1' \\
        --verify-flags '--no-sanity --latency-runs 5'
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # study.py, also when loaded by path (tests)
import study  # noqa: E402



def default_methods() -> list[str]:
    # every registered way to reach the budget; controls (random, lth-reinit) and dense only when asked for
    from rsp.methods import list_methods

    return list_methods(role="method")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--model-kwargs", default=None, help="YAML mapping, e.g. '{width: 0.25}' (vgg16)")
    ap.add_argument("--sparsity", type=float, action="append", help="repeatable [default: 0.9 and 0.99]")
    ap.add_argument("--method", action="append", help="repeatable [default: every rsp.methods entry of role 'method': "
                    f"{' '.join(default_methods())}]")
    ap.add_argument("--objective", action="append", help="repeatable [default: pgd-at]; several: the "
                    "natural-vs-adversarial comparison")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n-examples", type=int, default=1000, help="verify: the first N test images")
    ap.add_argument("--root", default="runs/methods")
    ap.add_argument("--train-flags", default="", help="more rsp train flags for every run, e.g. '--attack-steps 5'")
    ap.add_argument("--verify-flags", default="", help="more rsp verify flags, e.g. '--no-sanity' (a CPU budget)")
    ap.add_argument("--jobs", type=int, default=1, help="rows run at a time (each row's steps stay in order)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--report", action="store_true", help="run nothing: the table of the runs finished so far")
    args = ap.parse_args(argv)
    root = Path(args.root)
    write = not args.dry_run and not args.report
    objectives = args.objective = args.objective or ["pgd-at"]
    specs = []
    for objective, sparsity, method in ((o, s, m) for o in objectives for s in args.sparsity or [0.9, 0.99]
                                        for m in args.method or default_methods()):
            # one objective keeps the folder names tables made before --objective was repeatable
            run = root / (f"{method}-{sparsity:g}" if len(objectives) == 1 else f"{objective}-{method}-{sparsity:g}")
            train = ["train", *study.model_config(run, args.model_kwargs, write), "--dataset", args.dataset,
                     "--data-dir", args.data_dir, "--model", args.model,
                     "--method", method, "--sparsity", str(sparsity), "--objective", objective,
                     "--epochs", str(args.epochs), "--seed", str(args.seed), "--device", args.device,
                     "--output", str(run / "train"), *shlex.split(args.train_flags)]
            export = ["export", str(run / "train"), "--target", "x86-cpu", "--format", "onnx",
                      "--data-dir", args.data_dir, "--output", str(run / "export")]
            verify = ["verify", str(run / "export"), "--data-dir", args.data_dir, "--backend", "onnx",
                      "--n-examples", str(args.n_examples), "--steps", "50", "--restarts", "10",
                      "--device", "cuda" if args.device in ("cuda", "auto") and study.cuda_available() else "cpu",
                      "--output", str(run / "verify"), *shlex.split(args.verify_flags)]
            specs.append(study.Row(run, train, export, verify, {"objective": objective, "method": method,
                                                                "target_sparsity": sparsity}))
    codes = study.run_rows(specs, args.jobs, args.dry_run, args.report)
    rows = []
    for spec, rc in zip(specs, codes):
        row = {**spec.labels, "commands": spec.commands()}
        found = None if args.dry_run else study.results(spec)
        if found:
            row.update(found)
        elif args.report:
            row["error"] = "not finished yet"
        elif not args.dry_run:
            row["error"] = f"exit code {rc}, see {spec.run / 'log.txt'}"
        rows.append(row)
    table = _markdown(rows, args)
    print(table)
    if not args.dry_run and not args.report:
        root.mkdir(parents=True, exist_ok=True)
        (root / "methods.md").write_text(table)
    print(json.dumps({"rows": rows, "phenomena": phenomena(rows)}))
    return 0


def _sanity(row) -> str:
    return "not run" if row.get("sanity_run") is False else ("unreliable" if row["unreliable"] else "pass")


def _fraction(v) -> str:
    return "–" if v is None else f"{v:.3f}"  # natural training selects on clean accuracy: no val robust figure


def _vulnerability(row) -> str:
    v = row.get("latent_vulnerability")
    return "-" if v is None else f"{v:.4g}"


def _row(rows, objective, sparsity, method):
    return next((r for r in rows if r["objective"] == objective and r["target_sparsity"] == sparsity
                 and r["method"] == method and "robust_acc" in r), None)


def _verdict(claim: bool, rows: list[dict]):
    """A comparison of two rows is decided only when neither selected a collapsed classifier (its score is the
    share of one class, not a subnetwork's): None otherwise."""
    return None if any(r.get("selected_collapsed") for r in rows) else claim


def phenomena(rows) -> list[dict]:
    """Per objective and sparsity with lth, lth-reinit and edge-popup rows: does each phenomenon hold?
    winning_ticket / random_weight_subnetwork: True, False, or None (not decidable: a collapsed row)."""
    out = []
    for objective, sparsity in dict.fromkeys((r["objective"], r["target_sparsity"]) for r in rows):
        lth, reinit, popup = (_row(rows, objective, sparsity, m) for m in ("lth", "lth-reinit", "edge-popup"))
        if None in (lth, reinit, popup):
            continue
        key = "clean_acc" if objective == "natural" else "robust_acc"
        out.append({"objective": objective, "target_sparsity": sparsity, "score": key,
                    "collapsed": [r["method"] for r in (lth, reinit, popup) if r.get("selected_collapsed")],
                    "lth": lth[key], "lth_reinit": reinit[key], "edge_popup": popup[key],
                    "winning_ticket": _verdict(lth[key] > reinit[key], [lth, reinit]),
                    "random_weight_subnetwork": _verdict(popup[key] >= lth[key] - 0.01, [lth, popup])})
    return out


def _said(verdict, yes: str, no: str, collapsed: list[str], among: tuple[str, str]) -> str:
    if verdict is None:
        return f"not decidable ({', '.join(m for m in among if m in collapsed)} collapsed)"
    return yes if verdict else no


def _phenomena_lines(rows) -> list[str]:
    lines = []
    for p in phenomena(rows):
        what = "clean" if p["score"] == "clean_acc" else "robust"
        c = p["collapsed"]
        lines.append(
            f"- {p['objective']} at {p['target_sparsity']:.0%} ({what} accuracy): winning tickets "
            f"{_said(p['winning_ticket'], 'hold', 'do not hold', c, ('lth', 'lth-reinit'))} (lth {100 * p['lth']:.1f} "
            f"vs lth-reinit {100 * p['lth_reinit']:.1f} %); the random-weight subnetwork "
            f"{_said(p['random_weight_subnetwork'], 'reaches the trained one', 'does not reach the trained one', c, ('lth', 'edge-popup'))} "
            f"(edge-popup {100 * p['edge_popup']:.1f} vs lth {100 * p['lth']:.1f} %, within 1 point counts).")
    note = ("Natural vs adversarial (one seed: a difference under ~3 points is noise at this size; a comparison with "
            "a collapsed classifier, one class for most validation images, is not decidable):")
    return ["", note, ""] + lines if lines else []


def _markdown(rows, args) -> str:
    extra = f" ({args.train_flags})" if args.train_flags else ""
    kw = f" {args.model_kwargs}" if args.model_kwargs else ""
    n_seen = ", ".join(sorted({str(r["n_examples"]) for r in rows if r.get("n_examples")})) or args.n_examples
    head = (f"{args.model}{kw} on {args.dataset} ({args.data_dir}), {', '.join(args.objective)}{extra}, --epochs {args.epochs} for every "
            f"method (its whole budget), seed {args.seed}; model selection on the validation split; clean and "
            f"robust accuracy (PGD-50 x 10, then APGD-CE and APGD-T on its survivors: rsp verify's default preset; "
            f"eps 8/255, worst case per example) of the ONNX artifact from rsp verify "
            f"on the first {n_seen} test images; latent vulnerability: ANP-VS's mean |z(x) - z(x_adv)| over the "
            f"ReLU features at those adversarial examples (lower: features that move less).\n\n")
    many = len(args.objective) > 1
    obj = (lambda r: f"| {r['objective']} ") if many else (lambda r: "")
    lines = [("| objective " if many else "") + "| method | target | sparsity | clean | robust (PGD-50x10 + APGD) | latent vulnerability | sanity "
             "| selected epoch: val clean / robust | phases (steps) | train s |",
             ("|---" if many else "") + "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "robust_acc" in r:
            units = f" (units {r['unit_sparsity']:.3f})" if r.get("unit_sparsity") is not None else ""
            lines.append(obj(r) + f"| {r['method']} | {r['target_sparsity']:g} | {r['sparsity']:.4f}{units} | {r['clean_acc']:.4f} | "
                         f"{r['robust_acc']:.4f} | {_vulnerability(r)} | {_sanity(r)} | {r['selected_epoch']}: {_fraction(r['val_clean_acc'])} / "
                         f"{_fraction(r['val_robust_acc'])}{' (collapsed)' if r.get('selected_collapsed') else ''} | "
                         f"{r['phases'] or 'train'} | {r['train_time_s']:.0f} |")
        else:
            lines.append(obj(r) + f"| {r['method']} | {r['target_sparsity']:g} | | | | | {r.get('error', 'not run')} | | | |")
    cmds = ["", "Commands, per row:", ""]
    for r in rows:
        cmds.append(f"- {r['objective'] + ' ' if many else ''}{r['method']} @ {r['target_sparsity']:g}: `" + "` && `".join(r["commands"]) + "`")
    return head + "\n".join(lines + _phenomena_lines(rows) + cmds) + "\n"


if __name__ == "__main__":
    sys.exit(main())
