"""What `rsp structure` buys: parameters, MACs and dense-runtime latency of the shrunk model vs the original.

    python bench/structure.py --run runs/vgg16-99          # a trained folder (the honest figure)
    python bench/structure.py --quick                      # no folder: VGG-16 (width 0.5) with a random
                                                           # 99 % pattern at the BCS initial densities
Both models run as plain dense PyTorch modules on the same device in one run, interleaved, so the
latency ratio is what physical shrinking alone gives (sparse kernels come on top, in rsp export).
Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rsp  # noqa: E402
from rsp.artifacts import save_tensors, write_manifest  # noqa: E402
from rsp.models import create_model  # noqa: E402
from rsp.sparse import dense_state_dict, make_sparse, sparsifiable_layers  # noqa: E402
from rsp.structure import StructureOptions, run as run_structure  # noqa: E402


def macs(model: nn.Module, shape) -> int:
    """Multiply-accumulates of the dense-shaped conv/linear layers for one image."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.shape[1] * out.shape[2] * out.shape[3] * m.weight[0].numel()
        else:
            total += m.weight.numel()

    handles = [m.register_forward_hook(hook) for _, m in sparsifiable_layers(model)]
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return total


def synthetic_run(folder: Path, width: float, sparsity: float) -> Path:
    torch.manual_seed(0)
    model = create_model("vgg16", num_classes=10, width=width)
    make_sparse("fixed", model, sparsity, torch.Generator().manual_seed(0), model_name="vgg16")
    state = dense_state_dict(model)
    plain = create_model("vgg16", num_classes=10, width=width)
    plain.load_state_dict(state)
    save_tensors(folder / "model.safetensors", plain.state_dict())
    write_manifest(folder, {"stage": "train", "model": {"name": "vgg16", "kwargs": plain.rsp_config},
                            "dataset": {"dataset": "cifar10"}, "method": "fixed", "target_sparsity": sparsity,
                            "input": {"shape": [3, 32, 32]}}, ["model.safetensors"])
    return folder


def latency(models: dict, x: torch.Tensor, reps: int) -> dict:
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)
        for _ in range(reps):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a train folder to structure (default: a synthetic VGG-16 at --sparsity)")
    ap.add_argument("--quick", action="store_true", help="CPU run under a minute")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--sparsity", type=float, default=0.99)
    ap.add_argument("--width", type=float, default=None, help="synthetic VGG-16 width (default 1, 0.5 with --quick)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    reps = args.reps or (5 if args.quick else 30)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.run:
            src = Path(args.run)
        else:
            (tmp / "src").mkdir()
            src = synthetic_run(tmp / "src", args.width or (0.5 if args.quick else 1.0), args.sparsity)
        manifest = run_structure(src, tmp / "out", StructureOptions(k=args.k, n_examples=0), log=lambda *_: None)
        original, shrunk = rsp.load_model(src), rsp.load_model(tmp / "out")
    shape = tuple(manifest.get("input", {}).get("shape", [3, 32, 32]))
    layers = [n for n, _ in sparsifiable_layers(original)]
    nz = lambda m: sum(int(torch.count_nonzero(l.weight)) for _, l in sparsifiable_layers(m))
    dense_params = lambda m: sum(l.weight.numel() for _, l in sparsifiable_layers(m))
    fig = {
        "dense_shaped_weights": {"original": dense_params(original), "shrunk": dense_params(shrunk)},
        "nonzero_weights": {"original": nz(original), "shrunk": nz(shrunk)},
        "macs_dense": {"original": macs(original, shape), "shrunk": macs(shrunk, shape)},
    }
    lat = {}
    for batch in (1, 32):
        x = torch.rand(batch, *shape)
        lat[f"batch{batch}"] = latency({"original": original, "shrunk": shrunk}, x, reps)
    ratios = {
        "weights_shrunk_over_original": fig["dense_shaped_weights"]["shrunk"] / fig["dense_shaped_weights"]["original"],
        "nonzero_shrunk_over_original": fig["nonzero_weights"]["shrunk"] / max(1, fig["nonzero_weights"]["original"]),
        "macs_shrunk_over_original": fig["macs_dense"]["shrunk"] / fig["macs_dense"]["original"],
        **{f"speedup_{b}": v["original"] / v["shrunk"] for b, v in lat.items()},
    }
    print(f"{'':<24}{'original':>14}{'shrunk':>14}")
    for k, v in fig.items():
        print(f"{k:<24}{v['original']:>14,}{v['shrunk']:>14,}")
    for b, v in lat.items():
        print(f"{'latency ms ' + b:<24}{v['original']:>14.2f}{v['shrunk']:>14.2f}")
    print(json.dumps({"bench": "structure", "device": "cpu", "torch": torch.__version__, "quick": args.quick,
                      "source": args.run or f"synthetic vgg16 width {args.width or (0.5 if args.quick else 1.0)} "
                      f"random pattern at {args.sparsity}", "k": args.k, "layers": len(layers),
                      "removed_channels": manifest["structure"]["removed_channels"], "figures": fig,
                      "latency_ms": lat, "ratios": ratios}))


if __name__ == "__main__":
    main()
