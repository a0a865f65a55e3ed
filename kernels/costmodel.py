"""Sparse or dense, per layer: a roofline cost model and the per-layer plan the export manifest records.

Both candidates are estimated as ``launch + max(compute, memory, latency)`` on the target's figures
(``ARCHS``):

- **dense** (cuDNN / TVM's own GEMM): ``2*M*K*max(P, 64)`` FLOPs at the tensor-core TF32 peak (a GEMM
  whose N = P output pixels is narrower than a 64-wide tile still pays for the tile), and reading the
  whole weight, the input and the output once (compute at ``dense_eff`` = 0.5 of the peak, every memory
  term at ``bw_eff`` = 0.6 of the bandwidth). At batch 1 the weight read dominates: that is what
  sparsity saves.
- **sparse** (the BSR kernels of ``rsp.kernels``): ``2*nnz_eff*P`` FLOPs, ``nnz_eff`` = stored blocks x
  block area (the padded work; the specialised kernel skips zeros inside blocks, so this is an upper
  bound), at the CUDA-core FP32 peak times an efficiency set by the block shape. A thread reads one input
  value per block column and uses it for the block's R rows, so there are ``1/R`` loads per FMA; the
  load/store units issue a quarter of the FMA rate, hence ``eff = 0.8 / (1 + 4/R)`` (0.16 for 1x1, 0.4
  for 4x1 or 4x4, 0.71 for 32x1). Memory: input, output and 8 bytes per stored weight (value plus index,
  or the FFMA immediate of the specialised code). Latency: one thread walks ``nnz_eff*P/threads`` FMAs
  in sequence at ~4 cycles each; at batch 1 with few pixels this, not the peak, bounds the kernel.

Time is monotone in the block density for the sparse kernel and independent of it for dense, so a lower
density never turns a sparse choice into a dense one. Sparse is chosen when the estimated speedup is at
least ``min_speedup`` (1.1 by default: dense is the path TVM tunes, sparse must clearly win). The
figures are estimates for the choice; ``bench/kernels.py`` measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bsr import DEFAULT_BLOCKS, block_density, parse_block
from .codegen import CUDA_MAX_TAPS, LayerSpec, conv_spec, linear_spec


@dataclass(frozen=True)
class Arch:
    name: str
    sms: int
    clock_ghz: float
    fp32_tflops: float  # CUDA cores, FMA = 2 FLOPs
    dense_tflops: float  # what the dense library reaches on fp32 inputs (TF32 tensor cores)
    bandwidth_gbs: float
    launch_us: float  # kernel launch + tail, back to back on one stream
    # Share of the tensor-core peak a dense library reaches on these narrow GEMMs (N = pixels, often < 100
    # at batch 1), and of the bandwidth any kernel reaches: guesses, to be replaced by bench/kernels.py figures.
    dense_eff: float = 0.5
    bw_eff: float = 0.6


ARCHS = {
    # Jetson AGX Xavier: 8 SMs (512 cores) at 1.377 GHz, LPDDR4x 136.5 GB/s; no TF32 (Volta): dense fp32 on CUDA cores.
    "sm_72": Arch("sm_72", 8, 1.377, 1.41, 1.41, 136.5, 6.0),
    # Jetson AGX Orin 64 GB at MAXN: 16 SMs (2048 cores) at 1.3 GHz, LPDDR5 204.8 GB/s.
    "sm_87": Arch("sm_87", 16, 1.3, 5.3, 21.0, 204.8, 5.0),
    # H100 SXM: 132 SMs at 1.755 GHz (boost), HBM3 3.35 TB/s.
    "sm_90": Arch("sm_90", 132, 1.755, 67.0, 495.0, 3350.0, 2.5),
    "sm_80": Arch("sm_80", 108, 1.41, 19.5, 156.0, 2039.0, 3.0),
    "sm_86": Arch("sm_86", 84, 1.7, 35.6, 71.0, 936.0, 3.0),
    "sm_89": Arch("sm_89", 128, 2.5, 82.6, 165.0, 1008.0, 3.0),
}


def get_arch(arch: str | Arch) -> Arch:
    if isinstance(arch, Arch):
        return arch
    key = arch if arch.startswith("sm_") else f"sm_{arch}"
    if key not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    return ARCHS[key]


def block_efficiency(block) -> float:
    """Fraction of the FP32 FMA peak the BSR kernel reaches with R x C blocks: 0.8 / (1 + 4/R)."""
    r, _ = parse_block(block)
    return 0.8 / (1.0 + 4.0 / r)


def _spec(shape_or_spec, in_hw, stride, padding, dilation) -> LayerSpec:
    if isinstance(shape_or_spec, LayerSpec):
        return shape_or_spec
    shape = tuple(int(v) for v in shape_or_spec)
    if len(shape) == 2:
        return linear_spec(shape)
    if len(shape) != 4:
        raise ValueError(f"expected a conv (OIHW) or linear weight shape, got {shape}")
    if in_hw is None:
        raise ValueError("a conv layer needs in_hw (the input height and width)")
    if padding is None:
        padding = (shape[2] // 2, shape[3] // 2)
    return conv_spec(shape, in_hw, stride, padding, dilation)


def estimate(shape_or_spec, block_density: float, batch: int = 1, arch: str | Arch = "sm_87", *, block=(1, 1),
             in_hw=None, stride=1, padding=None, dilation=1) -> dict:
    """Estimated microseconds of the dense and the sparse kernel, and dense/sparse."""
    if not 0.0 <= block_density <= 1.0:
        raise ValueError(f"block_density must be in [0, 1], got {block_density}")
    a = get_arch(arch)
    spec = _spec(shape_or_spec, in_hw, stride, padding, dilation)
    r, c = parse_block(block)
    m, k = spec.gemm_shape
    p = spec.pixels(batch)
    x_bytes = 4.0 * batch * spec.in_channels * spec.in_hw[0] * spec.in_hw[1]
    y_bytes = 4.0 * m * p
    bw = a.bandwidth_gbs * 1e3 * a.bw_eff  # bytes per microsecond
    dense_compute = 2.0 * m * k * max(p, 64) / (a.dense_tflops * 1e6 * a.dense_eff)
    dense_memory = (4.0 * m * k + x_bytes + y_bytes) / bw
    dense = a.launch_us + max(dense_compute, dense_memory)

    mp, kp = -(-m // r) * r, -(-k // c) * c
    nnz_eff = block_density * mp * kp
    sparse_compute = 2.0 * nnz_eff * p / (a.fp32_tflops * 1e6 * block_efficiency((r, c)))
    sparse_memory = (8.0 * nnz_eff + x_bytes + y_bytes) / bw
    threads = max(1, p * (mp // r))
    serial_fmas = nnz_eff * p / threads  # per thread (each thread owns R rows of one pixel)
    sparse_latency = serial_fmas * 4.0 / (a.clock_ghz * 1e3)
    sparse = a.launch_us + max(sparse_compute, sparse_memory, sparse_latency)
    return {"dense_us": dense, "sparse_us": sparse, "speedup": dense / sparse, "pixels": p,
            "dense_bound": "compute" if dense_compute >= dense_memory else "memory",
            "sparse_bound": max((sparse_compute, "compute"), (sparse_memory, "memory"), (sparse_latency, "latency"))[1]}


def choose_kernel(shape_or_spec, block_density: float, batch: int = 1, arch: str | Arch = "sm_87", *, block=(1, 1),
                  in_hw=None, stride=1, padding=None, dilation=1, min_speedup: float = 1.1) -> str:
    """"sparse" or "dense" for a layer (weight shape or LayerSpec) whose R x C blocks are this dense."""
    e = estimate(shape_or_spec, block_density, batch, arch, block=block, in_hw=in_hw, stride=stride,
                 padding=padding, dilation=dilation)
    return "sparse" if e["speedup"] >= min_speedup else "dense"


def layer_geometry(model: torch.nn.Module, input_shape=(1, 3, 32, 32)) -> dict[str, dict]:
    """Per conv/linear layer of a model: {in_hw, stride, padding, dilation, groups}, from one forward pass
    (hooks record the input size each layer sees). Keys are module names as in the state dict."""
    out: dict[str, dict] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            def hook(m, args, _name=name):
                out[_name] = {"in_hw": list(args[0].shape[-2:]), "stride": list(m.stride), "dilation": list(m.dilation),
                              "padding": list(m.padding) if not isinstance(m.padding, str) else m.padding,
                              "groups": m.groups}
            hooks.append(mod.register_forward_pre_hook(hook))
        elif isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(lambda m, args, _name=name: out.__setitem__(_name, {"in_hw": [1, 1]})))
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        with torch.no_grad():
            model(torch.zeros(input_shape, device=p.device if p is not None else "cpu"))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return out


def weight_layers(state: dict[str, torch.Tensor]):
    """(layer name, weight) of every conv (OIHW) and linear weight in a state dict, in its order."""
    for key, w in state.items():
        if key.endswith(".weight") and w.dim() in (2, 4):
            yield key[: -len(".weight")], w


def plan_spec(w: torch.Tensor, geometry: dict, entry: dict, *, max_taps: int | None = None) -> LayerSpec | None:
    """The LayerSpec of a conv (OIHW, with its geometry) or linear weight for a plan entry, which it updates:
    the conv's in_hw/stride/padding, or, where no kernel applies, kernel "dense" and the reason (then None)."""
    reason = None
    if w.dim() == 4:
        g = geometry
        if not g:
            reason = "no geometry (input size) for this conv"
        elif g.get("groups", 1) != 1:
            reason = "grouped convolution"
        elif isinstance(g.get("padding"), str):
            reason = f"padding={g['padding']!r}"
        elif max_taps is not None and w.shape[2] * w.shape[3] > max_taps:
            reason = f"more than {max_taps} taps"
    if reason:
        entry.update({"kernel": "dense", "block": None, "block_density": None, "est_speedup": None, "reason": reason})
        return None
    if w.dim() == 2:
        return linear_spec(w.shape)
    g = geometry
    spec = conv_spec(w.shape, g["in_hw"], g.get("stride", 1), g.get("padding", 0), g.get("dilation", 1))
    entry.update({"in_hw": list(spec.in_hw), "stride": list(spec.stride), "padding": list(spec.padding)})
    return spec


def plan_layers(state: dict[str, torch.Tensor], geometry: dict[str, dict] | None = None, *, batch: int = 1,
                arch: str = "sm_87", blocks=DEFAULT_BLOCKS, min_speedup: float = 1.1) -> dict[str, dict]:
    """The per-layer kernel plan for a model's state dict, for the export manifest.

    Every 4-D (conv, OIHW) or 2-D (linear) ``<layer>.weight`` gets, for the best of ``blocks``:
    {kernel: "sparse"|"dense", block: [R, C], block_density, density, est_speedup, est_us: {dense, sparse},
    shape, in_hw, stride, padding}. geometry maps layer names to {in_hw, stride, padding, dilation, groups}
    (``layer_geometry``); a conv without geometry, with groups > 1, string padding or more than 63 taps is
    planned dense (reason given).
    """
    geometry = geometry or {}
    plan: dict[str, dict] = {}
    for name, w in weight_layers(state):
        entry: dict = {"shape": list(w.shape), "density": float((w != 0).float().mean().item()) if w.numel() else 0.0}
        spec = plan_spec(w, geometry.get(name, {}), entry, max_taps=CUDA_MAX_TAPS)
        if spec is None:
            plan[name] = entry
            continue
        best = None
        for blk in blocks:
            bd = block_density(w, blk)
            e = estimate(spec, bd, batch, arch, block=blk)
            if best is None or e["sparse_us"] < best[2]["sparse_us"]:
                best = (parse_block(blk), bd, e)
        blk, bd, e = best
        entry.update({"kernel": "sparse" if e["speedup"] >= min_speedup else "dense", "block": list(blk),
                      "block_density": bd, "est_speedup": e["speedup"],
                      "est_us": {"dense": e["dense_us"], "sparse": e["sparse_us"]}, "bound": e["sparse_bound"]})
        plan[name] = entry
    return plan


def plan_model(model: torch.nn.Module, input_shape=(1, 3, 32, 32), **kwargs) -> dict[str, dict]:
    """plan_layers for a module: geometry from one forward pass of an input of input_shape."""
    return plan_layers({k: v.detach() for k, v in model.state_dict().items()}, layer_geometry(model, input_shape),
                       **kwargs)
