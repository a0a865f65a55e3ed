"""scripts/paper_table.py: the poster's table and its ordering sentence come from the run folders' records."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paper_table.py"


def _script():
    spec = importlib.util.spec_from_file_location("paper_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_run(root: Path, name: str, clean: float, robust: float, collapsed: bool = False):
    run = root / name
    (run / "train").mkdir(parents=True)
    (run / "verify").mkdir()
    (run / "train" / "manifest.json").write_text(json.dumps(
        {"status": "complete", "sparsity": 0.99, "training": {"time_s": 3.0}, "metrics": {"epoch": 2, "selected_collapsed": collapsed},
         "method_config": {}}))
    (run / "verify" / "verify.json").write_text(json.dumps(
        {"clean_acc": clean, "robust_acc": robust, "n_examples": 517, "preset": "reference"}))


def test_report_means_spread_poster_columns_and_ordering(tmp_path, capsys):
    robust = {"random": (0.10, 0.12), "fixed": (0.20, 0.22), "bcs": (0.25, 0.31)}
    for method, values in robust.items():
        for seed, r in enumerate(values):
            _fake_run(tmp_path, f"pgd-at-{method}-0.99-s{seed}", 0.5, r, collapsed=(method, seed) == ("random", 1))
    args = ["--data-dir", "d", "--root", str(tmp_path), "--objective", "pgd-at", "--sparsity", "0.99", "--report"]
    assert _script().main(args) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| pgd-at | 0.99 |"))
    # rsp's mean ± sd over the two seeds next to the poster's random / fixed / ours (Standard AT, 99 %)
    assert "50.0 ± 0.0 / 11.0 ± 1.4 | 42.0 / 27.0" in row and "28.0 ± 4.2 | 69.8 / 42.1" in row
    assert "holds for 1 of 1 objectives (pgd-at)" in out
    assert "1 of 6 runs are collapsed classifiers at selection" in out and "pgd-at-random-0.99-s1." in out
    # the per-sparsity reading and the collapse count are generated, not written by hand
    assert "- **99%**: pgd-at (robust): bcs 28.0, fixed 21.0, random 11.0 — holds, largest seed sd 4.2." in out
    assert "Collapse: 1 of the 6 finished runs at 99% were selected as collapsed classifiers" in out
    summary = json.loads(out.strip().splitlines()[-1])["summary"]["0.99"]["pgd-at"]
    assert summary["holds"] and round(summary["bcs_minus_random"], 6) == 17.0


def test_ordering_reports_when_it_fails_and_missing_runs(tmp_path, capsys):
    for method, r in {"random": 0.3, "fixed": 0.2, "bcs": 0.25}.items():
        _fake_run(tmp_path, f"trades-{method}-0.9-s0", 0.6, r)
    args = ["--data-dir", "d", "--root", str(tmp_path), "--objective", "trades", "--sparsity", "0.9", "--seed", "0",
            "--seed", "1", "--report"]
    assert _script().main(args) == 0
    out = capsys.readouterr().out
    assert "holds for 0 of 1 objectives (none)" in out
    assert "3 of 6 runs missing" in out


def test_dry_run_rows_use_the_reference_preset_and_paper_init(tmp_path, capsys):
    args = ["--data-dir", "d", "--root", str(tmp_path / "r"), "--dry-run", "--objective", "natural",
            "--sparsity", "0.9", "--seed", "0"]
    assert _script().main(args) == 0
    cmds = [line for line in capsys.readouterr().err.splitlines() if line.startswith("$ ")]
    assert len(cmds) == 9  # 3 methods x (train, export, verify)
    assert all("--preset reference" in c for c in cmds if " verify " in c)
    assert all("--sparse-init reference" in c and "--decay-scope all" in c for c in cmds if " train " in c)
    assert not (tmp_path / "r").exists()


def test_a_row_killed_before_its_first_checkpoint_resumes(tmp_path, capsys):
    import sys
    sys.path.insert(0, str(SCRIPT.parent))
    import study

    row = study.Row(tmp_path / "r", ["train", "--output", str(tmp_path / "r" / "train")], None, None, {})
    (tmp_path / "r" / "train").mkdir(parents=True)
    assert study.advance(row, dry=True) == 0
    assert "--resume" not in capsys.readouterr().err  # a new folder: a new run
    (tmp_path / "r" / "train" / "manifest.json").write_text(json.dumps({"stage": "train", "status": "running"}))
    assert study.advance(row, dry=True) == 0
    assert capsys.readouterr().err.rstrip().endswith("--resume")  # no train_state yet: rsp train starts it over


def test_a_row_with_its_records_only_is_finished(tmp_path, capsys):
    """Archived records (train manifest + verify.json, no weights) count as a finished row: nothing reruns."""
    import sys
    sys.path.insert(0, str(SCRIPT.parent))
    import study

    _fake_run(tmp_path, "r", 0.5, 0.2)
    row = study.Row(tmp_path / "r", ["train"], ["export"], ["verify"], {})
    assert study.advance(row, dry=True) == 0
    assert "$ " not in capsys.readouterr().err
