"""rsp verify: the artifact is what is scored, the report is written, gates and bad input give the right exit codes."""

import json

import pytest

from rsp.latency import compare, percentile
from rsp.verify import VerifyError, VerifyOptions, evaluate_gates, expand_attacks, pgd_step_size, resolve_evaluation
from helpers import rsp_cli, rsp_cli_here


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("verify")
    r = rsp_cli("train", "--epochs", "1", "--attack-steps", "2", "--eval-attack-steps", "2", "--test-attack-steps", "2",
                "--threads", "1", "--output", root / "run")
    assert r.returncode == 0, r.stderr
    r = rsp_cli("export", root / "run", "--target", "x86-cpu", "--format", "onnx", "--output", root / "bundle")
    assert r.returncode == 0, r.stderr
    return root / "bundle"


FAST = ["--backend", "onnx", "--n-examples", "64", "--steps", "5", "--restarts", "2", "--latency-runs", "5", "--threads", "1"]
# the gate tests check the exit code and what verify.json records about the gate, not the attacks' strength
GATE = ["--backend", "onnx", "--attacks", "pgd", "--n-examples", "16", "--steps", "1", "--restarts", "1",
        "--latency-runs", "5", "--threads", "1"]


def test_verify_scores_the_artifact_writes_the_report_and_passes_gates(onnx_bundle, tmp_path):
    r = rsp_cli("verify", onnx_bundle, *FAST, "--no-sanity", "--min-clean-acc", "0.0", "--output", tmp_path / "v")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert 0.0 <= out["robust_acc"] <= out["clean_acc"] <= 1.0
    assert out["backends"]["onnx"]["robust_acc"] == out["robust_acc"] and out["n_examples"] == 64
    assert out["parity"]["onnx"]["max_abs_err"] < 1e-4
    assert out["latency"]["onnx/batch1"]["p50_ms"] > 0 and "dense_original" in out["latency"]["onnx/batch1"]
    sweep = [a for _, a in out["eps_sweep"]]
    assert sweep[0] == pytest.approx(out["backends"]["onnx"]["clean_acc"], abs=0.05)  # eps 0 is clean (twin vs artifact)
    for name in ("report.md", "robust_vs_eps.png", "latency.png"):
        assert (tmp_path / "v" / name).is_file()
    # the headline speed-up is against the fastest dense runtime timed here, and names it
    b1 = out["latency"]["onnx/batch1"]
    assert {"onnxruntime", "torch"} <= set(b1["dense_runtimes"])
    pool = b1["dense_runtimes"]
    assert pool["onnxruntime"] == b1["dense_original"]  # onnx's own dense original is onnxruntime's: timed once
    fastest = min(pool, key=lambda k: pool[k]["p50_ms"])
    assert b1["fastest_dense"]["runtime"] == fastest == out["speed"]["fastest_dense_runtime"]
    assert out["speed"]["speedup_vs_fastest_dense"] == pytest.approx(pool[fastest]["p50_ms"] / b1["p50_ms"])
    assert f"vs {fastest} (the fastest dense runtime here" in r.stdout
    assert out["speed"]["other_backends"] == {}  # one artifact in this bundle
    report = (tmp_path / "v" / "report.md").read_text()
    assert "## Speed against what a user would otherwise run" in report
    # ANP-VS's latent vulnerability: in verify.json, report.md (overall and per site) and on the terminal
    lv = out["latent_vulnerability"]
    assert lv["vulnerability"] > 0 and lv["vulnerability"] == pytest.approx(sum(lv["layers"].values()) / len(lv["layers"]))
    assert "## Latent vulnerability (ANP-VS)" in report and f"**{lv['vulnerability']:.4g}**" in report
    assert f"): {lv['vulnerability']:.4g}" in r.stderr  # the progress log


def test_last_line_names_every_artifacts_speedup_against_the_fastest_dense_runtime():
    from rsp.cli import _speed_text

    speed = {"backend": "onnx", "speedup_vs_fastest_dense": 0.95, "fastest_dense_runtime": "onnxruntime",
             "fastest_dense_p50_ms": 0.072, "other_backends": {"tvm": 2.61}}
    assert _speed_text({"speed": speed}) == (", 0.95x vs onnxruntime (the fastest dense runtime here, 0.072 ms)"
                                             "; tvm 2.61x")
    assert _speed_text({"speed": {**speed, "speedup_vs_fastest_dense": None}}) == ""


def test_a_failing_gate_exits_1(onnx_bundle, tmp_path):
    r = rsp_cli("verify", onnx_bundle, *GATE, "--no-sanity", "--min-robust-acc", "1.01", "--output", tmp_path / "v")
    assert r.returncode == 1, r.stderr
    assert "FAILED" in r.stdout and "min_robust_acc" in r.stdout
    gates = json.loads((tmp_path / "v" / "verify.json").read_text())["gates"]
    assert gates == [{"gate": "min_robust_acc", "limit": 1.01, "value": gates[0]["value"], "passed": False}]


def test_min_speedup_gate_reads_the_fastest_dense_runtime(onnx_bundle, tmp_path):
    r = rsp_cli("verify", onnx_bundle, *GATE, "--no-sanity", "--min-speedup", "1000", "--output", tmp_path / "v")
    assert r.returncode == 1 and "min_speedup" in r.stdout
    out = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert out["gates"][0]["gate"] == "min_speedup" and out["gates"][0]["value"] == out["speed"]["speedup_vs_fastest_dense"]


def test_bad_input_exits_2_in_one_line(onnx_bundle, tmp_path):
    cases = [
        (["verify", tmp_path], "not an rsp run folder"),
        (["verify", onnx_bundle, "--backend", "tensorflow"], "unknown backend"),
        (["verify", onnx_bundle, "--eps", "9"], "outside [0, 1]"),
        (["verify", onnx_bundle, "--attacks", "fgsm", "--no-sanity", "--n-examples", "8"], "unknown attack"),
        (["verify", onnx_bundle, "--preset", "reference", "--steps", "10"], "fixes its attacks' budgets"),
        (["verify", onnx_bundle, "--preset", "autoattack", "--attacks", "pgd"], "--preset and --attacks"),
        (["verify", onnx_bundle, "--preset", "strong"], "unknown preset"),
        (["verify", onnx_bundle, "--step-size", "0"], "--step-size must be in (0, 1]"),
    ]
    for i, (args, match) in enumerate(cases):
        # the first through a fresh interpreter (the real entry point), the rest in-process: same exit code and line
        r = (rsp_cli if i == 0 else rsp_cli_here)(*args, "--output", tmp_path / "o")
        assert r.returncode == 2, (args, r.stderr)
        assert match in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(onnx_bundle, tampered)
    (tampered / "model.onnx").write_bytes(b"not the exported model")
    r = rsp_cli_here("verify", tampered, "--output", tmp_path / "o2")
    assert r.returncode == 2 and "model.onnx changed" in r.stderr and "Traceback" not in r.stderr


def test_gates_and_helpers():
    summary = {"clean_acc": 0.9, "robust_acc": 0.5, "latency_p50_ms": 3.0, "max_parity_error": 2e-5}
    res = evaluate_gates(summary, {"min_clean_acc": 0.8, "min_robust_acc": 0.6, "max_latency_ms": 5, "max_parity_error": 1e-4})
    assert [g["passed"] for g in res] == [True, False, True, True]
    assert evaluate_gates({**summary, "speedup_vs_fastest_dense": 0.8}, {"min_speedup": 1.0})[0]["passed"] is False
    assert evaluate_gates(summary, {"min_speedup": 1.0})[0]["passed"] is False  # not measured: the gate fails
    assert evaluate_gates(summary, {}) == []
    assert expand_attacks(["pgd", "autoattack"]) == ["pgd", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([5.0], 99) == 5.0
    res = compare({"a": lambda: 1.0, "b": lambda: 2.0}, batch=4, warmup=1, runs=10)
    assert res["a"]["p50_ms"] == 1000.0 and res["b"]["throughput_ips"] == pytest.approx(2.0)


def test_pipeline_runs_all_stages_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "p"
    args = ["pipeline", "--output", out, "--epochs", "1", "--max-steps", "3", "--format", "onnx", "--attacks", "pgd",
            "--steps", "2", "--restarts", "1", "--n-examples", "16"]
    r = rsp_cli(*args)
    assert r.returncode == 0, r.stderr
    for stage in ("train", "structure", "export"):
        assert json.loads((out / stage / "manifest.json").read_text())["status"] == "complete"
    assert (out / "verify" / "verify.json").is_file()
    train_model = (out / "train" / "model.safetensors").read_bytes()
    # an export that died half-way (no manifest): the next run keeps train and structure, rebuilds export
    (out / "export" / "manifest.json").unlink()
    # the resume in-process (the run above went through the real entry point, verify with its full defaults);
    # what is checked here is which stages are kept and which rebuilt, so verify times batch 1 only
    import dataclasses

    import rsp.verify

    verify_run = rsp.verify.run
    monkeypatch.setattr(rsp.verify, "run", lambda bundle, opts, log=print: verify_run(
        bundle, dataclasses.replace(opts, latency_batches=(1,), latency_runs=5), log=log))
    r = rsp_cli_here(*args)
    assert r.returncode == 0, r.stderr
    assert "train: " in r.stderr and "is complete, kept" in r.stderr and "[3/4] export ->" in r.stderr
    assert "[4/4] verify ->" in r.stderr and json.loads((out / "export" / "manifest.json").read_text())["status"] == "complete"
    assert (out / "train" / "model.safetensors").read_bytes() == train_model


def test_presets_name_their_attacks_and_budgets():
    eps = 8 / 255
    default = resolve_evaluation(VerifyOptions(output=""))
    # the default headline is not PGD alone: APGD-CE and APGD-T follow on what PGD left robust
    assert default["preset"] == "default" and default["attacks"] == ["pgd", "apgd-ce", "apgd-t"]
    assert default["cumulative"] and default["n_examples"] == 1000
    assert pgd_step_size(default, eps) == pytest.approx(eps / 4)
    ref = resolve_evaluation(VerifyOptions(output="", preset="reference"))
    assert ref["attacks"] == ["pgd"] and (ref["steps"], ref["restarts"], ref["n_examples"]) == (50, 10, 0)
    assert pgd_step_size(ref, eps) == pytest.approx(2.5 * eps / 50)
    assert resolve_evaluation(VerifyOptions(output="", preset="reference", n_examples=200))["n_examples"] == 200
    aa = resolve_evaluation(VerifyOptions(output="", preset="autoattack"))
    assert aa["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and aa["cumulative"]
    custom = resolve_evaluation(VerifyOptions(output="", attacks=["pgd"], steps=7, step_size=0.01))
    assert custom["preset"] == "custom" and not custom["cumulative"] and pgd_step_size(custom, eps) == 0.01
    with pytest.raises(VerifyError, match="fixes"):
        resolve_evaluation(VerifyOptions(output="", preset="autoattack", restarts=3))


def test_verify_records_the_preset_and_every_attack_parameter(onnx_bundle, tmp_path):
    args = ["--backend", "onnx", "--n-examples", "16", "--latency-runs", "2", "--threads", "1", "--no-sanity"]
    r = rsp_cli("verify", onnx_bundle, *args, "--steps", "3", "--restarts", "1", "--output", tmp_path / "v")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert out["preset"] == "default" and list(out["attacks"]) == ["pgd", "apgd-ce", "apgd-t"]
    assert out["evaluation"]["mode"] == "cumulative"
    pgd = out["attacks"]["pgd"]["config"]
    assert (pgd["steps"], pgd["restarts"]) == (3, 1) and pgd["step_size"] == pytest.approx(max(2 / 255, 2.5 * pgd["eps"] / 3))
    assert out["attacks"]["apgd-t"]["config"]["n_target_classes"] == 9 and out["attacks"]["apgd-ce"]["config"]["steps"] == 100
    per = out["backends"]["onnx"]["per_attack"]
    assert out["robust_acc"] == pytest.approx(min(per.values()))  # cumulative: the last column is the worst case
    assert "worst case of pgd, apgd-ce, apgd-t (preset default)" in r.stdout
    report = (tmp_path / "v" / "report.md").read_text()
    assert "Evaluation preset **default**" in report and "| apgd-t | eps " in report
