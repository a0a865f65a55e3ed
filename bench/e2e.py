"""The exported artifact end to end against the dense runtimes a user would otherwise pick, in one run.

    python bench/e2e.py              # VGG-16 and ResNet-18 (CIFAR, 32x32), 90/95/99 %, random and structured
                                     # masks, batch 1 and 8, 1 and 2 threads (~15 min on 2 cores)
    python bench/e2e.py --quick      # VGG-16 at 99 %, random, batch 1, 1 thread: under a minute
    python bench/e2e.py --device cuda   # on a GPU: the CUDA artifact vs torch (cuDNN) and onnxruntime-CUDA

Each configuration is one network with non-trivial BatchNorm statistics and its masks: "random" (every
conv/linear layer at the sparsity, unstructured, what rsp train leaves) or "structured" (the same, then
``rsp structure`` with its defaults: regrouping, zero-vector pruning k=1, shrinking). The rsp artifact is
what ``rsp export --target x86-cpu`` builds: the kernel plan (``export.kernel_plan``) and the TVM library
(``tvm_build.build``) with rsp's CPU kernels for the layers the plan marks sparse. The competitors run the
*same* weights densely: onnxruntime on the ONNX export (BatchNorm folded, its default graph optimisations)
and eager PyTorch (oneDNN).

Timing: every (configuration, threads) runs in a fresh process, so thread pools are set as a user would
(TVM_NUM_THREADS / RSP_NUM_THREADS, onnxruntime intra-op threads, torch.set_num_threads). Within it the
candidates are timed in interleaved rounds, the order rotating every round, each timed burst opened by 0.25 s
of untimed calls (a runtime's spinning workers from the previous candidate have settled and its own are awake:
onnxruntime's spin for more than 20 ms); the
medians over rounds are reported, and the ratios are between medians of the same run. The share of the
artifact's time spent inside rsp's kernels comes from a separate instrumented pass (TVM's VM instrument
around every call), so it is a share, not a latency, and an underestimate: the instrument's own Python
callbacks (two per VM instruction) are counted outside (the library built in the VM's compiled mode, which has
no per-instruction dispatch, ran as fast as the default bytecode one). On more than one thread each of the
artifact's kernels chooses, by timing both in this process, between rsp's thread pool and the calling thread
(cpu_kernels.h, ThreadChoice); a row says on how many layers the pool won.

Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {"vgg16": {}, "resnet18": {}}
SPARSITIES = (0.9, 0.95, 0.99)
STRUCTURES = ("random", "structured")
BATCHES = (1, 8)
THREADS = (1, 2)
CHW = (3, 32, 32)
# untimed calls of a candidate before each timed burst: onnxruntime's intra-op workers keep spinning for
# more than 20 ms after its last call (measured in an ad hoc script: rsp on 2 threads right after onnxruntime with 20 ms of
# settling ran 1.65x slower than alone; with 200 ms, the same), so each candidate is timed as it runs alone
SETTLE_S = 0.25


# --- building the configurations (this process) ------------------------------------------------------


def make_model(name: str, sparsity: float, seed: int = 0):
    """The network with every conv/linear layer masked at `sparsity` (unstructured) and BatchNorm statistics
    that are not the identity (so folding really changes the weights)."""
    import torch

    from rsp.models import create_model

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = create_model(name, num_classes=10, **MODELS[name]).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) >= sparsity)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def structured(model, name: str, sparsity: float, tmp: Path):
    """`rsp structure` (defaults, no attack) on a train folder holding the model; returns the shrunk model."""
    import rsp
    from rsp.artifacts import save_tensors, write_manifest
    from rsp.structure import StructureOptions, run as run_structure

    src = tmp / "src"
    save_tensors(src / "model.safetensors", model.state_dict())
    write_manifest(src, {"stage": "train", "status": "complete", "model": {"name": name, "kwargs": model.rsp_config},
                         "dataset": {"dataset": "cifar10"}, "method": "fixed", "target_sparsity": sparsity,
                         "input": {"shape": list(CHW)}}, ["model.safetensors"])
    run_structure(src, tmp / "structure", StructureOptions(n_examples=0), log=lambda *_: None)
    return rsp.load_model(tmp / "structure").eval()


def build_config(model, batch: int, out: Path, target_name: str) -> dict:
    """The rsp artifact for `model` as rsp export builds it: plan, then the TVM library."""
    from rsp import tvm_build
    from rsp.export import _layer_names, kernel_plan, planned_kernel_layers, sparse_kernel_kind
    from rsp.targets import get_target

    target = get_target(target_name)
    state = model.state_dict()
    names = _layer_names(model)
    plan = kernel_plan(model, CHW, target, state, names, batch)
    kind = sparse_kernel_kind(target, "auto")
    kernels, dense = planned_kernel_layers(plan, state, kind)
    t0 = time.perf_counter()
    res = tvm_build.build(model, CHW, target, out, batch=batch, sparse_layers=kernels or None, sparse_mode=kind,
                          dense_layers=dense, log=lambda *_: None)
    linked = (res.info.get("sparse_kernels") or {}).get("layers", [])
    return {"layers": len(names), "planned_sparse": len(kernels) - len(dense), "rsp_dense": len(dense), "linked": len(linked),
            "fused": sorted({op for ll in linked for op in ll.get("fused", [])}), "build_s": round(time.perf_counter() - t0, 1),
            "dense_baseline": plan.get("dense_baseline")}


# --- timing one configuration (a fresh process) --------------------------------------------------------


def time_config(spec: dict) -> dict:
    """Runs in the child: {candidate: {batch: median ms}} plus the kernel share."""
    threads, device = spec["threads"], spec["device"]
    os.environ["TVM_NUM_THREADS"] = os.environ["RSP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    import rsp
    from rsp.runtimes import onnx_session, run_onnx

    torch.set_num_threads(threads)
    model = rsp.load_model(spec["model_dir"]).eval()
    session = onnx_session(Path(spec["onnx"]).read_bytes(), threads, gpu=device == "cuda")
    dev = tvm.cuda() if device == "cuda" else tvm.cpu()
    if device == "cuda":
        model = model.cuda()
    out: dict = {"candidates": {}, "kernel_share": {}}
    for batch, lib in spec["libs"].items():
        batch = int(batch)
        x = np.random.default_rng(batch).random((batch, *CHW), dtype=np.float32)
        xt = torch.from_numpy(x).to("cuda" if device == "cuda" else "cpu")
        vm = relax.VirtualMachine(tvm.runtime.load_module(lib), dev)
        xi = tvm.runtime.tensor(x, dev)
        fn = vm["main"]

        def sync():
            if device == "cuda":
                dev.sync()
                torch.cuda.synchronize()

        def rsp_run():
            fn(xi)
            sync()

        def ort_run():
            run_onnx(session, x)

        def torch_run():
            with torch.no_grad():
                model(xt)
            sync()

        cands = {"rsp": rsp_run, "onnxruntime": ort_run, "torch": torch_run}
        per_call = {}
        for k, f in cands.items():  # warm-up and a call count per timed burst (~40 ms)
            for _ in range(3):
                f()
            t0 = time.perf_counter()
            f()
            per_call[k] = max(time.perf_counter() - t0, 1e-6)
        n = {k: max(1, int(spec["burst_s"] / v)) for k, v in per_call.items()}
        times: dict = {k: [] for k in cands}
        keys = list(cands)
        for r in range(spec["rounds"]):
            for k in keys[r % len(keys):] + keys[: r % len(keys)]:
                f = cands[k]
                t_end = time.perf_counter() + spec["settle_s"]
                while time.perf_counter() < t_end:
                    f()
                t0 = time.perf_counter()
                for _ in range(n[k]):
                    f()
                times[k].append((time.perf_counter() - t0) / n[k] * 1e3)
        for k, v in times.items():
            out["candidates"].setdefault(k, {})[str(batch)] = statistics.median(v)
        out.setdefault("thread_choices", {})[str(batch)] = thread_choices(lib)
        if device != "cuda":
            out["kernel_share"][str(batch)] = kernel_share(vm, xi)
        del vm
    return out


def thread_choices(lib: str) -> dict:
    """What the library's kernels chose, in this process, between rsp's thread pool and the calling thread
    (rsp_cpu_thread_choices: per layer, by the medians of its probes): {"parallel": n, "serial": n}."""
    import ctypes

    try:
        fn = ctypes.CDLL(lib).rsp_cpu_thread_choices
    except (OSError, AttributeError):
        return {}
    buf = ctypes.create_string_buffer(1 << 16)
    fn(buf, len(buf))
    counts = {"parallel": 0, "serial": 0}
    for line in buf.value.decode().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in counts:
            counts[parts[1]] += 1
    return counts


def kernel_share(vm, xi, calls: int = 30) -> float:
    """Share of the VM's instrumented time inside rsp's kernels (every call timed by the VM instrument)."""
    spent = {"rsp": 0.0, "all": 0.0}
    started = {}

    def instrument(func, symbol, before, ret, *args):
        if before:
            started[symbol] = time.perf_counter()
        else:
            dt = time.perf_counter() - started.pop(symbol, time.perf_counter())
            spent["all"] += dt
            if str(symbol).startswith("rsp_cpu_") or str(symbol).startswith("rsp_bsr_"):
                spent["rsp"] += dt
        return 0

    vm.set_instrument(instrument)
    for _ in range(calls):
        vm["main"](xi)
    return spent["rsp"] / spent["all"] if spent["all"] else 0.0


# --- the driver ---------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="VGG-16 at 99 %%, random, batch 1, 1 thread (< 1 min)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", action="append", choices=sorted(MODELS), help="default: all")
    ap.add_argument("--sparsity", action="append", type=float, help="default: 0.9 0.95 0.99")
    ap.add_argument("--structure", action="append", choices=STRUCTURES, help="default: both")
    ap.add_argument("--batch", action="append", type=int, help="default: 1 8")
    ap.add_argument("--threads", action="append", type=int, help="default: 1 2")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, 7 with --quick)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(time_config(json.loads(Path(args.child).read_text()))))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench/e2e.py: error: --device cuda needs a CUDA GPU and a CUDA build of torch", file=sys.stderr)
            return 2
    models = args.model or (["vgg16"] if args.quick else list(MODELS))
    sparsities = args.sparsity or ([0.99] if args.quick else list(SPARSITIES))
    structures = args.structure or (["random"] if args.quick else list(STRUCTURES))
    batches = args.batch or ([1] if args.quick else list(BATCHES))
    threads = args.threads or ([1] if args.quick else list(THREADS))
    rounds = args.rounds or (7 if args.quick else 15)
    target = "cuda" if args.device == "cuda" else "x86-cpu"

    import torch

    from rsp.artifacts import save_tensors, write_manifest
    from rsp.export import export_onnx

    rows, t_start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rsp-e2e-") as tmp:
        tmp = Path(tmp)
        for name in models:
            for sp in sparsities:
                for st in structures:
                    key = f"{name}/{st}@{sp:g}"
                    d = tmp / key.replace("/", "_").replace("@", "_")
                    d.mkdir(parents=True)
                    model = make_model(name, sp)
                    if st == "structured":
                        model = structured(model, name, sp, d)
                    nz = sum(int((m.weight != 0).sum()) for m in model.modules()
                             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
                    save_tensors(d / "model" / "model.safetensors", model.state_dict())
                    write_manifest(d / "model", {"stage": "train", "status": "complete",
                                                 "model": {"name": name, "kwargs": model.rsp_config},
                                                 "input": {"shape": list(CHW)}}, ["model.safetensors"])
                    (d / "model.onnx").write_bytes(export_onnx(model, CHW, "fp32", 17, {}))
                    libs, build = {}, {}
                    for b in batches:
                        libs[str(b)] = str(d / f"model_b{b}.tvm.so")
                        build[str(b)] = build_config(model, b, Path(libs[str(b)]), target)
                    for th in threads:
                        spec = {"threads": th, "device": args.device, "model_dir": str(d / "model"),
                                "onnx": str(d / "model.onnx"), "libs": libs, "rounds": rounds,
                                "burst_s": 0.04, "settle_s": SETTLE_S}
                        (d / f"spec{th}.json").write_text(json.dumps(spec))
                        proc = subprocess.run([sys.executable, __file__, "--child", str(d / f"spec{th}.json")],
                                              capture_output=True, text=True)
                        if proc.returncode != 0:
                            raise SystemExit(f"bench/e2e.py: timing {key} on {th} threads failed: "
                                             f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
                        res = json.loads(proc.stdout.strip().splitlines()[-1])
                        for b in batches:
                            c = {k: v[str(b)] for k, v in res["candidates"].items()}
                            best = min(("onnxruntime", "torch"), key=lambda k: c[k])
                            row = {"model": name, "structure": st, "sparsity": sp, "batch": b, "threads": th,
                                   "nonzero_weights": nz, "ms": c, "fastest_dense": best,
                                   "speedup_vs_onnxruntime": c["onnxruntime"] / c["rsp"],
                                   "speedup_vs_torch": c["torch"] / c["rsp"],
                                   "speedup_vs_fastest_dense": c[best] / c["rsp"],
                                   "kernel_share": res["kernel_share"].get(str(b)),
                                   "thread_choices": res.get("thread_choices", {}).get(str(b)), "build": build[str(b)]}
                            rows.append(row)
                            print(f"{name:<9} {st:<10} {sp:>5.0%} b{b} t{th}  rsp {c['rsp']:8.3f} ms  "
                                  f"onnxruntime {c['onnxruntime']:8.3f}  torch {c['torch']:8.3f}  "
                                  f"vs ort {row['speedup_vs_onnxruntime']:6.2f}x  vs torch {row['speedup_vs_torch']:6.2f}x"
                                  + (f"  in kernels {row['kernel_share']:.0%}" if row["kernel_share"] is not None else "")
                                  + (f"  on the pool {row['thread_choices']['parallel']}/"
                                     f"{row['thread_choices']['parallel'] + row['thread_choices']['serial']} layers"
                                     if th > 1 and row["thread_choices"] else ""),
                                  flush=True)
    worst = min(rows, key=lambda r: r["speedup_vs_onnxruntime"])

    def goal(ratio: float, model: str | None = None, batch: int | None = None,
             sparsity: float | None = None) -> bool | None:
        # None, not True, when no row of this run measures the goal (--quick, or a --model/--sparsity filter)
        picked = [r for r in rows if (model is None or r["model"] == model) and (batch is None or r["batch"] == batch)
                  and (sparsity is None or r["sparsity"] == sparsity)]
        return all(r["speedup_vs_onnxruntime"] >= ratio for r in picked) if picked else None

    goals = {
        "every_row_at_least_1x_onnxruntime": goal(1.0),
        "vgg16_batch1_90_at_least_2x": goal(2.0, "vgg16", 1, 0.9),
        "vgg16_batch1_99_at_least_10x": goal(10.0, "vgg16", 1, 0.99),
    }
    import onnxruntime
    import tvm

    print(json.dumps({"bench": "e2e", "device": args.device, "quick": args.quick, "target": target,
                      "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__,
                      "cpu": _cpu_name(), "rounds": rounds, "time_s": round(time.perf_counter() - t_start, 1),
                      "goals": goals, "worst_vs_onnxruntime": {k: worst[k] for k in ("model", "structure", "sparsity",
                                                                                      "batch", "threads",
                                                                                      "speedup_vs_onnxruntime")},
                      "rows": rows}))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


if __name__ == "__main__":
    sys.exit(main())
