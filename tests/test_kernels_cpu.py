"""rsp's CPU sparse kernels (rsp.kernels.cpu): exact against dense convolution, and the CPU cost model's choice."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from rsp.kernels.codegen import conv_spec, linear_spec
from rsp.kernels.cpu import build_cpu, estimate_cpu, generate_cpu, load_cpu_layer, plan_cpu_layers

CXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no g++ for the CPU kernels")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cpu_kernel_cache")


def _sparse(shape, density, gen):
    return torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < density)


def _layer(spec, w, cache, bias=None, relu=False):
    return load_cpu_layer(generate_cpu(spec, w, bias, relu=relu, label="t"), cache_dir=cache)


GEOMETRIES = [  # (weight shape, input hw, stride, padding, dilation)
    ((16, 8, 3, 3), (9, 11), 1, 1, 1),       # odd sizes, 'same' padding
    ((16, 8, 3, 3), (9, 11), 2, 1, 1),       # stride 2: four phase planes
    ((12, 8, 1, 1), (8, 8), 2, 0, 1),        # a ResNet shortcut
    ((8, 4, 3, 3), (10, 10), 1, 2, 2),       # dilation
    ((8, 4, 5, 3), (7, 9), (2, 1), (1, 0), 1),  # non-square everything
    ((32, 16, 3, 3), (2, 2), 1, 1, 1),       # a late VGG map: 2x2
    ((8, 3, 9, 9), (20, 20), 2, 4, 1),       # 81 taps: beyond the CUDA kernels' tap mask, not these
]


@pytest.mark.parametrize("shape,hw,stride,padding,dilation", GEOMETRIES)
def test_conv_matches_dense_convolution(shape, hw, stride, padding, dilation, cache):
    gen = torch.Generator().manual_seed(0)
    w = _sparse(shape, 0.2, gen)
    bias = torch.randn(shape[0], generator=gen)
    spec = conv_spec(shape, hw, stride, padding, dilation)
    plain, fused = _layer(spec, w, cache), _layer(spec, w, cache, bias, relu=True)
    for n in (1, 3):
        x = torch.rand(n, shape[1], *hw, generator=gen)
        ref = F.conv2d(x, w, None, stride, padding, dilation)
        torch.testing.assert_close(plain(x), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused(x), (ref + bias.view(1, -1, 1, 1)).relu(), atol=1e-5, rtol=1e-5)


def test_structured_patterns(cache):
    """Empty output rows, a single non-zero, a whole input channel dead, a fully dense layer, an all-zero layer."""
    gen = torch.Generator().manual_seed(1)
    spec = conv_spec((8, 6, 3, 3), (7, 7), 1, 1)
    x = torch.randn(2, 6, 7, 7, generator=gen)
    w = _sparse((8, 6, 3, 3), 0.3, gen)
    w[[1, 4, 7]] = 0  # rows with no non-zero
    w[:, 2] = 0  # an input channel nobody reads
    one = torch.zeros(8, 6, 3, 3)
    one[5, 3, 0, 2] = -1.5  # one corner tap: reads padding at the border
    for weight in (w, one, torch.randn(8, 6, 3, 3, generator=gen), torch.zeros(8, 6, 3, 3)):
        torch.testing.assert_close(_layer(spec, weight, cache)(x), F.conv2d(x, weight, None, 1, 1), atol=1e-5, rtol=1e-5)


def test_batches_larger_than_a_cache_chunk(cache):
    """16 channels of 37x37 padded planes are ~88 KB per image: a batch of 5 runs in chunks of 2, 2 and 1."""
    gen = torch.Generator().manual_seed(2)
    w = _sparse((4, 16, 3, 3), 0.1, gen)
    layer = _layer(conv_spec(w.shape, (35, 35), 1, 1), w, cache)
    x = torch.randn(5, 16, 35, 35, generator=gen)
    y = layer(x)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1), atol=1e-5, rtol=1e-5)
    for i in range(5):  # every image alone gives its row of the batch: no image reads another's data
        torch.testing.assert_close(layer(x[i:i + 1].contiguous())[0], y[i], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("hw", [(32, 34), (5, 7)])
def test_pool_epilogue_and_chunks_sized_for_the_export_batch(hw, cache):
    """The fused 2x2 max pool (vectorised from 8 windows a row, a scalar tail, an odd map), with and without
    ReLU and residual, on a kernel laid out for batch 1 and run at batch 3 (three chunks)."""
    gen = torch.Generator().manual_seed(5)
    w, b = _sparse((6, 5, 3, 3), 0.3, gen), torch.randn(6, generator=gen)
    spec = conv_spec(w.shape, hw, 1, 1)
    x, r = torch.randn(3, 5, *hw, generator=gen), torch.randn(3, 6, *hw, generator=gen)
    conv = F.conv2d(x, w, b, 1, 1)
    for relu, residual in ((True, False), (False, False), (True, True)):
        ks = generate_cpu(spec, w, b, relu=relu, residual=residual, pool=2, batch=1, label="t")
        assert ks.stats["chunk"] == 1
        ref = conv + r if residual else conv
        ref = F.max_pool2d(ref.relu() if relu else ref, 2)
        got = load_cpu_layer(ks, cache_dir=cache)(x, residual=r if residual else None)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_linear(cache):
    gen = torch.Generator().manual_seed(3)
    w, b = _sparse((10, 64), 0.3, gen), torch.randn(10, generator=gen)
    layer = _layer(linear_spec(w.shape), w, cache, b)
    for n in (1, 5, 37):
        x = torch.randn(n, 64, generator=gen)
        torch.testing.assert_close(layer(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 63))


def test_units_are_content_addressed(cache):
    gen = torch.Generator().manual_seed(4)
    w = _sparse((8, 4, 3, 3), 0.2, gen)
    spec = conv_spec(w.shape, (6, 6), 1, 1)
    a, b = generate_cpu(spec, w, label="l"), generate_cpu(spec, w.clone(), label="l")
    assert a.name == b.name and a.source == b.source and a.mode == "cpu" and a.stats["nnz"] == int((w != 0).sum())
    w2 = w.clone()
    w2[w2 != 0] *= 1.0000001  # a one-ulp-ish change in the values is a different kernel
    assert generate_cpu(spec, w2, label="l").name != a.name
    assert build_cpu(a, cache_dir=cache) == build_cpu(b, cache_dir=cache)  # built once
    with pytest.raises(ValueError, match="does not match"):
        generate_cpu(spec, torch.zeros(8, 4, 1, 1))


def test_tvm_ffi_object(tmp_path, cache):
    tvm_ffi = pytest.importorskip("tvm_ffi")
    gen = torch.Generator().manual_seed(5)
    w = _sparse((6, 4, 3, 3), 0.3, gen)
    ks = generate_cpu(conv_spec(w.shape, (5, 5), 2, 1), w, label="ffi")
    obj = build_cpu(ks, kind="obj", tvm_ffi=True, cache_dir=cache)
    lib = tmp_path / "ffi.so"
    r = subprocess.run([CXX, "-shared", "-o", str(lib), str(obj)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fn = tvm_ffi.load_module(str(lib))[ks.name]
    x, y = torch.randn(3, 4, 5, 5, generator=gen), torch.empty(3, 6, 3, 3)
    fn(x, y)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 2, 1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="values per sample"):
        fn(x, torch.empty(3, 6, 3, 2))


def test_cost_model_prefers_sparse_only_where_it_pays():
    vgg = conv_spec((512, 512, 3, 3), (4, 4), 1, 1)
    k = 512 * 512 * 9
    speedups = [estimate_cpu(vgg, int(d * k), 1)["speedup"] for d in (0.5, 0.1, 0.05, 0.01)]
    assert speedups == sorted(speedups) and speedups[-1] > 10 and speedups[0] < 1.1
    tiny = conv_spec((8, 1, 3, 3), (8, 8), 1, 1)  # a digits stem: the call overhead dominates
    assert estimate_cpu(tiny, 7, 1)["speedup"] < 1.1
    state = {"a.weight": torch.zeros(512, 512, 3, 3), "b.weight": torch.ones(8, 1, 3, 3), "bn.weight": torch.ones(8)}
    state["a.weight"].view(-1)[::100] = 1.0  # 1 % dense
    plan = plan_cpu_layers(state, {"a": {"in_hw": [4, 4], "stride": [1, 1], "padding": [1, 1]},
                                   "b": {"in_hw": [8, 8], "stride": [1, 1], "padding": [1, 1]}})
    assert set(plan) == {"a", "b"} and plan["a"]["kernel"] == "sparse" and plan["b"]["kernel"] == "dense"
    assert plan["b"]["dense_kernel"] == "rsp-dense" and "dense" in plan["b"]["why"]
    # the planner never picks a sparse kernel whose estimate is above the dense alternative's
    g = torch.Generator().manual_seed(0)
    for d in (0.02, 0.1, 0.3, 0.6, 1.0):
        for fallback in ("rsp-dense", None):
            w = torch.randn(256, 256, 3, 3, generator=g) * (torch.rand(256, 256, 3, 3, generator=g) < d)
            for hw in (2, 8, 32):
                p = plan_cpu_layers({"l.weight": w}, {"l": {"in_hw": [hw, hw], "stride": [1, 1], "padding": [1, 1]}},
                                    dense_fallback=fallback)["l"]
                assert (p["kernel"] == "sparse") == (p["est_us"]["sparse"] * 1.1 <= p["est_us"]["alternative"])
                assert p["est_us"]["alternative"] == (p["est_us"]["rsp_dense"] if fallback else p["est_us"]["dense"])
    assert plan["a"]["density"] == pytest.approx(0.01, abs=1e-4)
    assert plan_cpu_layers({"c.weight": torch.ones(4, 4, 3, 3)}, {})["c"]["reason"].startswith("no geometry")
    # TVM's untuned schedule is a much slower alternative: the same stem pays there
    assert estimate_cpu(tiny, 7, 1, dense_baseline="tvm-untuned")["speedup"] > 1.1
    with pytest.raises(ValueError, match="dense_baseline"):
        estimate_cpu(tiny, 7, 1, dense_baseline="cudnn")


def test_rsp_dense_estimate_is_its_own_work_not_a_share_of_the_library():
    """rsp's dense kernel reads every weight per grid vector (compute-bound, grows with the batch) or, on a
    1-vector grid (a linear layer or a 2x2 map at batch 1), streams the weights once: it is not a fixed share of
    the library, which is 4x faster on fc1 at batch 1 (bench/kernels.py's dense rows)."""
    from rsp.kernels.cpu import get_cpu

    c = get_cpu("x86-64-v3")
    fc1 = linear_spec((256, 2048))
    e1 = estimate_cpu(fc1, 256 * 2048, 1)
    assert e1["rsp_dense_us"] >= 256 * 2048 * 4 / (c.weight_stream_gbps * 1e3) > 2 * e1["dense_us"]
    conv = conv_spec((64, 64, 3, 3), (32, 32), 1, 1)  # 136 grid vectors per image: compute-bound
    r1, r8 = (estimate_cpu(conv, 64 * 576, b)["rsp_dense_us"] for b in (1, 8))
    assert 7 < r8 / r1 < 9
    # a 10 % dense fc1 runs sparse: its sparse estimate beats the dense kernel's, not the library's
    w = torch.zeros(256, 2048)
    w.view(-1)[::10] = 1.0
    p = plan_cpu_layers({"fc1.weight": w}, {"fc1": {"kind": "linear"}})["fc1"]
    assert p["kernel"] == "sparse" and p["est_us"]["sparse"] < p["est_us"]["rsp_dense"]


CROSS_CXX = shutil.which("aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")

DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <vector>
extern "C" int %(name)s_host(const float* x, float* y, int batch);
int main(int argc, char** argv) {
  const int batch = atoi(argv[1]);
  const long nx = atol(argv[2]), ny = atol(argv[3]);
  std::vector<float> x(nx), y(ny);
  FILE* f = fopen(argv[4], "rb");
  if (!f || fread(x.data(), 4, nx, f) != (size_t)nx) return 3;
  fclose(f);
  const int rc = %(name)s_host(x.data(), y.data(), batch);
  f = fopen(argv[5], "wb");
  fwrite(y.data(), 4, ny, f);
  fclose(f);
  return rc;
}
"""


@pytest.mark.skipif(CROSS_CXX is None or QEMU is None,
                    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64 (scripts/setup.sh installs both)")
@pytest.mark.parametrize("shape,hw,stride,padding", [((16, 8, 3, 3), (9, 11), 1, 1), ((12, 8, 3, 3), (8, 8), 2, 1),
                                                     ((32, 16, 3, 3), (2, 2), 1, 1)])
def test_arm64_build_matches_dense_convolution_under_qemu(shape, hw, stride, padding, tmp_path):
    """The unit compiled for a Cortex-A76 (NEON: each 8-float vector is two registers), run under qemu."""
    import numpy as np

    gen = torch.Generator().manual_seed(6)
    w = _sparse(shape, 0.2, gen)
    spec = conv_spec(shape, hw, stride, padding)
    ks = generate_cpu(spec, w, label="arm")
    src = tmp_path / "unit.cpp"
    src.write_text(ks.source + DRIVER % {"name": ks.name})
    exe = tmp_path / "unit"
    r = subprocess.run([CROSS_CXX, "-O3", "-std=c++17", "-ffp-contract=fast", "-mcpu=cortex-a76", "-static", "-o",
                        str(exe), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    batch = 3
    x = torch.rand(batch, shape[1], *hw, generator=gen)
    (tmp_path / "x.bin").write_bytes(x.numpy().astype("<f4").tobytes())
    ref = F.conv2d(x, w, None, stride, padding)
    r = subprocess.run([QEMU, str(exe), str(batch), str(x.numel()), str(ref.numel()), str(tmp_path / "x.bin"),
                        str(tmp_path / "y.bin")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    y = torch.from_numpy(np.frombuffer((tmp_path / "y.bin").read_bytes(), dtype="<f4").copy()).view(ref.shape)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
