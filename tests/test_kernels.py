"""rsp.kernels: BSR format, CPU reference vs dense, generated CUDA (host emulator, nvcc builds), cost model.

CPU-only except the tests marked gpu (skipped without CUDA). nvcc tests skip where nvcc is absent; host
emulator tests where no C++ compiler is found.
"""

from __future__ import annotations

import shutil
import struct

import pytest
import torch
import torch.nn.functional as F

from rsp.kernels import bsr as bsr_mod
from rsp.kernels import (KernelBuildError, bsr_conv2d, bsr_linear, choose_kernel, compile_kernels, conv_spec,
                         estimate, find_nvcc, from_bsr, generate, inspect_device_code, linear_spec, load_layer,
                         plan_layers, plan_model, to_bsr)
from rsp.kernels.build import FATBIN_MAGIC, build_host, tvm_link_options
from rsp.structure import zero_block_share

NVCC = find_nvcc()
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler for the host emulator")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernel_cache")


def _weight(kind: str, shape, gen, density=0.1, block=(4, 4), dtype=torch.float32):
    w = torch.randn(shape, generator=gen, dtype=dtype) * (2.0 / max(1, shape[1])) ** 0.5
    if kind == "random":
        return w * (torch.rand(shape, generator=gen) < density)
    if kind == "zero":
        return torch.zeros(shape, dtype=dtype)
    if kind == "dense":
        return w
    if kind == "block":  # whole R x C blocks of the GEMM view kept or dropped (ragged edges included)
        g = w.reshape(shape[0], -1)
        r, c = block
        keep = torch.rand(-(-g.shape[0] // r), -(-g.shape[1] // c), generator=gen) < 0.3
        mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[: g.shape[0], : g.shape[1]]
        return (g * mask).reshape(shape)
    raise ValueError(kind)


# ------------------------------------------------------------------------------------------------
# BSR format and reference


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (13, 5, 3, 3), (7, 3, 1, 1), (10, 45), (3, 7)])
@pytest.mark.parametrize("block", [(1, 1), (4, 4), (3, 2), (16, 1), (1, 4)])
def test_round_trip(shape, block):
    gen = torch.Generator().manual_seed(0)
    w = _weight("random", shape, gen, density=0.2)
    b = to_bsr(w, block)
    assert torch.equal(from_bsr(b), w)
    m, k = b.shape
    assert (m, k) == (shape[0], w[0].numel())
    assert b.padded_shape[0] % block[0] == 0 and b.padded_shape[1] % block[1] == 0
    assert b.nnz == int((w != 0).sum()) and b.values.shape == (b.nnzb, *block)
    assert int(b.row_ptr[-1]) == b.nnzb and bool((b.row_ptr[1:] >= b.row_ptr[:-1]).all())
    share = zero_block_share(w, block)
    if share is not None:  # divisible shapes: the BSR agrees with rsp structure's zero-block share
        assert b.block_density == pytest.approx(1.0 - share)
    assert b.block_density == pytest.approx(bsr_mod.block_density(w, block))


def test_round_trip_edge_cases():
    z = torch.zeros(8, 4, 3, 3)
    b = to_bsr(z, "4x4")
    assert b.nnzb == 0 and b.block_density == 0.0 and torch.equal(from_bsr(b), z)
    d = torch.randn(6, 10) + 10.0  # no zeros at all
    b = to_bsr(d, (4, 4))
    assert b.block_density == 1.0 and b.fill < 1.0 and torch.equal(from_bsr(b), d)
    with pytest.raises(ValueError):
        to_bsr(torch.zeros(3, 3, 3), (1, 1))
    with pytest.raises(ValueError):
        to_bsr(d, "4x0")


@pytest.mark.parametrize("kind", ["random", "block", "zero", "dense"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (1, 1, 1), (2, 1, 1), (2, 0, 1), (1, 2, 2)])
@pytest.mark.parametrize("block", [(1, 1), (4, 4), (3, 2)])
def test_reference_conv_matches_dense(kind, stride, padding, dilation, block):
    gen = torch.Generator().manual_seed(1)
    shape = (13, 5, 3, 3)  # ragged for every block above
    w = _weight(kind, shape, gen, block=(4, 4))
    bias = torch.randn(13, generator=gen)
    x = torch.randn(2, 5, 9, 7, generator=gen)
    b = to_bsr(w, block)
    y = bsr_conv2d(x, b, bias, stride, padding, dilation)
    ref = F.conv2d(x, w, bias, stride, padding, dilation)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # float64 with float64 weights: the same sums, so agreement to rounding of a few terms
    y64 = bsr_conv2d(x.double(), to_bsr(w.double(), block), bias.double(), stride, padding, dilation)
    torch.testing.assert_close(y64, F.conv2d(x.double(), w.double(), bias.double(), stride, padding, dilation),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", ["random", "block", "zero", "dense"])
@pytest.mark.parametrize("block", [(1, 1), (4, 4), (16, 1)])
def test_reference_linear_matches_dense(kind, block):
    gen = torch.Generator().manual_seed(2)
    w = _weight(kind, (10, 45), gen)
    bias = torch.randn(10, generator=gen)
    x = torch.randn(3, 4, 45, generator=gen)  # leading dims are kept
    torch.testing.assert_close(bsr_linear(x, to_bsr(w, block), bias), F.linear(x, w, bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bsr_linear(x, to_bsr(w, block)), F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_reference_chunks(monkeypatch):
    """The block GEMM processes blocks in chunks; a tiny chunk size must not change the result."""
    gen = torch.Generator().manual_seed(3)
    w = _weight("random", (32, 16, 3, 3), gen, density=0.3)
    x = torch.randn(2, 16, 6, 6, generator=gen)
    b = to_bsr(w, (2, 2))
    full = bsr_conv2d(x, b, None, 1, 1)
    monkeypatch.setattr(bsr_mod, "_CHUNK_ELEMS", 4096)  # ~14 blocks per chunk
    torch.testing.assert_close(bsr_conv2d(x, b, None, 1, 1), full, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(full, F.conv2d(x, w, None, 1, 1), atol=1e-5, rtol=1e-5)


def test_reference_rejects_bad_input():
    b = to_bsr(torch.randn(4, 3, 3, 3), (1, 1))
    with pytest.raises(ValueError):
        bsr_conv2d(torch.randn(1, 2, 5, 5), b)
    with pytest.raises(ValueError):
        bsr_linear(torch.randn(2, 3), b)
    with pytest.raises(ValueError):
        bsr_conv2d(torch.randn(1, 3, 2, 2), b)  # empty output


# ------------------------------------------------------------------------------------------------
# Generated code: host emulator (the CUDA unit compiled by g++) against F.conv2d / F.linear

CONV_CASES = [
    # (out, in, k, hw, stride, padding, dilation, mode, relu, bias)
    (16, 8, 3, 7, 1, 1, 1, "specialized", False, True),
    (16, 8, 3, 7, 2, 1, 1, "specialized", True, False),
    (13, 5, 3, 6, 2, 0, 1, "specialized", False, True),
    (10, 6, 1, 5, 1, 0, 1, "specialized", True, True),
    (9, 4, 3, 8, 1, 2, 2, "specialized", False, False),
    (16, 8, 3, 2, 1, 1, 1, "specialized", False, True),  # 2x2 image: every pixel touches the padding
    (16, 8, 3, 7, 1, 1, 1, "generic", False, True),
    (13, 5, 3, 6, 2, 1, 1, "generic", True, True),
    (9, 4, 3, 8, 1, 2, 2, "generic", False, False),
]


@needs_cxx
@pytest.mark.parametrize("case", CONV_CASES)
def test_generated_conv_host_emulator(case, cache):
    o, i, k, hw, s, p, d, mode, relu, has_bias = case
    gen = torch.Generator().manual_seed(4)
    w = _weight("random", (o, i, k, k), gen, density=0.3)
    bias = torch.randn(o, generator=gen) if has_bias else None
    spec = conv_spec(w.shape, (hw, hw), s, p, d)
    weight = to_bsr(w, (4, 3)) if mode == "generic" else w
    ks = generate(spec, weight, bias, relu=relu, mode=mode, label="test", rows_per_thread=4)
    assert ks.mode == mode
    x = torch.randn(3, i, hw, hw, generator=gen)
    y = load_layer(ks, "cpu", cache_dir=cache)(x)
    ref = F.conv2d(x, w, bias, s, p, d)
    torch.testing.assert_close(y, F.relu(ref) if relu else ref, atol=1e-5, rtol=1e-5)


@needs_cxx
@pytest.mark.parametrize("kind", ["zero", "dense", "block"])
def test_generated_structured_weights(kind, cache):
    gen = torch.Generator().manual_seed(5)
    w = _weight(kind, (12, 6, 3, 3), gen, block=(4, 1))
    spec = conv_spec(w.shape, (5, 5), 1, 1)
    x = torch.randn(2, 6, 5, 5, generator=gen)
    bias = torch.randn(12, generator=gen)
    ref = F.conv2d(x, w, bias, 1, 1)
    for mode in ("specialized", "generic"):
        ks = generate(spec, w, bias, mode=mode, block=(4, 1) if mode == "generic" else None)
        torch.testing.assert_close(load_layer(ks, "cpu", cache_dir=cache)(x), ref, atol=1e-5, rtol=1e-5)


@needs_cxx
def test_generated_linear_and_auto_fallback(cache):
    gen = torch.Generator().manual_seed(6)
    w = _weight("random", (10, 64), gen, density=0.2)
    bias = torch.randn(10, generator=gen)
    x = torch.randn(5, 64, generator=gen)
    ks = generate(linear_spec(w.shape), w, bias, label="fc")
    assert ks.mode == "specialized" and ks.name.startswith("rsp_fc_")
    torch.testing.assert_close(load_layer(ks, "cpu", cache_dir=cache)(x), F.linear(x, w, bias), atol=1e-5, rtol=1e-5)
    # above the code-size cap the generic kernel is generated instead
    ks2 = generate(linear_spec(w.shape), w, bias, max_statements=10)
    assert ks2.mode == "generic" and ks2.name != ks.name
    torch.testing.assert_close(load_layer(ks2, "cpu", cache_dir=cache)(x), F.linear(x, w, bias), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        load_layer(ks, "cpu", cache_dir=cache)(torch.randn(5, 63))


@needs_cxx
def test_several_layers_in_one_unit(cache):
    """A whole model's layers compile as one unit (one object to link): the shared header is guarded."""
    gen = torch.Generator().manual_seed(11)
    w1 = _weight("random", (8, 4, 3, 3), gen, density=0.3)
    w2 = _weight("random", (6, 8, 3, 3), gen, density=0.3)
    k1 = generate(conv_spec(w1.shape, (6, 6), 1, 1), w1, relu=True, label="a")
    k2 = generate(conv_spec(w2.shape, (6, 6), 2, 1), w2, mode="generic", block=(2, 2), label="b")
    lib = build_host([k1, k2, k1], cache_dir=cache)  # a repeated layer is emitted once
    x = torch.randn(2, 4, 6, 6, generator=gen)
    h = load_layer(k1, "cpu", lib=lib)(x)
    torch.testing.assert_close(h, F.relu(F.conv2d(x, w1, None, 1, 1)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load_layer(k2, "cpu", lib=lib)(h), F.conv2d(h, w2, None, 2, 1), atol=1e-5, rtol=1e-5)


def test_generate_is_deterministic_and_specialised():
    gen = torch.Generator().manual_seed(7)
    w = _weight("random", (8, 4, 3, 3), gen, density=0.2)
    spec = conv_spec(w.shape, (6, 6), 1, 1)
    a, b = generate(spec, w), generate(spec, w.clone())
    assert a.name == b.name and a.source == b.source
    w2 = w.clone()
    w2[w2 != 0] *= 2
    assert generate(spec, w2).name != a.name  # values are part of the code
    assert "RSP_CONST_ARRAY" not in a.source.split("namespace", 1)[1]  # no index/weight arrays: all in the code
    assert a.stats["fmas_per_pixel"] == int((w != 0).sum())
    g = generate(spec, w, mode="generic", block=(4, 4))
    assert "RSP_CONST_ARRAY int row_ptr" in g.source and g.stats["block"] == [4, 4]
    with pytest.raises(ValueError):
        generate(spec, torch.zeros(8, 4, 1, 1))


# ------------------------------------------------------------------------------------------------
# nvcc builds: real device code for sm_87 / sm_90


@pytest.fixture(scope="module")
def small_layer():
    gen = torch.Generator().manual_seed(8)
    w = _weight("random", (16, 8, 3, 3), gen, density=0.2)
    return generate(conv_spec(w.shape, (6, 6), 1, 1), w, torch.randn(16, generator=gen), label="small")


@needs_nvcc
def test_nvcc_cubin_and_fatbin(small_layer, cache):
    cubin = compile_kernels(small_layer, "sm_87", "cubin", cache_dir=cache)
    data = cubin.read_bytes()
    assert data[:4] == b"\x7fELF" and struct.unpack_from("<H", data, 0x12)[0] == 190  # EM_CUDA
    assert inspect_device_code(cubin) == {"format": "cubin", "sass": [87], "ptx": []}
    assert small_layer.symbols["kernel"].encode() in data
    fat = compile_kernels(small_layer, ["sm_87", "sm_90"], "fatbin", cache_dir=cache)
    assert struct.unpack_from("<I", fat.read_bytes(), 0)[0] == FATBIN_MAGIC
    info = inspect_device_code(fat)
    assert info["sass"] == [87, 90] and info["ptx"] == [90]
    assert compile_kernels(small_layer, ["sm_87", "sm_90"], "fatbin", cache_dir=cache) == fat  # cached


@needs_nvcc
def test_nvcc_shared_library(small_layer, cache):
    so = compile_kernels(small_layer, "sm_87", "so", cache_dir=cache)
    info = inspect_device_code(so)
    assert info["format"] == "host+fatbin" and 87 in info["sass"]
    import ctypes

    lib = ctypes.CDLL(str(so))  # loads without a GPU (the CUDA runtime is linked statically)
    getattr(lib, small_layer.name)
    lib_info = getattr(lib, small_layer.name + "_info")
    lib_info.restype = ctypes.c_char_p
    assert small_layer.name.encode() in lib_info()


@needs_nvcc
def test_nvcc_tvm_ffi_object(small_layer, cache, tmp_path):
    pytest.importorskip("tvm_ffi")
    obj = compile_kernels(small_layer, "sm_87", "obj", tvm_ffi=True, cache_dir=cache)
    assert obj.suffix == ".o" and inspect_device_code(obj)["sass"] == [87]
    import subprocess

    import tvm_ffi

    lib = tmp_path / "artifact.so"  # what export_library(..., options=tvm_link_options(obj)) does
    r = subprocess.run([CXX or "g++", "-shared", "-o", str(lib), *tvm_link_options(obj)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mod = tvm_ffi.load_module(str(lib))
    fn = mod[small_layer.name]  # found through the __tvm_ffi_<name> symbol
    assert tvm_ffi.get_global_func(small_layer.name) is not None  # registered when the library loaded
    with pytest.raises(ValueError, match="CUDA tensor"):  # argument checks run before any CUDA call
        fn(torch.zeros(1, 8, 6, 6), torch.zeros(1, 16, 6, 6))


@needs_nvcc
def test_model_object_keeps_the_tvm_ffi_entry_points_in_one_unit(small_layer, cache, tmp_path):
    """What export links for a GPU: each layer compiled without the TVM FFI headers, every entry point in one
    more unit, joined by ``-r``; the library still exports and registers each layer's function."""
    pytest.importorskip("tvm_ffi")
    import subprocess

    import tvm_ffi

    from rsp.kernels.relax_link import _parallel_cuda_objects

    gen = torch.Generator().manual_seed(9)
    w = _weight("random", (8, 16, 3, 3), gen, density=0.3)
    other = generate(conv_spec(w.shape, (6, 6), 1, 1), w, None, relu=True, label="other", mode="generic")
    obj = _parallel_cuda_objects([small_layer, other, small_layer], ["sm_87"], nvcc=None, cross_cxx=None,
                                 cache_dir=cache)
    assert inspect_device_code(obj)["sass"] == [87]
    layer_obj = compile_kernels(other, "sm_87", "obj", ptx=False, cache_dir=cache)  # the cached layer unit
    assert b"__tvm_ffi_" not in layer_obj.read_bytes()  # no entry point of its own
    if shutil.which("nm"):  # every entry point's launch function resolved inside the joined object
        syms = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout.split("\n")
        undefined = {ln.split()[-1] for ln in syms if ln.split()[:1] == ["U"]}
        assert not undefined & {small_layer.name, other.name}
        assert {f"__tvm_ffi_{small_layer.name}", f"__tvm_ffi_{other.name}"} <= {ln.split()[-1] for ln in syms if ln}
    lib = tmp_path / "model.so"
    r = subprocess.run([CXX or "g++", "-shared", "-o", str(lib), *tvm_link_options(obj)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    mod = tvm_ffi.load_module(str(lib))
    for ks in (small_layer, other):
        assert tvm_ffi.get_global_func(ks.name) is not None
        with pytest.raises(ValueError, match="CUDA tensor"):
            mod[ks.name](torch.zeros(1, *ks.spec.input_shape()[1:]), torch.zeros(1, *ks.spec.output_shape()[1:]))


@needs_nvcc
def test_relax_call_dps_packed(small_layer, cache, tmp_path):
    """The export path end to end, minus the GPU: a Relax function calls the layer with call_dps_packed, the
    artifact is linked with export_library(options=tvm_link_options(obj)), and the VM finds the function
    (its argument check then rejects the CPU tensor, before any CUDA call)."""
    tvm = pytest.importorskip("tvm")
    relax = pytest.importorskip("tvm.relax")
    import numpy as np

    obj = compile_kernels(small_layer, "sm_87", "obj", tvm_ffi=True, cache_dir=cache)  # cached by the test above
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.call_dps_packed(small_layer.name, (x,), relax.TensorType((1, 16, 6, 6), "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    ex = tvm.compile(bb.get(), target="llvm")
    path = tmp_path / "model.so"
    ex.export_library(str(path), options=tvm_link_options(obj))
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    with pytest.raises(Exception, match=f"{small_layer.name}: x must be a CUDA tensor"):
        vm["main"](tvm.runtime.tensor(np.zeros((1, 8, 6, 6), "float32")))


@needs_nvcc
def test_nvcc_error_is_one_line(cache):
    with pytest.raises(KernelBuildError) as e:
        compile_kernels("__global__ void k() { undefined_thing(); }", "sm_87", "cubin", cache_dir=cache)
    msg = str(e.value)
    assert "\n" not in msg and "error" in msg and "full log" in msg


# ------------------------------------------------------------------------------------------------
# Cost model and plan

SHAPES = [((64, 3, 3, 3), (32, 32)), ((64, 64, 3, 3), (32, 32)), ((256, 256, 3, 3), (8, 8)),
          ((512, 512, 3, 3), (4, 4)), ((512, 512, 3, 3), (2, 2)), ((10, 512), None)]


@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("block", [(1, 1), (4, 4), (32, 1)])
def test_cost_model_monotone(arch, batch, block):
    densities = [i / 200 for i in range(201)]
    for shape, hw in SHAPES:
        choices = [choose_kernel(shape, d, batch, arch, block=block, in_hw=hw) for d in densities]
        times = [estimate(shape, d, batch, arch, block=block, in_hw=hw)["sparse_us"] for d in densities]
        assert all(a <= b for a, b in zip(times, times[1:]))
        first_dense = choices.index("dense") if "dense" in choices else len(choices)
        assert all(c == "dense" for c in choices[first_dense:]), (shape, choices)
        assert choices[-1] == "dense"  # a fully dense layer never runs sparse


def test_cost_model_prefers_sparse_when_very_sparse():
    assert choose_kernel((512, 512, 3, 3), 0.01, 1, "sm_87", in_hw=(4, 4)) == "sparse"
    assert choose_kernel((512, 512, 3, 3), 0.01, 1, "sm_90", in_hw=(2, 2)) == "sparse"
    e = estimate((512, 512, 3, 3), 0.01, 1, "sm_90", in_hw=(4, 4))
    assert e["speedup"] > 1 and e["dense_us"] > 0
    with pytest.raises(ValueError):
        choose_kernel((64, 64, 3, 3), 0.1)  # a conv needs its input size
    with pytest.raises(ValueError):
        estimate((10, 512), 1.5)


def test_plan_model():
    from rsp.models import create_model

    torch.manual_seed(0)
    model = create_model("vgg11", num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_(torch.rand_like(m.weight) < 0.01)
    plan = plan_model(model, (1, 3, 32, 32), arch="sm_87", blocks=((1, 1), (4, 4)))
    convs = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert list(plan) == convs
    for p in plan.values():
        assert p["kernel"] in ("sparse", "dense")
        assert {"block", "block_density", "est_speedup", "density"} <= set(p)
        assert 0.0 <= p["block_density"] <= 1.0 and len(p["block"]) == 2
        assert (p["kernel"] == "sparse") == (p["est_speedup"] >= 1.1)
    assert plan["features.0"]["in_hw"] == [32, 32]
    assert any(p["kernel"] == "sparse" for p in plan.values())
    # the state dict alone: convs without geometry are planned dense, with the reason
    sd = plan_layers(model.state_dict())
    assert sd["features.0"]["kernel"] == "dense" and "geometry" in sd["features.0"]["reason"]
    assert sd["classifier"]["kernel"] in ("sparse", "dense") and sd["classifier"]["block"] is not None


# ------------------------------------------------------------------------------------------------
# On a GPU: the CUDA kernels against cuDNN (and bit for bit against the host emulator)

GPU_CASES = [
    (64, 32, 3, 16, 1, 1, "specialized", 0.05),
    (64, 32, 3, 16, 2, 1, "specialized", 0.05),
    (128, 64, 3, 4, 1, 1, "specialized", 0.02),
    (128, 64, 3, 2, 1, 1, "generic", 0.1),
    (64, 32, 1, 8, 1, 0, "generic", 0.2),
]


@pytest.mark.gpu
@needs_nvcc
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("batch", [1, 7])
def test_cuda_kernel_matches_cudnn(case, batch, cache):
    o, i, k, hw, s, p, mode, density = case
    gen = torch.Generator().manual_seed(9)
    w = _weight("random", (o, i, k, k), gen, density=density)
    bias = torch.randn(o, generator=gen)
    ks = generate(conv_spec(w.shape, (hw, hw), s, p), w, bias, mode=mode, relu=True)
    x = torch.randn(batch, i, hw, hw, generator=gen)
    layer = load_layer(ks, "cuda", cache_dir=cache)
    y = layer(x.cuda())
    torch.cuda.synchronize()
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        ref = F.relu(F.conv2d(x.cuda(), w.cuda(), bias.cuda(), s, p))
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    if CXX:  # same fmaf chain in the same order: identical bits
        host = load_layer(ks, "cpu", cache_dir=cache)(x)
        assert torch.equal(y.cpu(), host)


@pytest.mark.gpu
@needs_nvcc
def test_cuda_linear_and_stream(cache):
    gen = torch.Generator().manual_seed(10)
    w = _weight("random", (10, 512), gen, density=0.05)
    ks = generate(linear_spec(w.shape), w, None)
    layer = load_layer(ks, "cuda", cache_dir=cache)
    x = torch.randn(32, 512, generator=gen).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # launches on torch's current stream
        y = layer(x)
    stream.synchronize()
    torch.testing.assert_close(y, x @ w.cuda().t(), atol=1e-4, rtol=1e-4)
