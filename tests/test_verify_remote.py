"""rsp verify on other machines' runtimes: the TVM library through a real TVM RPC server (as on a Jetson), the
TensorRT engine path (built on a GPU with the tensorrt package; one clear line without), and the CI workflow
example (every rsp command and flag it runs exists)."""

import gc
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rsp.artifacts import ArtifactError
from helpers import has_module, needs_tvm, rsp_cli, untrained_digits_run

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "verify-gpu.yml"
# PGD alone: these tests are about where the runtimes run and how sessions are held, not about the attack suite
FAST = dict(attacks=["pgd"], n_examples=32, steps=3, restarts=1, sanity=False, latency_runs=5, latency_batches=(1,),
            threads=1)


trt_here = has_module("tensorrt") and torch.cuda.is_available()


def _export(src: Path, out: Path, target: str, formats: list[str]) -> Path:
    from rsp.export import ExportOptions, run

    run(src, out, ExportOptions(target=target, formats=formats, parity_images=16), log=lambda *_: None)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rpc_server():
    """A real TVM RPC server on 127.0.0.1, started the way a Jetson's is; yields its address once it answers."""
    pytest.importorskip("tvm")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                             "--port-end", str(port + 1), "--silent"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "TVM_NUM_THREADS": "1"},
                            start_new_session=True)  # its own group: the server loop runs in a child process

    ready = []

    def wait() -> str:
        """The address, once the server has answered a handshake (checked once: the server serves one client
        at a time, so a session some earlier test still holds would make a second check block)."""
        from rsp.runtimes import RuntimeUnavailable, rpc_session

        gc.collect()  # sessions of earlier tests that only a reference cycle keeps open
        deadline = time.time() + 120
        while not ready:
            try:
                rpc_session(f"127.0.0.1:{port}", timeout=10)  # the session closes when dropped
                ready.append(True)
            except RuntimeUnavailable:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("the TVM RPC server did not start")
                time.sleep(0.5)
        return f"127.0.0.1:{port}"

    try:
        yield wait  # the tests build their bundle while the server imports tvm
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher and its server child, nothing else
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tvm_bundle(tmp_path_factory, rpc_server):
    pytest.importorskip("tvm")
    root = tmp_path_factory.mktemp("remote")
    return _export(untrained_digits_run(root), root / "x86", "x86-cpu", ["tvm"])


# --- TVM over RPC ------------------------------------------------------------------------------------


@needs_tvm
def test_rpc_runtime_scores_and_times_the_library_on_the_remote(tvm_bundle, rpc_server, tmp_path):
    from rsp.runtimes import rpc_session, tvm_rpc_runtime, tvm_runtime
    from rsp.verify import VerifyOptions, run

    address = rpc_server()
    logs = []
    res = run(tvm_bundle, VerifyOptions(output=str(tmp_path / "v"), backends=["tvm"], rpc=address, **FAST),
              log=logs.append)
    # --rpc puts the remote first: its numbers are the ones gated; the local library runs beside it
    assert list(res["backends"]) == ["tvm-rpc", "tvm"]
    assert res["parity"]["tvm-rpc"]["max_abs_err"] < 1e-4 and res["parity"]["tvm"]["max_abs_err"] < 1e-4
    assert res["backends"]["tvm-rpc"]["robust_acc"] == res["backends"]["tvm"]["robust_acc"] == res["robust_acc"]
    lat = res["latency"]["tvm-rpc/batch1"]
    assert lat["p50_ms"] > 0 and lat["p99_ms"] >= lat["p50_ms"] and "over RPC" in lat["runtime"]
    assert lat["dense_original"]["p50_ms"] > 0 and lat["speedup_vs_dense"] > 0
    # the headline is the remote's; the local library's speed-up rides beside it (verify's last line, speed)
    assert list(res["speed"]["other_backends"]) == ["tvm"]
    assert res["speed"]["other_backends"]["tvm"] == res["latency"]["tvm/batch1"]["fastest_dense"]["speedup"]
    remote = res["system"]["remote"]
    assert remote["rpc"] == address and remote["device"] == "remote cpu:0" and remote["remote_triple"]
    assert res["runtimes"]["tvm-rpc"]["rpc"] == address
    assert json.loads((tmp_path / "v" / "verify.json").read_text())["system"]["remote"]["rpc"] == address
    assert any(m.startswith(f"tvm-rpc: model.tvm.so runs on {address}") for m in logs)

    # the remote logits themselves, against the local library and the PyTorch twin
    from rsp.artifacts import load_model
    from rsp.data import load_dataset, to_float

    x = to_float(load_dataset("digits").test_x[:16])
    remote_rt = tvm_rpc_runtime(rpc_session(address), address, tvm_bundle / "model.tvm.so", (1, 8, 8), 1)
    got = remote_rt.predict(x)
    local = tvm_runtime(tvm_bundle / "model.tvm.so", (1, 8, 8), 1).predict(x)
    with torch.no_grad():
        twin = load_model(tvm_bundle)(x)
    assert np.abs(got.numpy() - local.numpy()).max() < 1e-4 and (got - twin).abs().max().item() < 1e-4


@needs_tvm
def test_verify_frees_the_rpc_server_for_the_next_client(tvm_bundle, rpc_server, tmp_path):
    """The Python RPC server serves one client at a time: verify must let its sessions go when it returns, even
    ones only a reference cycle keeps (automatic collection is off here, so nothing else would free them)."""
    from rsp.runtimes import rpc_session
    from rsp.verify import VerifyOptions, run

    address = rpc_server()
    gc.disable()
    try:
        for i in range(2):
            run(tvm_bundle, VerifyOptions(output=str(tmp_path / f"v{i}"), rpc=address, **FAST), log=lambda *_: None)
            assert rpc_session(address, timeout=10).cpu(0).exist  # a second client is served right away
    finally:
        gc.enable()


@needs_tvm
def test_bad_rpc_input_is_one_line_and_exit_2(tvm_bundle, rpc_server, tmp_path):
    from rsp.verify import VerifyOptions, run

    address = rpc_server()
    cases = [
        (dict(rpc="jetson-without-port"), "--rpc must be HOST:PORT"),
        (dict(rpc="127.0.0.1:1"), "cannot connect to the TVM RPC server at 127.0.0.1:1"),
        (dict(backends=["tvm-rpc"]), "needs --rpc HOST:PORT"),
        (dict(rpc_key="jetson"), "--rpc-key needs --rpc"),
        (dict(rpc=address, rpc_key="jetson"), "is not a TVM RPC tracker"),  # a server, not a tracker
    ]
    for over, match in cases:
        with pytest.raises(ArtifactError, match=match):
            run(tvm_bundle, VerifyOptions(output=str(tmp_path / "o"), **{**FAST, **over}), log=lambda *_: None)
    # the server survived the tracker probe
    from rsp.runtimes import rpc_session

    assert rpc_session(address).cpu(0).exist
    r = rsp_cli("verify", tvm_bundle, "--rpc", "127.0.0.1:1", "--output", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot connect to the TVM RPC server at 127.0.0.1:1" in r.stderr and "tvm.exec.rpc_server" in r.stderr


@needs_tvm
def test_a_busy_rpc_server_times_out_in_one_line(tvm_bundle, rpc_server, tmp_path):
    """The Python RPC server serves one client at a time: a second one is accepted and never answered. verify
    must give up after its time-out with exit 2 (TVM's connect is stuck in C++: a normal exit would abort)."""
    from rsp.runtimes import RuntimeUnavailable, rpc_session

    address = rpc_server()
    held = rpc_session(address)
    try:
        t0 = time.time()
        with pytest.raises(RuntimeUnavailable, match="no answer within 2 s"):
            rpc_session(address, timeout=2)
        assert time.time() - t0 < 10
        r = rsp_cli("verify", tvm_bundle, "--rpc", address, "--output", tmp_path / "o",
                    env={**os.environ, "RSP_RPC_TIMEOUT_S": "2"}, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "no answer within 2 s" in r.stderr and "busy with another client" in r.stderr
    finally:
        del held
        gc.collect()
    assert rpc_session(address, timeout=30).cpu(0).exist  # served again once the first client left


# --- TensorRT ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("trt")
    return _export(untrained_digits_run(root), root / "cuda", "cuda", ["tensorrt"])


@pytest.mark.skipif(trt_here, reason="this machine can build TensorRT engines")
def test_tensorrt_without_the_package_or_a_gpu(trt_bundle, tmp_path):
    from rsp.verify import VerifyOptions, run

    # asked for: exit 2 in one line
    r = rsp_cli("verify", trt_bundle, "--backend", "tensorrt", "--output", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "TensorRT engine is built on the GPU that runs it" in r.stderr
    # not asked for: logged as skipped, the bundle's ONNX model is scored
    logs = []
    res = run(trt_bundle, VerifyOptions(output=str(tmp_path / "v"), **FAST), log=logs.append)
    assert any(m.startswith("tensorrt: skipped (") for m in logs), logs
    assert list(res["backends"]) == ["onnx"] and not (tmp_path / "v" / "engines").exists()


def test_tensorrt_build_applies_the_bundle_settings_and_caches(trt_bundle, tmp_path, monkeypatch):
    """The builder against a stand-in for the tensorrt module (the real one needs a GPU): export's settings become
    builder flags, pool limit and optimisation profile; the engine is cached by ONNX, settings, version and GPU."""
    import types

    from rsp.runtimes import build_tensorrt_engine

    built = []

    class Config:
        def __init__(self):
            self.flags, self.pools, self.profiles = set(), {}, []

        def set_flag(self, f):
            self.flags.add(f)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, p):
            self.profiles.append(p.shapes)

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shapes = (name, lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            built.append(config)
            return b"engine"

    class Parser:
        def __init__(self, network, logger):
            pass

        def parse(self, data):
            return data[:4] != b"junk"

    trt = types.SimpleNamespace(
        __version__="10.9-standin", Logger=lambda level: None, Builder=Builder, OnnxParser=Parser,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(), MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
        BuilderFlag=types.SimpleNamespace(FP16="fp16", INT8="int8", SPARSE_WEIGHTS="sparse", GPU_FALLBACK="gpu_fallback"))
    trt.Logger.WARNING = 2
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")
    settings = json.loads((trt_bundle / "tensorrt.json").read_text())
    settings["sparsity"] = True
    onnx = trt_bundle / "model.onnx"
    engine = build_tensorrt_engine(onnx, settings, tmp_path, log=lambda *_: None)
    cfg = built[0]
    assert engine.read_bytes() == b"engine" and engine.parent == tmp_path
    assert cfg.flags == {"fp16", "sparse"} and cfg.pools == {"workspace": 8192 << 20}
    assert cfg.profiles == [("input", (1, 1, 8, 8), (64, 1, 8, 8), (512, 1, 8, 8))]
    assert build_tensorrt_engine(onnx, settings, tmp_path, log=lambda *_: None) == engine and len(built) == 1  # cached
    other = build_tensorrt_engine(onnx, {**settings, "precision": "fp32"}, tmp_path, log=lambda *_: None)
    assert other != engine and built[1].flags == {"sparse"}  # new settings: a new engine
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Another GPU")
    assert build_tensorrt_engine(onnx, settings, tmp_path, log=lambda *_: None) != engine  # engines are per GPU
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    Parser.get_error = lambda self, i: "bad model"
    with pytest.raises(ArtifactError, match="TensorRT cannot parse .*junk.onnx: bad model"):
        build_tensorrt_engine(tmp_path / "junk.onnx", settings, tmp_path, log=lambda *_: None)


@pytest.mark.gpu
@pytest.mark.skipif(not trt_here, reason="needs the tensorrt package and a CUDA GPU")
def test_tensorrt_engine_is_built_cached_scored_and_timed(trt_bundle, tmp_path):
    from rsp.verify import VerifyOptions, run

    opts = dict(FAST, device="cuda", backends=["tensorrt"], latency_batches=(1, 8))
    logs = []
    res = run(trt_bundle, VerifyOptions(output=str(tmp_path / "v"), **opts), log=logs.append)
    engines = sorted((tmp_path / "v" / "engines").glob("*.engine"))
    assert len(engines) == 2 and any(e.name.startswith("dense.") for e in engines)  # the artifact and the dense original
    assert res["parity"]["tensorrt"]["max_abs_err"] < 5e-2 and res["parity"]["tensorrt"]["prediction_agreement"] > 0.9
    for b in (1, 8):
        lat = res["latency"][f"tensorrt/batch{b}"]
        assert lat["p50_ms"] > 0 and "dense_original" in lat and lat["runtime"].startswith("tensorrt ")
    assert res["runtimes"]["tensorrt"]["engine"] in map(str, engines)
    logs.clear()
    run(trt_bundle, VerifyOptions(output=str(tmp_path / "v"), **opts), log=logs.append)
    assert sum(m.startswith("tensorrt: reusing") for m in logs) == 2  # cached: same ONNX, settings, TensorRT, GPU
    assert sorted((tmp_path / "v" / "engines").glob("*.engine")) == engines


# --- the CI workflow example -------------------------------------------------------------------------


def _rsp_commands(workflow: dict) -> list[list[str]]:
    """Every `rsp SUBCOMMAND ...` invocation in the workflow's run steps, as tokens, once per matrix entry
    (with ${{ matrix.X }} filled in; other expressions become a placeholder)."""
    import re

    commands = []
    for job in workflow["jobs"].values():
        for entry in ((job.get("strategy") or {}).get("matrix") or {}).get("include") or [{}]:
            for step in job["steps"]:
                script = re.sub(r"\$\{\{\s*matrix\.(\w+)\s*\}\}", lambda m: str(entry[m.group(1)]), step.get("run", ""))
                script = re.sub(r"\$\{\{[^}]*\}\}", "EXPR", script).replace("\\\n", " ")
                for line in script.splitlines():
                    tokens = shlex.split(line, comments=True)
                    for i, tok in enumerate(tokens):
                        if tok == "rsp" and (i == 0 or tokens[i - 1] in ("&&", "||", ";", "then", "else", "!")):
                            commands.append(tokens[i + 1:])
    return commands


def test_ci_workflow_runs_real_rsp_commands():
    import typer  # its own vendored click: options are read off the parameters, not by class
    import yaml

    from rsp.cli import app
    from rsp.targets import FORMATS, target_names
    from rsp.verify import BACKENDS

    wf = yaml.safe_load(WORKFLOW.read_text())
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as True
    assert "workflow_dispatch" in triggers and "push" in triggers
    labels = [tuple(job["runs-on"]) if isinstance(job["runs-on"], list) else job["runs-on"] for job in wf["jobs"].values()]
    matrix = [m for job in wf["jobs"].values() for m in (job.get("strategy") or {}).get("matrix", {}).get("include", [])]
    runners = {tuple(m["runs-on"]) for m in matrix if "runs-on" in m} | {l for l in labels if isinstance(l, tuple)}
    assert ("self-hosted", "gpu") in runners and ("self-hosted", "jetson") in runners

    group = typer.main.get_command(app)
    commands = _rsp_commands(wf)
    used = {c[0] for c in commands}
    assert {"export", "verify"} <= used, commands
    for cmd in commands:
        sub = group.commands.get(cmd[0])
        assert sub is not None, f"rsp {cmd[0]} is not an rsp subcommand"
        flags = {o for p in sub.params for o in (*p.opts, *getattr(p, "secondary_opts", ())) if o.startswith("-")}
        for tok in cmd[1:]:
            if tok.startswith("--"):
                assert tok.split("=")[0] in flags, f"rsp {cmd[0]} has no option {tok}"
        for flag, allowed in (("--target", target_names()), ("--backend", BACKENDS), ("--format", FORMATS)):
            for i, tok in enumerate(cmd[:-1]):
                if tok == flag:
                    assert cmd[i + 1] in allowed, f"rsp {cmd[0]} {flag} {cmd[i + 1]}: not one of {allowed}"
    verify = next(c for c in commands if c[0] == "verify")
    assert any(t.startswith("--min-") or t.startswith("--max-") for t in verify), "the verify step sets no gate"
    uploads = [s for job in wf["jobs"].values() for s in job["steps"] if "upload-artifact" in s.get("uses", "")]
    assert uploads and all(s.get("if") == "always()" for s in uploads)
    paths = " ".join(s["with"]["path"] for s in uploads)
    assert "verify.json" in paths and "report.md" in paths and ".png" in paths
