"""scripts/methods_table.py: the comparison table is built from the run folders' own records."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "methods_table.py"


def _script():
    spec = importlib.util.spec_from_file_location("methods_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_row(root: Path, name: str, *, clean, robust, epoch, collapsed=False, method_config=None, vulnerability=None,
              val_robust=0.1):
    run = root / name
    (run / "train").mkdir(parents=True)
    (run / "verify").mkdir()
    (run / "train" / "manifest.json").write_text(json.dumps({
        "status": "complete", "sparsity": 0.9, "training": {"time_s": 12.0},
        "metrics": {"epoch": epoch, "val_clean_acc": 0.3, "val_robust_acc": val_robust, "selected_collapsed": collapsed},
        "method_config": {"phases": [{"name": "pretrain", "steps": 5}, {"name": "finetune", "steps": 5}],
                          **(method_config or {})}}))
    (run / "verify" / "verify.json").write_text(json.dumps({
        "clean_acc": clean, "robust_acc": robust, "unreliable": False, "n_examples": 517,
        "sanity": {"checks": [{"name": "eps_zero", "passed": True}]},
        **({"latent_vulnerability": {"vulnerability": vulnerability}} if vulnerability is not None else {})}))


def test_report_renders_what_the_folders_record(tmp_path, capsys):
    _fake_row(tmp_path, "bcs-0.9", clean=0.30, robust=0.18, epoch=4, vulnerability=0.0123)
    _fake_row(tmp_path, "anp-vs-0.9", clean=0.11, robust=0.10, epoch=3, collapsed=True,
              method_config={"unit_sparsity": 0.25})
    args = ["--data-dir", "d", "--root", str(tmp_path), "--sparsity", "0.9", "--report"]
    assert _script().main(args + ["--method", "bcs", "--method", "anp-vs", "--method", "lth"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert "| 0.3000 | 0.1800 | 0.0123 | pass | 4: 0.300 / 0.100 | pretrain 5, finetune 5 | 12 |" in rows["bcs"]
    assert "| 0.1100 | 0.1000 | - |" in rows["anp-vs"]  # a verify.json without the measure: a dash, not a number
    assert "0.9000 (units 0.250)" in rows["anp-vs"] and "(collapsed)" in rows["anp-vs"]
    assert "not finished yet" in rows["lth"]
    data = json.loads(out.strip().splitlines()[-1])
    assert [r["method"] for r in data["rows"]] == ["bcs", "anp-vs", "lth"]


def test_dry_run_keeps_each_rows_steps_in_order_with_jobs(tmp_path, capsys):
    args = ["--data-dir", "d", "--root", str(tmp_path / "r"), "--dry-run", "--jobs", "3", "--sparsity", "0.9",
            "--method", "bcs", "--method", "hydra", "--method", "lth"]
    assert _script().main(args) == 0
    cmds = [line for line in capsys.readouterr().err.splitlines() if line.startswith("$ ")]
    assert len(cmds) == 9
    for method in ("bcs", "hydra", "lth"):
        steps = [c.split(" -m rsp.cli ")[1].split()[0] for c in cmds if f"/{method}-0.9/" in c]
        assert steps == ["train", "export", "verify"], method
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_natural_vs_adversarial_reading_per_objective(tmp_path, capsys):
    # natural: the ticket beats its re-initialisation and edge-popup is within a point; pgd-at: neither holds
    figures = {"natural": {"lth": (0.40, 0.0), "lth-reinit": (0.30, 0.0), "edge-popup": (0.395, 0.0)},
               "pgd-at": {"lth": (0.30, 0.15), "lth-reinit": (0.31, 0.16), "edge-popup": (0.25, 0.10)}}
    for objective, per in figures.items():
        for method, (clean, robust) in per.items():
            _fake_row(tmp_path, f"{objective}-{method}-0.9", clean=clean, robust=robust, epoch=2,
                      collapsed=(objective, method) == ("pgd-at", "lth"),
                      val_robust=None if objective == "natural" else 0.1)  # natural selects on clean only
    args = ["--data-dir", "d", "--root", str(tmp_path), "--sparsity", "0.9", "--report", "--objective", "natural",
            "--objective", "pgd-at", "--method", "lth", "--method", "lth-reinit", "--method", "edge-popup"]
    assert _script().main(args) == 0
    out = capsys.readouterr().out
    assert "| objective | method |" in out and "| pgd-at | edge-popup | 0.9 |" in out
    assert "2: 0.300 / – |" in out  # a natural row has no validation robust accuracy
    assert ("- natural at 90% (clean accuracy): winning tickets hold (lth 40.0 vs lth-reinit 30.0 %); the "
            "random-weight subnetwork reaches the trained one (edge-popup 39.5 vs lth 40.0 %") in out
    # pgd-at's lth collapsed: a class share is no ticket, so neither comparison with it is decided
    assert ("- pgd-at at 90% (robust accuracy): winning tickets not decidable (lth collapsed) (lth 15.0 vs "
            "lth-reinit 16.0 %); the random-weight subnetwork not decidable (lth collapsed) (edge-popup 10.0 vs "
            "lth 15.0 %") in out
    data = json.loads(out.strip().splitlines()[-1])
    assert [(p["objective"], p["winning_ticket"], p["random_weight_subnetwork"]) for p in data["phenomena"]] == \
        [("natural", True, True), ("pgd-at", None, None)]
