"""scripts/rewiring_table.py: the structured-rewiring study's setting, built from the run folders' own records."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rewiring_table.py"


def _script():
    spec = importlib.util.spec_from_file_location("rewiring_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _overall(sparsity, zero_vectors):
    return {"analysis": {"overall": {"sparsity": sparsity, "zero_vectors": zero_vectors, "zero_filters": 0.0}}}


def _fake_row(root: Path, name: str, *, zv, zv_pruned, clean, clean_pruned, regrow):
    """What rsp train and rsp structure --k 1 --no-regroup write, reduced to what the table reads."""
    run = root / name
    (run / "train").mkdir(parents=True)
    (run / "structure").mkdir()
    (run / "train" / "manifest.json").write_text(json.dumps({
        "stage": "train", "status": "complete", "sparsity": 0.99, "training": {"time_s": 5.0},
        "method_config": {"name": "bcs", "regrow": regrow},
        "metrics": {"epoch": 3, "val_clean_acc": 0.4, "selected_collapsed": False}}))
    (run / "structure" / "manifest.json").write_text(json.dumps({
        "stage": "structure", "status": "complete", "structure": {"k": 1, "prune_unit": "vector"},
        "metrics": {"clean_acc": clean_pruned, "split": "test", "n_test": 517}}))
    steps = [{"step": "original", "note": "", **_overall(0.99, zv), "clean_acc": clean, "n": 517, "collapsed": False},
             {"step": "prune", "note": "vectors with <= 1 non-zeros zeroed (9 weights)", **_overall(0.993, zv_pruned),
              "clean_acc": clean_pruned, "n": 517, "collapsed": False},
             {"step": "shrink", "note": "", **_overall(0.99, 0.0), "clean_acc": clean_pruned, "n": 517}]
    (run / "structure" / "analysis.json").write_text(json.dumps({"steps": steps}))


def test_report_renders_cells_beside_the_study_and_reads_the_ordering(tmp_path, capsys):
    figures = {  # regrow -> per seed (zero vectors, after k=1, clean, clean after k=1)
        "random": [(0.02, 0.10, 0.50, 0.40), (0.04, 0.12, 0.52, 0.42)],
        "l2": [(0.07, 0.20, 0.50, 0.30), (0.09, 0.22, 0.50, 0.30)],
        "l2-magnitude-seeded": [(0.11, 0.15, 0.48, 0.38), (0.13, 0.17, 0.48, 0.38)],
    }
    for regrow, per_seed in figures.items():
        for seed, (zv, zvp, c, cp) in enumerate(per_seed):
            _fake_row(tmp_path, f"natural-0.99-{regrow}-s{seed}", zv=zv, zv_pruned=zvp, clean=c, clean_pruned=cp,
                      regrow=regrow)
    args = ["--data-dir", "d", "--root", str(tmp_path), "--sparsity", "0.99", "--report"]
    assert _script().main(args) == 0
    out = capsys.readouterr().out
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:3]): line
            for line in out.splitlines() if line.startswith("| natural") or line.startswith("| trades")}
    # mean ± sd over the two seeds in %, then the study's Table 1 / Table 2 value in the adjacent column
    assert ("| 2 | 0.9930 | 3.00 ± 1.41 | 2.066 | 11.00 ± 1.41 | 9.48 | 51.00 ± 1.41 | 84.89 | 41.00 ± 1.41 | "
            "76.12 |") in rows[("natural", "0.99", "random")]
    assert "| 8.00 ± 1.41 | 7.45 | 21.00 ± 1.41 | 19.145 | 50.00 ± 0.00 | 84.91 | 30.00 ± 0.00 | 58.29 |" \
        in rows[("natural", "0.99", "l2")]
    assert "| 12.00 ± 1.41 | 11.77 | 16.00 ± 1.41 | 24.05 |" in rows[("natural", "0.99", "l2-magnitude-seeded")]
    # the study has no 99 % TRADES network: every study column is a dash, and these rows are not run yet
    assert rows[("trades", "0.99", "l2")].count("–") == 9
    reading = [line for line in out.splitlines() if line.startswith("- natural, 99% sparsity")]
    assert len(reading) == 1
    assert "as trained holds (random 3.00 < l2 8.00 < l2-magnitude-seeded 12.00 %" in reading[0]
    assert "after k = 1 pruning does not hold (random 11.00, l2 21.00, l2-magnitude-seeded 16.00 %" in reading[0]
    assert ("Study (random / l2 / l2-magnitude-seeded): zero vectors as trained 2.066 / 7.45 / 11.77 %; after "
            "pruning 9.48 / 19.145 / 24.05 %; accuracy after pruning 76.12 / 58.29 / 73.11 %.") in reading[0]
    assert not any(line.startswith("- trades, 99%") for line in out.splitlines())  # no finished trades rows
    assert "6 of 12 runs missing" in out
    data = json.loads(out.strip().splitlines()[-1])
    assert len(data["rows"]) == 12
    s = data["summary"]["natural 0.99"]
    assert s["zero_vectors"]["holds"] is True and s["zero_vectors_pruned"]["holds"] is False
    assert abs(s["clean_acc_pruned"]["mean"]["l2"] - 30.0) < 1e-9


def test_dry_run_prints_each_rows_commands_in_order(tmp_path, capsys):
    args = ["--data-dir", "d", "--root", str(tmp_path / "r"), "--dry-run", "--jobs", "2", "--model-kwargs",
            "{width: 0.25}"]
    assert _script().main(args) == 0
    cmds = [line for line in capsys.readouterr().err.splitlines() if line.startswith("$ ")]
    assert len(cmds) == 2 * 2 * 3 * 2 * 2  # objective x sparsity x regrow x seed, two stages each
    for objective in ("natural", "trades"):
        for sparsity in ("0.95", "0.99"):
            for regrow in ("random", "l2", "l2-magnitude-seeded"):
                for seed in (0, 1):
                    run = f"/{objective}-{sparsity}-{regrow}-s{seed}/"
                    mine = [c.split(" -m rsp.cli ")[1] for c in cmds if run in c]
                    assert [c.split()[0] for c in mine] == ["train", "structure"], run
                    train, structure = mine
                    assert f"--method bcs --regrow {regrow} --sparsity {sparsity} --objective {objective}" in train
                    assert "--model vgg11" in train and f"--seed {seed}" in train
                    assert ("--beta 0.6" in train) == (objective == "trades")
                    assert "--k 1 --no-regroup" in structure and structure.split()[1].endswith(run + "train")
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
