"""rsp export: the target registry, ONNX/TVM/TensorRT bundles, parity with PyTorch, the manifest and bad input."""

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import rsp.targets
from rsp.artifacts import ArtifactError, check_files, read_manifest, save_tensors, write_manifest
from rsp.export import ExportOptions, run
from rsp.models import create_model
from rsp.targets import FORMATS, get_target, target_names, targets
from helpers import has_module, needs_tvm, rsp_cli, rsp_cli_here

CROSS_CXX = "aarch64-linux-gnu-g++"
needs_cross = pytest.mark.skipif(shutil.which(CROSS_CXX) is None,
                                 reason=f"{CROSS_CXX} not installed: run scripts/setup.sh (apt-get install g++-aarch64-linux-gnu)")
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file(),
                                reason="nvcc (a CUDA toolkit) not installed: Jetson/CUDA TVM builds compile their kernels here")


def _nvcc():
    return shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A real (if barely trained) train folder: digits, small CNN, 90 % sparse."""
    out = tmp_path_factory.mktemp("export-src") / "run"
    r = rsp_cli("train", "--epochs", "1", "--max-steps", "3", "--attack-steps", "1", "--eval-attack-steps", "1",
                "--test-attack-steps", "1", "--batch-size", "64", "--threads", "1", "--output", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def x86_bundle(tiny_run, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    formats = ["onnx", "tvm"] if has_module("tvm") else ["onnx"]
    out = tmp_path_factory.mktemp("export") / "x86"
    manifest = run(tiny_run, out, ExportOptions(target="x86-cpu", formats=formats, parity_images=128),
                   log=lambda *_: None)
    return out, manifest


def _images(n=64):
    from rsp.data import load_dataset, to_float

    return to_float(load_dataset("digits").test_x[:n])


# --- registry -----------------------------------------------------------------------------------------


def test_registry_names_the_required_targets_with_their_hardware():
    reg = targets()
    assert {"jetson-orin-nano", "jetson-agx-orin", "jetson-thor", "x86-cpu", "cuda"} <= set(reg)
    for name in ("jetson-orin-nano", "jetson-agx-orin"):
        t = reg[name]
        assert t.triple == "aarch64-linux-gnu" and t.cuda_arch == ("sm_87",) and t.mcpu == "cortex-a78ae"
        assert t.cross_compiler == CROSS_CXX and t.tvm["tag"].startswith("nvidia/jetson-")
    assert reg["jetson-thor"].cuda_arch == ("sm_110",) and reg["jetson-thor"].tvm["tag"] == "nvidia/jetson-agx-thor"
    assert set(reg["cuda"].cuda_arch) == {"sm_80", "sm_90"} and reg["cuda"].triple.startswith("x86_64")
    assert reg["x86-cpu"].cuda_arch == () and reg["x86-cpu"].tensorrt is None and "tensorrt" not in reg["x86-cpu"].formats
    # a CPU-only Arm board: cross-compiled host library, rsp's CPU kernels built for its core (rsp.kernels.cpu)
    from rsp.kernels.cpu import CPUS

    arm = reg["arm64-cpu"]
    assert arm.cuda_arch == () and arm.triple == "aarch64-linux-gnu" and arm.cross_compiler == CROSS_CXX
    assert arm.mcpu in CPUS and reg["x86-cpu"].mcpu in CPUS
    # Xavier is listed only with its requirement stated: CUDA 13 cannot compile sm_72
    xavier = reg["jetson-agx-xavier"]
    assert xavier.cuda_arch == ("sm_72",) and xavier.cuda_toolkit_max_major == 12 and "tvm" not in xavier.formats
    for t in reg.values():
        assert set(t.formats) <= set(FORMATS) and t.precision in ("fp32", "fp16")
        assert t.triple and t.description
        if t.tensorrt:
            assert t.tensorrt["precision"] in ("fp32", "fp16", "int8") and t.tensorrt["max_batch"] >= t.tensorrt["opt_batch"]


def test_every_target_is_one_declarative_yaml_file():
    folder = Path(rsp.targets.__file__).parent  # targets/ at the repository root, installed as rsp.targets
    assert sorted(p.stem for p in folder.glob("*.yaml")) == target_names()


def test_unknown_target_lists_the_registry():
    with pytest.raises(ArtifactError, match="unknown target 'nope'; available targets: arm64-cpu, cuda, "):
        get_target("nope")


@needs_tvm
def test_registry_entries_are_valid_tvm_targets():
    import tvm

    from rsp.tvm_build import target_config

    for t in targets().values():
        cfg = target_config(t)
        built = tvm.target.Target(cfg)  # TVM 0.27 targets are JSON dicts
        if t.has_cuda:
            assert cfg["kind"] == "cuda" and cfg["arch"] == t.cuda_arch[0]
            assert built.host is not None and str(cfg["host"]["mtriple"]) == t.triple
            assert cfg["host"]["mcpu"] == t.mcpu  # e.g. the orin-nano tag's carmel is overridden
        else:
            assert cfg["kind"] == "llvm" and cfg["mcpu"] == t.mcpu


def test_list_targets_and_unknown_target_cli():
    r = rsp_cli("export", "--list-targets")
    assert r.returncode == 0
    lines = r.stdout.strip().split("\n\n")[0].splitlines()  # the targets; the family aliases follow
    assert [ln.split()[0] for ln in lines] == target_names()
    assert any("sm_87" in ln and "nvidia/jetson-orin-nano" in ln for ln in lines)
    assert any(ln.startswith("jetson-agx-xavier") and "CUDA <= 12" in ln for ln in lines)
    r = rsp_cli_here("export", "somewhere", "--target", "nope", "--output", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "unknown target 'nope'" in r.stderr and "jetson-orin-nano" in r.stderr and "x86-cpu" in r.stderr


# --- the x86 bundle: runs here -------------------------------------------------------------------------


def test_x86_bundle_manifest(x86_bundle, tiny_run):
    out, m = x86_bundle
    src = read_manifest(tiny_run)
    assert read_manifest(out, stage="export") == m and m["status"] == "complete"
    assert m["target"]["name"] == "x86-cpu" and m["target"]["registry"]["cpu"]["triple"] == "x86_64-linux-gnu"
    assert m["input"]["shape"] == [1, 8, 8] and m["input"]["range"] == [0.0, 1.0]
    assert m["normalization"] == src["normalization"] and m["metrics"] == src["metrics"]
    assert m["model"] == src["model"] and m["sparsity"] == pytest.approx(src["sparsity"])
    assert m["source"]["manifest_sha256"] and m["source"]["stage"] == "train"
    # every file is hashed, and nothing in the folder is left out
    on_disk = {p.name for p in out.iterdir() if p.name != "manifest.json"}
    assert set(m["files"]) == on_disk and not check_files(out, m)
    # per-layer kernel choice
    layers = [r["layer"] for r in m["kernels"]["layers"]]
    assert layers == [r["name"][: -len(".weight")] for r in m["layers"]]
    assert all(r["kernel"] and (m["kernels"]["planner"] or r["reason"]) for r in m["kernels"]["layers"])
    assert m["parity"]["onnx"]["passed"] and m["parity"]["onnx"]["max_abs_err"] <= 1e-4
    assert m["parity"]["onnx"]["images"]["n"] == 128


def test_bundle_loads_as_a_model_with_the_exact_weights(x86_bundle, tiny_run):
    out, _ = x86_bundle
    x = _images(16)
    with torch.no_grad():
        assert torch.equal(rsp.load_model(out)(x), rsp.load_model(tiny_run)(x))
    assert (out / "model.safetensors").read_bytes() == (tiny_run / "model.safetensors").read_bytes()


def test_onnx_model_checks_and_matches_pytorch(x86_bundle):
    import onnx
    import onnxruntime as ort

    out, m = x86_bundle
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17 and m["artifacts"]["onnx"]["opset"] == opset
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert float(meta["rsp.sparsity"]) == pytest.approx(m["sparsity"], abs=1e-6)
    assert [r["name"] for r in json.loads(meta["rsp.layers"])] == [r["name"] for r in m["layers"]]
    assert m["artifacts"]["onnx"]["weight_sparsity"] == pytest.approx(m["sparsity"], abs=1e-6)  # zeros survive BN folding
    # independent parity check on real images, two batch sizes
    model = rsp.load_model(out)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 37):
        x = _images(n)
        got = sess.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - model(x).numpy()).max() <= 1e-4


@needs_tvm
def test_x86_tvm_library_runs_here_and_matches_pytorch(x86_bundle):
    from rsp.tvm_build import inspect_library, run_library

    out, m = x86_bundle
    info = m["artifacts"]["tvm"]
    assert info["file"] == "model.tvm.so" and info["target"]["kind"] == "llvm" and info["batch"] == 1
    assert inspect_library(out / "model.tvm.so")["elf_machine"] == "x86_64"
    assert m["parity"]["tvm"]["passed"] and m["parity"]["tvm"]["max_abs_err"] <= 1e-4
    x = _images(20)
    with torch.no_grad():
        ref = rsp.load_model(out)(x).numpy()
    assert np.abs(run_library(out / "model.tvm.so", x.numpy(), 1) - ref).max() <= 1e-4
    assert m["latency_here"]["tvm_cpu_batch_1_s"] > 0 and m["latency_here"]["onnxruntime_cpu_batch_1_s"] > 0


def test_changed_file_is_detected(x86_bundle, tmp_path):
    out, _ = x86_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    m = read_manifest(copy)
    assert check_files(copy, m) == []
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    assert check_files(copy, m) == ["model.onnx changed (sha256 differs from the manifest)"]
    (copy / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="model.safetensors changed"):
        rsp.load_model(copy)
    # and a changed source folder is refused by export itself
    r = rsp_cli_here("export", copy, "--target", "x86-cpu", "--output", tmp_path / "again")
    assert r.returncode == 2 and "export' folder" in r.stderr and "Traceback" not in r.stderr


# --- bad input ----------------------------------------------------------------------------------------


def _folder(tmp_path, name="small-cnn", **manifest_extra):
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, mean=[0.0], std=[1.0]).eval()
    folder = tmp_path / "run"
    folder.mkdir()
    save_tensors(folder / "model.safetensors", model.state_dict())
    write_manifest(folder, {"stage": "train", "status": "complete", "model": {"name": name, "kwargs": model.rsp_config},
                            "dataset": {"dataset": "digits"}, "input": {"shape": [1, 8, 8]}, **manifest_extra},
                   ["model.safetensors"])
    return folder, model


def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_run):
    src, _ = _folder(tmp_path)
    notvm = tmp_path / "notvm" / "tvm"
    notvm.mkdir(parents=True)
    (notvm / "__init__.py").write_text("raise ImportError('No module named tvm (simulated)')\n")
    env = {**os.environ, "PYTHONPATH": f"{notvm.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = tmp_path / "o"
    cases = [  # through the CLI: exit code 2, one line on stderr, no traceback
        (["export", tmp_path, "--target", "x86-cpu", "-o", out], "not an rsp run folder", None),
        (["export", src, "-o", out], "--target is required", None),
        (["export", "--target", "x86-cpu"], "missing RUN_DIR", None),
        (["export", src, "--target", "x86-cpu", "--format", "tvm", "-o", out], "needs Apache TVM 0.27", env),
    ]
    for args, match, case_env in cases:
        # a simulated missing TVM needs a fresh interpreter (the real entry point); the others run in-process
        r = rsp_cli(*args, env=case_env) if case_env else rsp_cli_here(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert match in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    # the same error class (ArtifactError -> one line, exit 2 in the CLI) for the other bad options
    api_cases = [
        (dict(source=tmp_path / "missing"), "is not a folder"),
        (dict(target="nope"), "unknown target 'nope'"),
        (dict(formats=["pdf"]), "unknown format 'pdf'"),
        (dict(formats=["tensorrt"]), "has no NVIDIA GPU"),
        (dict(opset=13), "--opset must be >= 17"),
        (dict(precision="int4"), "--precision"),
        (dict(trt_precision="fp8", target="cuda"), "--trt-precision"),
        (dict(tune_trials=4), "add --format tvm"),
        (dict(parity_images=0), "--parity-images"),
        (dict(output=tiny_run), "already holds an rsp folder"),
        (dict(output=src), "--output must differ"),
    ]
    for over, match in api_cases:
        opts = dict(target="x86-cpu", formats=["onnx"])
        opts.update({k: v for k, v in over.items() if k not in ("source", "output")})
        with pytest.raises(ArtifactError, match=match):
            run(over.get("source", src), over.get("output", out), ExportOptions(**opts), log=lambda *_: None)
    assert not (out / "manifest.json").exists()
    (src / "model.safetensors").write_bytes(b"tampered")
    r = rsp_cli_here("export", src, "--target", "x86-cpu", "--format", "onnx", "-o", tmp_path / "o2")
    assert r.returncode == 2 and "changed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_cifar_source_needs_its_data(tmp_path, cifar_dir):
    torch.manual_seed(0)
    model = create_model("small-cnn", channels=[8, 8]).eval()
    folder = tmp_path / "c"
    save_tensors(folder / "model.safetensors", model.state_dict())
    write_manifest(folder, {"stage": "structure", "status": "complete", "model": {"name": "small-cnn", "kwargs": model.rsp_config},
                            "dataset": {"dataset": "cifar10"}, "input": {"shape": [3, 32, 32]}}, ["model.safetensors"])
    r = rsp_cli_here("export", folder, "--target", "x86-cpu", "--format", "onnx", "-o", tmp_path / "o")
    assert r.returncode == 2 and "--data-dir" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
    m = run(folder, tmp_path / "o", ExportOptions(target="x86-cpu", formats=["onnx"], data_dir=str(cifar_dir),
                                                  parity_images=32), log=lambda *_: None)
    assert m["parity"]["onnx"]["passed"] and m["parity"]["onnx"]["images"]["dataset"] == "cifar10"


# --- ONNX fp16 and TensorRT settings -------------------------------------------------------------------


def test_fp16_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    src, _ = _folder(tmp_path)
    m = run(src, tmp_path / "o", ExportOptions(target="cuda", formats=["onnx"], precision="fp16", parity_images=64),
            log=lambda *_: None)
    assert m["artifacts"]["onnx"]["precision"] == "fp16" and m["parity"]["onnx"]["passed"]
    assert m["parity"]["onnx"]["argmax_agreement"] >= 0.95
    import onnx

    proto = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def _make_trt_2_4(model):
    """Zero 2 of every 4 consecutive input channels at each (out, kh, kw) of the convs with C % 4 == 0."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and mod.weight.shape[1] % 4 == 0:
                w = mod.weight
                wt = w.permute(0, 2, 3, 1) if w.dim() == 4 else w
                mask = torch.zeros_like(wt).reshape(-1, 4)
                mask[:, :2] = 1
                wt.mul_(mask.reshape(wt.shape))
    return model


def test_tensorrt_bundle_carries_onnx_and_build_settings(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _make_trt_2_4(create_model("small-cnn", in_channels=1, mean=[0.0], std=[1.0]).eval())
    src = tmp_path / "run"
    save_tensors(src / "model.safetensors", model.state_dict())
    write_manifest(src, {"stage": "structure", "status": "complete", "model": {"name": "small-cnn", "kwargs": model.rsp_config},
                         "dataset": {"dataset": "digits"}, "input": {"shape": [1, 8, 8]}}, ["model.safetensors"])
    out = tmp_path / "trt"
    r = rsp_cli("export", src, "--target", "jetson-orin-nano", "--format", "tensorrt", "--trt-precision", "int8",
                "--output", out)
    assert r.returncode == 0, r.stderr
    m = read_manifest(out, stage="export")
    settings = json.loads((out / "tensorrt.json").read_text())
    assert set(m["files"]) == {"model.safetensors", "model.onnx", "tensorrt.json", "calibration.safetensors"}
    assert settings["sparse_2_4_layers"] == ["classifier", "features.3", "features.7"]  # the first conv has C = 1
    cmd = settings["trtexec"]
    assert cmd.startswith("trtexec --onnx=model.onnx") and "--int8" in cmd and "--sparsity=enable" in cmd
    assert "--minShapes=input:1x1x8x8" in cmd and "--maxShapes=input:8x1x8x8" in cmd
    assert m["parity"]["onnx"]["passed"] and m["artifacts"]["tensorrt"]["engine_built"] is False
    assert [r["trt_2_4"] for r in m["layers"]] == [False, True, True, True]


@pytest.mark.gpu
def test_tensorrt_engine_builds_on_a_gpu(tmp_path):
    pytest.importorskip("tensorrt")
    from rsp.export import build_tensorrt_engine

    src, _ = _folder(tmp_path)
    out = tmp_path / "trt"
    run(src, out, ExportOptions(target="cuda", formats=["tensorrt"], parity_images=32), log=lambda *_: None)
    engine = build_tensorrt_engine(out)
    assert engine.is_file() and build_tensorrt_engine(out) == engine  # cached


# --- Jetson: cross-compiled aarch64 library with an sm_87 fatbin ---------------------------------------


@needs_tvm
@needs_cross
@needs_nvcc
def test_jetson_orin_nano_bundle(tiny_run, tmp_path):
    from rsp.tvm_build import inspect_library, nvcc_version

    out = tmp_path / "orin"
    r = rsp_cli("export", tiny_run, "--target", "jetson-orin-nano", "--output", out, "--parity-images", "64")
    assert r.returncode == 0, r.stderr
    m = read_manifest(out, stage="export")
    assert m["formats"] == ["onnx", "tvm", "tensorrt"] and not check_files(out, m)
    lib = out / "model.tvm.so"
    if shutil.which("file"):
        desc = subprocess.run(["file", "-b", str(lib)], capture_output=True, text=True).stdout
        assert "ELF 64-bit LSB shared object" in desc and "aarch64" in desc, desc
    info = inspect_library(lib)
    # how to tell: the library's serialized module blob (symbol __tvm_ffi__library_bin) holds a CUDA module
    # whose format is "fatbin" with SASS for sm_87 (fatbin magic 0xBA55ED50, ELF entries with e_machine
    # EM_CUDA), and no CUDA C++ source is left anywhere in the file
    assert info["elf_machine"] == "aarch64" and info["modules"][-1] == "cuda"
    assert [c["fmt"] for c in info["cuda_modules"]] == ["fatbin"]
    assert info["sass"] == ["sm_87"] and not info["ptx"] and not info["cuda_source"]
    assert b'extern "C" __global__' not in lib.read_bytes()
    cuda = m["artifacts"]["tvm"]["cuda"]
    assert cuda["arch"] == ["sm_87"] and cuda["cuda_major"] == int(nvcc_version(_nvcc()).split(".")[0])
    assert any("driver" in n for n in cuda["device_needs"]) and "nvcc" in cuda["device_does_not_need"]
    assert m["artifacts"]["tvm"]["target"]["host"]["mcpu"] == "cortex-a78ae"
    assert m["parity"]["tvm"]["passed"] is None and m["parity"]["onnx"]["passed"]
    assert (out / "tensorrt.json").is_file() and "--fp16" in m["artifacts"]["tensorrt"]["trtexec"]
    # per-layer kernel choice: rsp.kernels' cost model where it is available, dense with a reason otherwise
    kernels = m["kernels"]
    assert [r["layer"] for r in kernels["layers"]] == [r["name"][: -len(".weight")] for r in m["layers"]]
    assert all(r["kernel"] in ("dense", "sparse") for r in kernels["layers"])
    assert kernels["planner"] in (None, "rsp.kernels.costmodel.plan_model")
    # --sparse-kernels auto: the layers planned sparse call rsp's CUDA kernels, linked as SASS-only sm_87 code
    sparse = [r["layer"] for r in kernels["layers"] if r["kernel"] == "sparse"]
    assert kernels["linked"] is bool(sparse) and [r["layer"] for r in kernels["linked_layers"]] == sparse
    assert set(info["tvm_ffi_functions"]) >= {r["symbol"] for r in kernels["linked_layers"]}
    if sparse:
        assert info["linked_sass"] == ["sm_87"] and not info["linked_ptx"]


@needs_tvm
@needs_cross
def test_default_tvm_library_holds_cuda_source_which_rsp_replaces(tmp_path, monkeypatch):
    """The contrast the test above relies on: TVM 0.27's own export keeps CUDA source (fmt "cuda") where no
    CUDA driver is loaded (forced here, as rsp does, so that a GPU machine gives the same answer)."""
    monkeypatch.setenv("TVM_COMPILE_FORCE_FALLBACK", "1")
    import tvm
    from tvm.support import cc

    from rsp.tvm_build import inspect_library, relax_module, tvm_target

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    mod = relax_module(model, 1, (1, 2, 2))
    lib = tmp_path / "default.so"
    tvm.compile(mod, target=tvm_target(get_target("jetson-orin-nano"))).export_library(
        str(lib), fcompile=cc.cross_compiler(CROSS_CXX))
    info = inspect_library(lib)
    assert info["elf_machine"] == "aarch64" and [c["fmt"] for c in info["cuda_modules"]] == ["cuda"]
    assert info["cuda_source"] and info["sass"] == []


@needs_tvm
def test_incbin_packed_library_loads_and_runs_here(tmp_path):
    """rsp links the (rewritten) import blob with .incbin instead of TVM's C/LLVM packers; TVM's loader
    must find and read it: shown on a CPU library, which this machine can load."""
    import tvm

    from rsp.tvm_build import blob_packer, relax_module, run_library, tvm_target

    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, mean=[0.0], std=[1.0], channels=[4, 8]).eval()
    lib = tmp_path / "incbin.so"
    seen = []
    tvm.compile(relax_module(model, 2, (1, 8, 8)), target=tvm_target(get_target("x86-cpu"))).export_library(
        str(lib), fpack_imports=blob_packer(lambda b: seen.append(len(b)) or b))
    assert seen and seen[0] > 0
    x = _images(6)
    with torch.no_grad():
        assert np.abs(run_library(lib, x.numpy(), 2) - model(x).numpy()).max() <= 1e-4


@needs_nvcc
def test_fatbin_compile_and_blob_rewrite():
    from rsp.tvm_build import compile_fatbin, parse_fatbins, replace_cuda_source, blob_modules

    src = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }\n'
    fatbin = compile_fatbin(src, ("sm_87", "sm_90"), _nvcc())
    (fb,) = parse_fatbins(fatbin)
    assert [(e["kind"], e["sm"], e.get("elf_machine"), e.get("elf_sm")) for e in fb["entries"]] == \
        [("elf", 87, "cuda", 87), ("elf", 90, "cuda", 90)]

    # a TVM 0.27 library blob: import tree, a VM executable, the host library, one CUDA module with source
    def s(b):
        return struct.pack("<Q", len(b)) + b

    info = s(b"k") + s(b"k") + struct.pack("<Q", 1) + bytes([3, 64, 1, 0]) + struct.pack("<Q", 1) + s(b"threadIdx.x") \
        + struct.pack("<Q", 1) + bytes(4)
    cuda = s(b"cuda") + struct.pack("<Q", 1) + info + s(src.encode())
    body = struct.pack("<5Q", 4, 0, 1, 2, 2) + struct.pack("<3Q", 2, 1, 2) + s(b"relax.VMExecutable") + s(b"vm") \
        + s(b"_lib") + s(b"cuda") + s(cuda)
    blob = struct.pack("<Q", len(body)) + body
    assert [m.get("fmt") for m in blob_modules(blob)] == [None, None, "cuda"]
    new, swapped = replace_cuda_source(blob, lambda code: compile_fatbin(code, ("sm_87",), _nvcc()))
    mods = blob_modules(new)
    assert [m["kind"] for m in mods] == ["relax.VMExecutable", "_lib", "cuda"] and mods[2]["fmt"] == "fatbin"
    assert [e["sm"] for f in mods[2]["fatbins"] for e in f["entries"]] == [87] and len(swapped) == 1
    with pytest.raises(ArtifactError, match="layout"):
        replace_cuda_source(blob[:-3], lambda code: b"")


@needs_tvm
@needs_nvcc
def test_xavier_tvm_needs_a_cuda_12_toolkit(tmp_path):
    from rsp.tvm_build import nvcc_version

    if int(nvcc_version(_nvcc()).split(".")[0]) <= 12:
        pytest.skip("this nvcc can compile sm_72")
    src, _ = _folder(tmp_path)
    r = rsp_cli_here("export", src, "--target", "jetson-agx-xavier", "--format", "tvm", "--parity-images", "8",
                     "-o", tmp_path / "x")
    assert r.returncode == 2 and "needs a CUDA <= 12 toolkit" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


# --- MetaSchedule tuning: records cached and reused ----------------------------------------------------


@needs_tvm
def test_tuning_records_are_cached_and_reused(tmp_path):
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, mean=[0.0], std=[1.0], channels=[4, 8]).eval()
    src = tmp_path / "run"
    save_tensors(src / "model.safetensors", model.state_dict())
    write_manifest(src, {"stage": "train", "status": "complete", "model": {"name": "small-cnn", "kwargs": model.rsp_config},
                         "dataset": {"dataset": "digits"}, "input": {"shape": [1, 8, 8]}}, ["model.safetensors"])
    opts = dict(target="x86-cpu", formats=["tvm"], tune_trials=2, tune_cache=str(tmp_path / "cache"), parity_images=16)
    first = run(src, tmp_path / "a", ExportOptions(**opts), log=lambda *_: None)["artifacts"]["tvm"]["tuning"]
    assert first["trials_run"] == 2 and first["trials_reused"] == 0
    assert (tmp_path / "cache" / "database_tuning_record.json").stat().st_size > 0
    second = run(src, tmp_path / "b", ExportOptions(**opts), log=lambda *_: None)
    assert second["artifacts"]["tvm"]["tuning"]["trials_run"] == 0
    assert second["artifacts"]["tvm"]["tuning"]["trials_reused"] == 2
    assert second["parity"]["tvm"]["passed"] and second["artifacts"]["tvm"]["schedule"] == "meta_schedule"

    # verify's speed-up compares like with like: the dense original gets the bundle's tuning (its records here)
    from rsp.verify import VerifyOptions, run as verify

    res = verify(tmp_path / "b", VerifyOptions(output=str(tmp_path / "v"), backends=["tvm"], n_examples=16, steps=2,
                                               restarts=1, sanity=False, latency_runs=5, latency_batches=(1,)),
                 log=lambda *_: None)
    build = res["latency"]["tvm/batch1"]["dense_original"]["build"]
    assert build["schedule"] == "meta_schedule" and build["tune_trials"] == build["bundle_tune_trials"] == 2
    assert build["tune_cache"] == str(tmp_path / "cache")


# --- per-layer kernel choice ----------------------------------------------------------------------------


def test_kernel_plan_uses_rsp_kernels_planner_when_present(monkeypatch):
    import rsp.export as export

    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, mean=[0.0], std=[1.0]).eval()
    from rsp.sparse import sparsifiable_layers

    names = [n for n, _ in sparsifiable_layers(model)]
    state = model.state_dict()
    monkeypatch.setattr(export, "_planner", lambda: None)
    dense = export.kernel_plan(model, (1, 8, 8), get_target("jetson-orin-nano"), state, names, 1)
    assert dense["planner"] is None and [r["layer"] for r in dense["layers"]] == names
    assert {r["reason"] for r in dense["layers"]} == {"rsp.kernels.costmodel.plan_model is not available"}

    calls = []

    def plan_model(model, input_shape, arch=None, batch=None):
        calls.append((input_shape, arch, batch))
        return {n: {"kernel": "sparse" if i else "dense", "block": [1, 4]} for i, n in enumerate(names)}

    monkeypatch.setattr(export, "_planner", lambda: plan_model)
    planned = export.kernel_plan(model, (1, 8, 8), get_target("jetson-orin-nano"), state, names, 1)
    assert calls == [((1, 1, 8, 8), "sm_87", 1)] and planned["planner"] == "rsp.kernels.costmodel.plan_model"
    assert [r["kernel"] for r in planned["layers"]] == ["dense", "sparse", "sparse", "sparse"]
    cpu = export.kernel_plan(model, (1, 8, 8), get_target("x86-cpu"), state, names, 1)
    assert cpu["planner"] == "rsp.kernels.cpu.plan_cpu_layers" and len(calls) == 1  # CPU targets: the CPU model
    assert [r["layer"] for r in cpu["layers"]] == names
    monkeypatch.setattr(export, "_cpu_planner", lambda: None)
    cpu = export.kernel_plan(model, (1, 8, 8), get_target("x86-cpu"), state, names, 1)
    assert cpu["planner"] is None and cpu["layers"][0]["reason"] == "rsp.kernels.cpu is not available"
    off = export.kernel_plan(model, (1, 8, 8), get_target("jetson-orin-nano"), state, names, 1, mode="off")
    assert off["planner"] == "rsp.kernels.costmodel.plan_model" and off["mode"] == "off"  # the plan, not linked


# --- the paper's VGG-16 end to end ----------------------------------------------------------------------


def test_papers_vgg16_trains_structures_exports_and_verifies(tmp_path, cifar_dir):
    """vgg16 (2x2 map, Linear chain 2048-256-256-C at width 1/8) through train (1 step) -> structure -> export
    (ONNX, and TVM with rsp's CPU kernels where TVM is installed: the hidden linears fuse bias + ReLU) -> verify."""
    pytest.importorskip("onnxruntime")
    from rsp.config import resolve
    from rsp.structure import StructureOptions
    from rsp.structure import run as structure_run
    from rsp.train import Trainer
    from rsp.verify import VerifyOptions
    from rsp.verify import run as verify_run

    cfg = resolve(None, {"dataset": "cifar10", "data_dir": str(cifar_dir), "model": "vgg16",
                         "model_kwargs": {"width": 0.125}, "sparsity": 0.9, "epochs": 1, "max_steps": 1,
                         "batch_size": 16, "attack_steps": 1, "eval_attack_steps": 1, "test_attack_steps": 1,
                         "device": "cpu", "threads": 1})
    Trainer(cfg, tmp_path / "train", progress=False, log=lambda *_: None).fit()
    state = rsp.artifacts.load_tensors(tmp_path / "train" / "model.safetensors")
    state["classifier.2.weight"][:, 3] = 0  # a hidden unit nobody reads, so that structure shrinks the head
    save_tensors(tmp_path / "train" / "model.safetensors", state)
    m = read_manifest(tmp_path / "train")
    write_manifest(tmp_path / "train", m, list(m["files"]))  # the edited weights' checksum
    s = structure_run(tmp_path / "train", tmp_path / "structure",
                      StructureOptions(k=0, n_examples=16, attack_steps=0, data_dir=str(cifar_dir)), log=lambda *_: None)
    removed = s["structure"]["removed_channels"]
    assert removed.get("classifier.0", 0) >= 1
    assert s["model"]["kwargs"]["hidden"] == [32 - removed.get(f"classifier.{i}", 0) for i in (0, 2)]
    formats = ["onnx", "tvm"] if has_module("tvm") else ["onnx"]
    e = run(tmp_path / "structure", tmp_path / "bundle", ExportOptions(target="x86-cpu", formats=formats, parity_images=32,
                                                                       threads=1, data_dir=str(cifar_dir)),
            log=lambda *_: None)
    for f in formats:
        assert e["parity"][f]["passed"] and e["parity"][f]["max_abs_err"] < 1e-4, f
    if "tvm" in formats:
        linked = {l["layer"]: l["fused"] for l in e["kernels"]["linked_layers"]}
        assert linked["classifier.0"] == linked["classifier.2"] == ["bias", "relu"] and linked["classifier.4"] == ["bias"]
    result = verify_run(tmp_path / "bundle", VerifyOptions(output=str(tmp_path / "verify"), backends=["onnx"],
                                                           data_dir=str(cifar_dir), attacks=["pgd"], n_examples=16,
                                                           steps=1, restarts=1,
                                                           sanity=False, latency_runs=2, latency_batches=(1,), threads=1),
                        log=lambda *_: None)
    assert 0.0 <= result["robust_acc"] <= result["clean_acc"] <= 1.0
