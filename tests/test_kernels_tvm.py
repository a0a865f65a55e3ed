"""rsp's BSR kernels linked into the TVM artifact: the Relax rewrite, the host-emulator library that runs here,
the Jetson library with SASS-only sm_87 kernels, and (on a GPU) the CUDA library against PyTorch.

The model is tiny (small-cnn 8-16-16 on 1x8x8, ~90 % sparse): the cost model plans nothing sparse for layers
this small, so the tests force layers sparse (ExportOptions.force_sparse) instead of bending the model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsp.artifacts import ArtifactError, save_tensors, write_manifest
from rsp.export import ExportOptions, run
from rsp.kernels import conv_spec, find_nvcc, generate
from rsp.kernels.build import build_host, compile_kernels, cudart_stub, cuda_library_dir
from rsp.models import create_model
from helpers import needs_tvm

NVCC = find_nvcc()
CXX = shutil.which("g++")
CROSS_CXX = "aarch64-linux-gnu-g++"


needs_cxx = pytest.mark.skipif(CXX is None, reason="no g++ for the host emulator")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
needs_cross = pytest.mark.skipif(shutil.which(CROSS_CXX) is None, reason=f"{CROSS_CXX} not installed (scripts/setup.sh)")

FORCED = ("features.3", "classifier")  # one conv, one linear


def _model(seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("small-cnn", num_classes=10, in_channels=1, mean=[0.5], std=[0.5], channels=[8, 16, 16]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) < 0.1)
            elif isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics: BN really runs after the kernel
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    """A fresh kernel cache: every build here really runs g++/nvcc (and leaves ~/.cache alone)."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("kernel-cache")
        mp.setenv("RSP_KERNEL_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A train-folder contract around the tiny sparse model."""
    model = _model()
    folder = tmp_path_factory.mktemp("kernels-tvm") / "run"
    save_tensors(folder / "model.safetensors", model.state_dict())
    write_manifest(folder, {"stage": "train", "status": "complete", "model": {"name": "small-cnn", "kwargs": model.rsp_config},
                            "dataset": {"dataset": "digits"}, "input": {"shape": [1, 8, 8]}}, ["model.safetensors"])
    return folder, model


def _images(n):
    from rsp.data import load_dataset, to_float

    return to_float(load_dataset("digits").test_x[:n])


def _calls(mod):
    """(op name, extern symbol or None) of every call in main, in order."""
    from tvm import relax

    out = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and hasattr(v.op, "name"):
                sym = str(v.args[0].global_symbol) if v.op.name == "relax.call_dps_packed" else None
                out.append((v.op.name, sym))
    return out


# --- (a) the Relax rewrite --------------------------------------------------------------------------


@needs_tvm
def test_rewrite_replaces_exactly_the_planned_layers(source):
    from rsp.kernels.relax_link import link_sparse_layers
    from rsp.tvm_build import relax_module

    _, model = source
    sd = model.state_dict()
    mod = relax_module(model, 2, (1, 8, 8))
    before = _calls(mod)
    assert [op for op, _ in before].count("relax.nn.conv2d") == 3 and ("relax.matmul", None) in before
    # matched by values, not order: the dict's order is reversed on purpose
    res = link_sparse_layers(mod, {n: sd[f"{n}.weight"] for n in reversed(FORCED)}, fuse=False)
    assert not res.not_linked and sorted(res.symbols) == sorted(FORCED)
    after = _calls(res.mod)
    packed = [s for op, s in after if op == "relax.call_dps_packed"]
    assert packed == [res.symbols["features.3"], res.symbols["classifier"]]  # in graph order
    assert [op for op, _ in after].count("relax.nn.conv2d") == 2 and "relax.matmul" not in [op for op, _ in after]
    assert "relax.permute_dims" not in [op for op, _ in after]  # the replaced linear's weight transpose is gone
    # fuse=False: BN, ReLU, bias add stay TVM operators
    assert [op for op, _ in after].count("relax.nn.batch_norm") == 3 and ("relax.add", None) in after
    script = res.mod.script(show_meta=False)
    assert f'R.call_dps_packed("{res.symbols["features.3"]}", (' in script and "out_ty=R.Tensor((2, 16, 8, 8)" in script
    info = {ll.layer: ll.as_dict() for ll in res.linked}
    assert info["features.3"]["op"] == "conv2d" and info["features.3"]["spec"]["in_hw"] == [8, 8]
    assert info["classifier"]["op"] == "linear" and info["classifier"]["spec"]["in_channels"] == 16
    # a weight that is not in the module (one value changed) links nothing and says why
    w = sd["features.7.weight"].clone()
    w.view(-1)[0] += 1.0
    res2 = link_sparse_layers(mod, {"features.7": w}, fuse=False)
    assert not res2.linked and "no conv2d/matmul with this weight" in res2.not_linked["features.7"]
    assert [op for op, _ in _calls(res2.mod)] == [op for op, _ in before]


@needs_tvm
def test_rewrite_folded_linear_and_unsupported_conv():
    """matmul(x, W.T) with the transpose folded into the constant matches too; a conv the kernels cannot run
    (asymmetric padding) stays a TVM operator, with the reason."""
    from tvm import relax

    from rsp.kernels.relax_link import link_sparse_layers

    g = torch.Generator().manual_seed(1)
    wl = torch.randn(5, 12, generator=g) * (torch.rand(5, 12, generator=g) < 0.3)
    wc = torch.randn(4, 3, 3, 3, generator=g)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 12), "float32"))
    im = relax.Var("im", relax.TensorType((1, 3, 6, 6), "float32"))
    with bb.function("main", [x, im]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(wl.t().contiguous().numpy())))
            z = bb.emit(relax.op.nn.conv2d(im, relax.const(wc.numpy()), padding=(0, 0, 1, 1)))
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    res = link_sparse_layers(bb.get(), {"fc": wl, "conv": wc})
    assert res.symbols.keys() == {"fc"} and res.linked[0].op == "linear"
    assert "asymmetric padding" in res.not_linked["conv"]
    assert [op for op, _ in _calls(res.mod)] == ["relax.call_dps_packed", "relax.nn.conv2d"]


@needs_tvm
def test_rewrite_tap_limit_is_the_cuda_kernels_only():
    """A 9x9 conv (81 taps) is beyond the CUDA kernels' 64-bit tap mask, not beyond the CPU kernels."""
    from tvm import relax

    from rsp.kernels.relax_link import link_sparse_layers

    w = torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    bb = relax.BlockBuilder()
    im = relax.Var("im", relax.TensorType((1, 3, 12, 12), "float32"))
    with bb.function("main", [im]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(im, relax.const(w.numpy()), padding=(4, 4, 4, 4)))
        bb.emit_func_output(out)
    cuda = link_sparse_layers(bb.get(), {"big": w})
    assert not cuda.linked and cuda.not_linked["big"] == "more than 63 taps"
    cpu = link_sparse_layers(bb.get(), {"big": w}, kind="cpu")
    assert [ll.layer for ll in cpu.linked] == ["big"] and cpu.linked[0].kernel.mode == "cpu"


# --- the host FFI variant of a kernel unit ----------------------------------------------------------


@needs_cxx
def test_host_tvm_ffi_object(tmp_path):
    tvm_ffi = pytest.importorskip("tvm_ffi")
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 4, 3, 3, generator=g) * (torch.rand(6, 4, 3, 3, generator=g) < 0.3)
    ks = generate(conv_spec(w.shape, (5, 5), 2, 1), w, label="hostffi")
    obj = build_host(ks, kind="obj", tvm_ffi=True, cache_dir=tmp_path / "cache")
    assert obj.suffix == ".o" and obj.read_bytes()[:4] == b"\x7fELF"
    lib = tmp_path / "hostffi.so"
    r = subprocess.run([CXX, "-shared", "-o", str(lib), str(obj)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # position-independent: links into a shared object as is
    fn = tvm_ffi.load_module(str(lib))[ks.name]
    x = torch.randn(3, 4, 5, 5, generator=g)
    y = torch.empty(3, 6, 3, 3)
    fn(x, y)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 2, 1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="values per sample"):
        fn(x, torch.empty(3, 6, 3, 2))
    with pytest.raises(TypeError, match="float32"):
        fn(x.double(), y)


# --- (b) x86 library with the host-emulator kernels: runs here --------------------------------------


@needs_tvm
@needs_cxx
def test_x86_library_with_host_kernels_matches_pytorch(source, tmp_path):
    from rsp.tvm_build import inspect_library, run_library

    src, model = source
    out = tmp_path / "x86"
    m = run(src, out, ExportOptions(target="x86-cpu", formats=["tvm"], sparse_kernels="host", force_sparse=FORCED,
                                    parity_images=64), log=lambda *_: None)
    k = m["kernels"]
    assert k["linked"] is True and k["mode"] == "host" and "not a fast one" in k["note"]
    assert [r["layer"] for r in k["linked_layers"]] == list(FORCED)
    symbols = {r["layer"]: r["symbol"] for r in k["linked_layers"]}
    for r in k["layers"]:
        assert r.get("linked", False) is (r["layer"] in FORCED)
        assert r["kernel"] == ("sparse" if r["layer"] in FORCED else "dense")
    obj = k["object"]
    assert obj["kind"] == "obj" and len(obj["sha256"]) == 64 and obj["cache_key"] and obj["symbols"] == list(symbols.values())
    # the export's own parity check ran on the linked library
    assert m["parity"]["tvm"]["passed"] and m["parity"]["tvm"]["max_abs_err"] <= 1e-4
    lib = out / "model.tvm.so"
    info = inspect_library(lib)
    assert info["elf_machine"] == "x86_64" and set(symbols.values()) <= set(info["tvm_ffi_functions"])
    assert m["artifacts"]["tvm"]["sparse_kernels"]["mode"] == "host"
    # independently: real images, two batches, against the PyTorch twin
    x = _images(37)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(run_library(lib, x.numpy(), 1) - ref).max() <= 1e-4
    import tvm

    # the library module (imported by the VM executable) resolves the kernel through its __tvm_ffi_ symbol,
    # and loading registered it as a global function too: rsp's argument check answers either way
    fn = tvm.runtime.load_module(str(lib)).get_function(symbols["features.3"], query_imports=True)
    assert tvm.get_global_func(symbols["features.3"], allow_missing=True) is not None
    with pytest.raises(ValueError, match=f"{symbols['features.3']}: x must hold 512 values per sample"):
        fn(tvm.runtime.tensor(np.zeros((1, 8, 8, 4), "float32")), tvm.runtime.tensor(np.zeros((1, 16, 8, 8), "float32")))


@needs_tvm
def test_sparse_kernel_options_bad_input(source, tmp_path):
    src, _ = source
    cases = [
        (dict(sparse_kernels="fast"), "--sparse-kernels must be one of auto, off, host"),
        (dict(sparse_kernels="host", target="cuda"), "has a GPU"),
        (dict(sparse_kernels="host", formats=["onnx"]), "add --format tvm"),
        (dict(force_sparse=("nope",)), "unknown layer 'nope'"),
        (dict(force_sparse=FORCED, sparse_kernels="off"), "force_sparse needs"),
    ]
    for over, match in cases:
        opts = dict(target="x86-cpu", formats=["tvm"], parity_images=8)
        opts.update(over)
        with pytest.raises(ArtifactError, match=match):
            run(src, tmp_path / "o", ExportOptions(**opts), log=lambda *_: None)
    assert not (tmp_path / "o" / "manifest.json").exists()
    r = subprocess.run([sys.executable, "-m", "rsp.cli", "export", str(src), "--target", "cuda", "--sparse-kernels",
                        "host", "-o", str(tmp_path / "c")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "rsp.cli", "export", "--help"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "COLUMNS": "200"})
    text = " ".join(r.stdout.replace("│", " ").split())
    assert "--sparse-kernels" in text and "correctness path" in text and "not a fast one" in text


@needs_tvm
@needs_cxx
def test_auto_on_a_cpu_target_plans_and_links_the_cpu_kernels(source, tmp_path):
    from rsp.tvm_build import inspect_library, run_library

    from rsp.export import kernel_plan
    from rsp.targets import get_target

    src, model = source
    # untuned: every layer runs one of rsp's kernels: sparse where its estimate beats the dense alternative
    # (rsp's dense kernel) by 1.1x, else the dense kernel; the dense library (oneDNN) is timed here
    m = run(src, tmp_path / "x", ExportOptions(target="x86-cpu", formats=["tvm"], parity_images=64), log=lambda *_: None)
    k = m["kernels"]
    assert k["planner"] == "rsp.kernels.cpu.plan_cpu_layers" and k["cpu"] == "x86-64-v3"
    assert k["dense_baseline"] == "library" and k["dense_measured"] is True and k["dense_fallback"] == "rsp-dense"
    planned = [r["layer"] for r in k["layers"] if r["kernel"] == "sparse"]
    assert all(r["est_us"]["sparse"] * 1.1 <= r["est_us"]["alternative"] for r in k["layers"] if r["kernel"] == "sparse")
    assert all(r["dense_kernel"] == "rsp-dense" and r["est_us"]["sparse"] * 1.1 > r["est_us"]["alternative"]
               for r in k["layers"] if r["kernel"] == "dense")
    # every layer's library was timed here; the row says whether that figure or the faster recorded one is used
    assert all(("measured here" in r["dense_source"] or "timed here through PyTorch" in r["dense_source"]) and r["why"]
               for r in k["layers"])
    assert k["linked"] is True and [r["layer"] for r in k["linked_layers"]] == [r["layer"] for r in k["layers"]]
    modes = {r["layer"]: r["kernel_mode"] for r in k["linked_layers"]}
    assert all(modes[r["layer"]] == ("cpu" if r["kernel"] == "sparse" else "cpu-dense") for r in k["layers"])
    assert m["parity"]["tvm"]["passed"] and m["parity"]["tvm"]["max_abs_err"] <= 1e-4
    # tuned: the dense alternative is TVM's tuned schedule (taken at the library's speed); a layer not planned
    # sparse stays a TVM operator
    names = [r["layer"] for r in k["layers"]]
    state = {key: v.detach() for key, v in model.state_dict().items()}
    tuned = kernel_plan(model, (1, 8, 8), get_target("x86-cpu"), state, names, 1, tuned=True)
    assert tuned["dense_baseline"] == "library" and tuned["dense_fallback"] == "tuned TVM"
    assert all("dense_kernel" not in r and r["est_us"]["alternative"] == r["est_us"]["dense"] for r in tuned["layers"])
    assert all((r["kernel"] == "sparse") == (r["est_us"]["sparse"] * 1.1 <= r["est_us"]["dense"]) for r in tuned["layers"])
    # forced layers: the CPU kernels are linked, and the library still matches PyTorch
    out = tmp_path / "forced"
    m = run(src, out, ExportOptions(target="x86-cpu", formats=["tvm"], force_sparse=FORCED, parity_images=64),
            log=lambda *_: None)
    k = m["kernels"]
    linked = [r["layer"] for r in k["linked_layers"]]
    assert k["linked"] is True and set(FORCED) <= set(linked) and set(linked) == set(names)
    assert all(r.get("forced") for r in k["layers"] if r["layer"] in FORCED and r["layer"] not in planned)
    assert "CPU sparse kernels" in k["note"] and k["object"]["cpu"] == "x86-64-v3"
    assert "-march=x86-64-v3" in k["object"]["flags"]
    assert m["artifacts"]["tvm"]["sparse_kernels"]["mode"] == "cpu"
    symbols = [r["symbol"] for r in k["linked_layers"]]
    assert all(sym.startswith("rsp_cpu_") for sym in symbols)
    assert set(symbols) <= set(inspect_library(out / "model.tvm.so")["tvm_ffi_functions"])
    assert m["parity"]["tvm"]["passed"] and m["parity"]["tvm"]["max_abs_err"] <= 1e-4
    x = _images(37)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(run_library(out / "model.tvm.so", x.numpy(), 1) - ref).max() <= 1e-4
    # --sparse-kernels off: the plan says why nothing is linked
    m = run(src, tmp_path / "off", ExportOptions(target="x86-cpu", formats=["tvm"], sparse_kernels="off",
                                                 parity_images=8), log=lambda *_: None)
    k = m["kernels"]
    assert k["linked"] is False and not k["linked_layers"] and "--sparse-kernels off" in k["note"]
    assert all(r["not_linked_reason"] == "--sparse-kernels off" for r in k["layers"] if r["kernel"] == "sparse")
    assert "sparse_kernels" not in m["artifacts"]["tvm"]


@needs_tvm
@needs_cxx
def test_cpu_kernels_thread_pool(tmp_path):
    """Every layer run in parallel on rsp's pool (RSP_CPU_PARALLEL_MIN_WORK=1: an 8x8 map in bands of output
    rows, the small maps and the linear layer split by output channels) matches PyTorch on 1 and 3 threads
    (RSP_NUM_THREADS, in a fresh process each: the pool is made once per library load), with every layer on
    the pool (RSP_CPU_ADAPTIVE=0) and with each layer choosing between the pool and the calling thread by
    timing both: after its probes (33 calls) every layer reports a choice that its medians support."""

    torch.manual_seed(1)
    model = create_model("small-cnn", num_classes=10, in_channels=1, mean=[0.5], std=[0.5], channels=[64, 64, 64]).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) < 0.3)
    folder = tmp_path / "run"
    save_tensors(folder / "model.safetensors", model.state_dict())
    write_manifest(folder, {"stage": "train", "status": "complete", "model": {"name": "small-cnn", "kwargs": model.rsp_config},
                            "dataset": {"dataset": "digits"}, "input": {"shape": [1, 8, 8]}}, ["model.safetensors"])
    m = run(folder, tmp_path / "x", ExportOptions(target="x86-cpu", formats=["tvm"], force_sparse=("features.3",),
                                                  parity_images=64), log=lambda *_: None)
    assert "features.3" in [r["layer"] for r in m["kernels"]["linked_layers"]] and m["parity"]["tvm"]["passed"]
    lib = tmp_path / "x" / "model.tvm.so"
    x = _images(33)
    with torch.no_grad():
        ref = model(x).numpy()
    np.save(tmp_path / "x.npy", x.numpy())
    script = ("import sys, ctypes, numpy as np; from rsp.tvm_build import run_library; "
              f"y = run_library({str(lib)!r}, np.load({str(tmp_path / 'x.npy')!r}), 1); "
              f"np.save(sys.argv[1], y); so = ctypes.CDLL({str(lib)!r}); buf = ctypes.create_string_buffer(1 << 14); "
              "so.rsp_cpu_thread_choices(buf, len(buf)); print(buf.value.decode()); print(so.rsp_cpu_threads())")
    runs = {(1, "1"): None, (3, "0"): None, (3, "1"): None}  # fresh processes, started together
    for threads, adaptive in runs:
        runs[threads, adaptive] = subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / f"y{threads}{adaptive}.npy")], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, "RSP_NUM_THREADS": str(threads),
                                                    "RSP_CPU_PARALLEL_MIN_WORK": "1", "RSP_CPU_ADAPTIVE": adaptive})
    symbols = {r["symbol"] for r in m["kernels"]["linked_layers"]}
    for (threads, adaptive), proc in runs.items():
        try:
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, stderr[-2000:]
        *choices, count = stdout.split("\n")[:-1]
        assert count == str(threads)  # the pool has the threads asked for
        assert np.abs(np.load(tmp_path / f"y{threads}{adaptive}.npy") - ref).max() <= 1e-4
        choices = [line.split() for line in choices if line]
        if threads == 1 or adaptive == "0":  # nothing to choose, or every layer on the pool: no probes
            assert choices == []
            continue
        assert {c[0] for c in choices} == symbols
        for name, choice, on_pool, serial in choices:
            assert choice in ("parallel", "serial") and float(on_pool) > 0 and float(serial) > 0
            assert (choice == "parallel") == (float(on_pool) <= float(serial)), (name, choice, on_pool, serial)


@needs_tvm
@needs_cross
def test_arm64_cpu_library_links_cortex_a76_kernels(source, tmp_path):
    from rsp.tvm_build import inspect_library

    src, _ = source
    m = run(src, tmp_path / "arm", ExportOptions(target="arm64-cpu", formats=["onnx", "tvm"], parity_images=16),
            log=lambda *_: None)
    k = m["kernels"]
    assert k["planner"] == "rsp.kernels.cpu.plan_cpu_layers" and k["cpu"] == "cortex-a76" and k["linked"] is True
    assert k["object"]["cpu"] == "cortex-a76" and "-mcpu=cortex-a76" in k["object"]["flags"]
    assert k["object"]["compiler"] == CROSS_CXX
    info = inspect_library(tmp_path / "arm" / "model.tvm.so")
    assert info["elf_machine"] == "aarch64"
    assert {r["symbol"] for r in k["linked_layers"]} <= set(info["tvm_ffi_functions"])
    assert m["parity"]["onnx"]["passed"] and m["parity"]["tvm"]["passed"] is None  # runs on the board, not here
    out = subprocess.run(["file", str(tmp_path / "arm" / "model.tvm.so")], capture_output=True, text=True).stdout
    assert "ARM aarch64" in out and "shared object" in out


# --- (c) Jetson: aarch64 library with SASS-only sm_87 kernels and their TVM FFI symbols ---------------


@needs_tvm
@needs_nvcc
@needs_cross
def test_jetson_library_links_sm87_kernels(source, tmp_path):
    from rsp.tvm_build import elf_symbol_bytes, inspect_library

    src, _ = source
    out = tmp_path / "orin"
    m = run(src, out, ExportOptions(target="jetson-orin-nano", formats=["tvm"], force_sparse=FORCED, parity_images=8),
            log=lambda *_: None)
    k = m["kernels"]
    assert k["linked"] is True and k["mode"] == "auto" and k["arch"] == "sm_87" and "CUDA kernels" in k["note"]
    symbols = [r["symbol"] for r in k["linked_layers"]]
    assert [r["layer"] for r in k["linked_layers"]] == list(FORCED)
    assert k["object"]["sass_only"] and k["object"]["arch"] == ["sm_87"] and k["object"]["host_compiler"] == CROSS_CXX
    lib = out / "model.tvm.so"
    info = inspect_library(lib)
    # still what test_export's Jetson test demands of TVM's own kernels
    assert info["elf_machine"] == "aarch64" and info["sass"] == ["sm_87"] and not info["ptx"] and not info["cuda_source"]
    # rsp's kernels: SASS for sm_87 only in the .nv_fatbin section, exported as __tvm_ffi_<name>
    assert info["linked_sass"] == ["sm_87"] and not info["linked_ptx"]
    assert set(symbols) <= set(info["tvm_ffi_functions"])
    data = lib.read_bytes()
    assert all(elf_symbol_bytes(data, f"__tvm_ffi_{s}") is not None for s in symbols)
    # the CUDA runtime: the toolkit's aarch64 libcudart_static.a where present, else the device's libcudart.so.N
    assert k["object"]["cudart"].startswith("static") or any(n.startswith("libcudart.so.") for n in info["needed"])
    if shutil.which("file"):
        desc = subprocess.run(["file", "-b", str(lib)], capture_output=True, text=True).stdout
        assert "ELF 64-bit LSB shared object" in desc and "aarch64" in desc, desc
    assert m["parity"]["tvm"]["passed"] is None  # runs on the device (rsp verify)


@needs_nvcc
@needs_cxx
def test_cudart_stub_matches_nvidias_soname_and_versions(tmp_path):
    """The stub that stands in for a Jetson's libcudart at link time must produce references the real library
    satisfies: shown on x86, where the toolkit has the real libcudart.so.N to load against."""
    libdir = cuda_library_dir()
    real = sorted(Path(libdir).glob("libcudart.so.[0-9]*")) if libdir else []
    if not real:
        pytest.skip("no shared libcudart in the toolkit")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 2, 3, 3, generator=g) * (torch.rand(4, 2, 3, 3, generator=g) < 0.3)
    ks = generate(conv_spec(w.shape, (4, 4), 1, 1), w, label="stub")
    obj = compile_kernels(ks, "sm_87", "obj", ptx=False, cache_dir=tmp_path / "cache")
    stub = cudart_stub(obj, CXX, stub_dir=tmp_path / "cache")
    lib = tmp_path / "art.so"
    r = subprocess.run([CXX, "-shared", "-o", str(lib), str(obj), f"-L{stub.parent}", "-lcudart"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    code = (f"import ctypes; ctypes.CDLL({str(lib)!r}, mode=ctypes.RTLD_LOCAL); "
            f"import sys; sys.exit(0 if any('libcudart' in l for l in open('/proc/self/maps')) else 3)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "LD_LIBRARY_PATH": str(libdir), "LD_BIND_NOW": "1"})
    assert r.returncode == 0, r.stderr  # every versioned cudart reference bound to NVIDIA's library


# --- (d) on a GPU: the cuda-target library with linked kernels against PyTorch ----------------------


@pytest.mark.gpu
@needs_tvm
@needs_nvcc
def test_cuda_library_with_linked_kernels_matches_pytorch(source, tmp_path):
    import tvm
    from tvm import relax

    if not tvm.cuda(0).exist:
        pytest.skip("this TVM build has no CUDA runtime (ffi.Module.load_from_bytes.cuda)")
    src, model = source
    out = tmp_path / "cuda"
    m = run(src, out, ExportOptions(target="cuda", formats=["tvm"], force_sparse=FORCED, batch=4, parity_images=8),
            log=lambda *_: None)
    assert m["kernels"]["linked"] and m["artifacts"]["tvm"]["library"]["linked_sass"] == ["sm_80", "sm_90"]
    dev = tvm.cuda(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.tvm.so")), dev)
    x = _images(32)
    with torch.no_grad():
        ref = model(x).numpy()
    got = []
    for i in range(0, len(x), 4):
        res = vm["main"](tvm.runtime.tensor(x[i: i + 4].numpy(), device=dev))
        got.append((res[0] if not hasattr(res, "numpy") else res).numpy())
    err = np.abs(np.concatenate(got) - ref).max()
    assert err <= 1e-4, (err, json.dumps(m["kernels"]["linked_layers"]))
