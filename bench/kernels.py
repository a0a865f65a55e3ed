"""Sparse BSR kernels vs dense convolution on VGG-16 (CIFAR) layer shapes, in one run.

    python bench/kernels.py              # GPU: generated CUDA kernels vs cuDNN, 90/95/99 %, batch 1 and 32
    python bench/kernels.py --quick      # CPU, under a minute: rsp's CPU sparse kernels vs F.conv2d, 3 shapes
    python bench/kernels.py --device cpu # CPU, every VGG-16 shape (the CPU cost model's calibration)
    python bench/kernels.py --build-only --arch sm_90   # compile every kernel into $RSP_KERNEL_CACHE, no GPU

Weights per layer shape and sparsity: "random" (unstructured, what rsp train produces) and "block"
(whole 4x4 blocks of the GEMM view kept or zeroed, as ``rsp structure --prune-block 4x4`` leaves them).

On a GPU each configuration times three candidates on the same input: dense ``F.conv2d`` / ``F.linear``
(cuDNN, ``cudnn.benchmark`` on, torch's default TF32 setting, recorded), the generated sparse kernel the
exporter would pick (``mode=auto``: specialised, or generic above the code-size cap) and the generic BSR
kernel. Each candidate is captured ``--inner`` times into a CUDA graph (so host launch overhead does not
count, for either side), replayed between CUDA events, and the candidates are interleaved round by round;
the median per call is reported. Outputs are checked against dense fp32 before timing.

On a CPU (no GPU, --quick or --device cpu) the candidates are dense ``F.conv2d`` / ``F.linear`` (oneDNN) on
``--threads`` threads (default 1) and rsp's CPU sparse kernel for the layer (``rsp.kernels.cpu``,
single-threaded), interleaved round by round; each row also has the CPU cost model's estimate, so its
calibration can be checked against the measurement.

Prints a table and, as its last line, one JSON object: per configuration dense/sparse latency and speedup,
and per (sparsity, structure, batch) the VGG-16 total (every conv and the classifier, with their
multiplicities). Goal: at 99 % and batch 1, the sparse layers >= 5x faster than dense on an H100.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsp.kernels import compile_kernels, conv_spec, generate, linear_spec  # noqa: E402
from rsp.kernels.build import CudaLayer, KernelBuildError, local_arch  # noqa: E402

# VGG-16 on 32x32 inputs: (name, out, in, input size; None for the classifier), and how often the shape occurs.
VGG16_LAYERS = [
    ("conv1_1", 64, 3, 32, 1), ("conv1_2", 64, 64, 32, 1), ("conv2_1", 128, 64, 16, 1), ("conv2_2", 128, 128, 16, 1),
    ("conv3_1", 256, 128, 8, 1), ("conv3_2", 256, 256, 8, 2), ("conv4_1", 512, 256, 4, 1), ("conv4_2", 512, 512, 4, 2),
    ("conv5_x", 512, 512, 2, 3),
    ("fc1", 256, 2048, None, 1), ("fc2", 256, 256, None, 1), ("fc3", 10, 256, None, 1),  # the paper's head
]
QUICK_LAYERS = ["conv3_2", "conv5_x", "fc1"]
GOAL_SPEEDUP = 5.0


def _seed(name, sp, st) -> int:
    """Deterministic across processes (a --build-only run and the timing run must make the same weights)."""
    return zlib.crc32(f"{name}/{st}@{sp:g}".encode())


def make_weight(out_ch, in_ch, hw, sparsity, structure, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (out_ch, in_ch, 3, 3) if hw is not None else (out_ch, in_ch)
    w = torch.randn(shape, generator=gen) * (2.0 / (in_ch * (9 if hw is not None else 1))) ** 0.5
    g = w.reshape(out_ch, -1)
    if structure == "random":
        keep = torch.rand(g.shape, generator=gen) < (1.0 - sparsity)
    else:  # 4x4 blocks of the GEMM view (ragged edges padded)
        r, c = 4, 4
        kb = torch.rand(-(-g.shape[0] // r), -(-g.shape[1] // c), generator=gen) < (1.0 - sparsity)
        keep = kb.repeat_interleave(r, 0).repeat_interleave(c, 1)[: g.shape[0], : g.shape[1]]
    return (g * keep).reshape(shape)


def spec_of(out_ch, in_ch, hw):
    return conv_spec((out_ch, in_ch, 3, 3), (hw, hw), 1, 1) if hw is not None else linear_spec((out_ch, in_ch))


def dense_fn(w, hw):
    return (lambda x: F.conv2d(x, w, None, 1, 1)) if hw is not None else (lambda x: F.linear(x, w))


def vgg_totals(results, layers, sparsities, structures, batches, key_time="sparse_us"):
    """Sum over the network (with multiplicities) of dense and sparse time per (sparsity, structure, batch)."""
    mult = {name: m for name, *_, m in VGG16_LAYERS}
    net = "vgg16" if set(layers) == set(mult) else "subset"  # a subset is summed with the same multiplicities
    out = {}
    for sp in sparsities:
        for st in structures:
            for b in batches:
                rows = [(results[k], mult[name]) for name in layers
                        if (k := f"{name}/{st}@{sp:g}/b{b}") in results and results[k].get(key_time)]
                if len(rows) != len(layers):
                    continue
                dense = sum(r["dense_us"] * m for r, m in rows)
                sparse = sum(r[key_time] * m for r, m in rows)
                out[f"{net}/{st}@{sp:g}/b{b}"] = {"dense_us": dense, "sparse_us": sparse, "speedup": dense / sparse}
    return out


# ---------------------------------------------------------------------------------------------------- CPU


def run_cpu(args, layers, sparsities, structures, batches):
    """rsp's CPU sparse kernels (rsp.kernels.cpu, single-threaded) vs F.conv2d / F.linear (oneDNN) on
    --threads threads (default 1: the same core), interleaved round by round, medians. Returns the sparse rows
    and, per shape and batch, rsp's dense kernel against the same library."""
    from rsp.kernels.cpu import estimate_cpu, generate_cpu, load_cpu_layer

    torch.set_num_threads(args.threads or 1)
    results, dense_rows = {}, {}
    for name, out_ch, in_ch, hw, _ in [l for l in VGG16_LAYERS if l[0] in layers]:
        # rsp's dense kernel (what a layer where sparse does not pay runs), once per shape: it reads every weight,
        # zero or not, so its time does not depend on the sparsity
        spec = spec_of(out_ch, in_ch, hw)
        w_dense = make_weight(out_ch, in_ch, hw, 0.0, "random", seed=_seed(name, 0.0, "random"))
        rsp_dense = load_cpu_layer(generate_cpu(spec, w_dense, label=name, dense=True))
        for batch in batches:
            x, dense = _cpu_input(batch, in_ch, hw), dense_fn(w_dense, hw)
            out = torch.empty(spec.output_shape(batch))
            err = (rsp_dense(x, out) - dense(x)).abs().max().item()
            t = _interleaved({"dense": dense, "rsp_dense": lambda x, out=out: rsp_dense(x, out)}, x, args)
            est = estimate_cpu(spec, spec.gemm_shape[0] * spec.gemm_shape[1], batch)["rsp_dense_us"]
            dense_rows[f"{name}/dense/b{batch}"] = {"dense_us": t["dense"], "rsp_dense_us": t["rsp_dense"],
                                                    "rsp_dense_vs_library": t["dense"] / t["rsp_dense"], "max_err": err,
                                                    "est_rsp_dense_us": est, "est_over_measured": est / t["rsp_dense"]}
        for sp in sparsities:
            for st in structures:
                w = make_weight(out_ch, in_ch, hw, sp, st, seed=_seed(name, sp, st))
                t_build = time.perf_counter()
                layer = load_cpu_layer(generate_cpu(spec, w, label=name))
                t_build = time.perf_counter() - t_build
                for batch in batches:
                    x, dense = _cpu_input(batch, in_ch, hw), dense_fn(w, hw)
                    out = torch.empty(spec.output_shape(batch))
                    err = (layer(x, out) - dense(x)).abs().max().item()
                    t = _interleaved({"dense": dense, "sparse": lambda x, out=out: layer(x, out)}, x, args)
                    d, s = t["dense"], t["sparse"]
                    est = estimate_cpu(spec, int((w != 0).sum()), batch)
                    results[f"{name}/{st}@{sp:g}/b{batch}"] = {
                        "dense_us": d, "sparse_us": s, "speedup": d / s, "mode": "cpu", "max_err": err,
                        "density": float((w != 0).float().mean()), "build_s": round(t_build, 2),
                        "est_speedup": est["speedup"], "est_us": {"dense": est["dense_us"], "sparse": est["sparse_us"]}}
    return results, dense_rows


def _cpu_input(batch, in_ch, hw):
    gen = torch.Generator().manual_seed(batch)
    return torch.rand(batch, in_ch, hw, hw, generator=gen) if hw is not None else torch.rand(batch, in_ch, generator=gen)


def _interleaved(candidates: dict, x, args) -> dict[str, float]:
    """Median microseconds per call of each candidate, timed round by round in turn."""
    t = {cand: [] for cand in candidates}
    for fn in candidates.values():
        fn(x)  # warm-up: allocator, oneDNN primitive cache, the kernel's scratch
    reps = max(1, args.inner // 10)
    for _ in range(args.rounds):
        for cand, fn in candidates.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(x)
            t[cand].append((time.perf_counter() - t0) / reps)
    return {cand: statistics.median(v) * 1e6 for cand, v in t.items()}


# ---------------------------------------------------------------------------------------------------- GPU


def graph_timer(fn, inner):
    """Seconds per call of fn, from a CUDA graph of `inner` calls replayed between events (eager fallback)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for _ in range(inner):
                fn()
        g.replay()
        torch.cuda.synchronize()
        run, method = g.replay, "cuda-graph"
    except Exception:  # noqa: BLE001 - capture unsupported here: time eager back-to-back launches
        torch.cuda.synchronize()

        def run():
            for _ in range(inner):
                fn()
        method = "eager"

    def timed():
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / inner

    return timed, method


def build_all(configs, arch, workers):
    """Generate and compile every kernel (in parallel: nvcc runs as subprocesses). Returns {key: (ks, lib or error)}."""
    def job(item):
        key, ks = item
        t0 = time.perf_counter()
        try:
            return key, ks, compile_kernels(ks, arch, "so"), time.perf_counter() - t0
        except KernelBuildError as e:
            return key, ks, e, time.perf_counter() - t0

    out = {}
    with cf.ThreadPoolExecutor(max_workers=workers) as ex:
        for key, ks, lib, secs in ex.map(job, configs):
            out[key] = (ks, lib, secs)
            status = "ok" if isinstance(lib, Path) else f"FAILED: {lib}"
            print(f"  built {key:<40} {ks.mode:<12} {ks.stats.get('statements') or ks.stats.get('nnzb')!s:>8} "
                  f"{secs:6.1f} s  {status}", flush=True)
    return out


def kernel_configs(layers, sparsities, structures, arch, max_statements, rows_per_thread=None):
    """[(key, KernelSource)] for the auto (specialised or generic) and the generic kernel of each config."""
    configs, weights = [], {}
    for name, out_ch, in_ch, hw, _ in [l for l in VGG16_LAYERS if l[0] in layers]:
        spec = spec_of(out_ch, in_ch, hw)
        for sp in sparsities:
            for st in structures:
                w = make_weight(out_ch, in_ch, hw, sp, st, seed=_seed(name, sp, st))
                weights[(name, sp, st)] = w
                auto = generate(spec, w, None, label=name, arch=arch, max_statements=max_statements,
                                rows_per_thread=rows_per_thread)
                generic = generate(spec, w, None, label=name, mode="generic")  # block: codegen.generic_block
                configs.append((f"{name}/{st}@{sp:g}/auto", auto))
                if generic.name != auto.name:
                    configs.append((f"{name}/{st}@{sp:g}/generic", generic))
    return configs, weights


def run_gpu(args, layers, sparsities, structures, batches):
    torch.backends.cudnn.benchmark = True
    arch = args.arch or local_arch()
    configs, weights = kernel_configs(layers, sparsities, structures, arch, args.max_statements,
                                      args.rows_per_thread)
    print(f"building {len(configs)} kernels for {arch} ...", flush=True)
    built = build_all(configs, arch, args.workers)
    results = {}
    dev = torch.device("cuda")
    for name, _out_ch, in_ch, hw, _ in [l for l in VGG16_LAYERS if l[0] in layers]:
        for sp in sparsities:
            for st in structures:
                w = weights[(name, sp, st)].to(dev)
                base = f"{name}/{st}@{sp:g}"
                layers_ = {}
                for variant in ("auto", "generic"):
                    entry = built.get(f"{base}/{variant}")
                    if entry and isinstance(entry[1], Path):
                        layers_[variant] = CudaLayer(entry[1], entry[0])
                for batch in batches:
                    gen = torch.Generator(device=dev).manual_seed(batch)
                    shape = (batch, in_ch, hw, hw) if hw is not None else (batch, in_ch)
                    x = torch.rand(shape, generator=gen, device=dev)
                    dense = dense_fn(w, hw)
                    with torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=False):
                        ref = dense(x)
                    row = {"mode": built[f"{base}/auto"][0].mode, "compile_s": built[f"{base}/auto"][2]}
                    cands = {"dense": dense}
                    for variant, layer in layers_.items():
                        y = torch.empty_like(ref)
                        try:
                            layer(x, out=y)
                            torch.cuda.synchronize()
                        except RuntimeError as e:
                            row[f"{variant}_error"] = str(e)
                            continue
                        row[f"{variant}_max_err"] = (y - ref).abs().max().item()
                        cands[variant] = (lambda layer=layer, y=y: layer(x, out=y))
                    timers = {}
                    for cand, fn in cands.items():
                        timers[cand], row[f"{cand}_timing"] = graph_timer(fn, args.inner)
                    times = {c: [] for c in timers}
                    for _ in range(args.rounds):
                        for c, t in timers.items():
                            times[c].append(t())
                    row["dense_us"] = statistics.median(times["dense"]) * 1e6
                    if "auto" in times:
                        row["sparse_us"] = statistics.median(times["auto"]) * 1e6
                        row["speedup"] = row["dense_us"] / row["sparse_us"]
                    if "generic" in times:
                        row["generic_us"] = statistics.median(times["generic"]) * 1e6
                    elif row["mode"] == "generic" and "sparse_us" in row:  # auto already is the generic kernel
                        row["generic_us"] = row["sparse_us"]
                    results[f"{base}/b{batch}"] = row
                    print(f"  {base}/b{batch:<4} dense {row['dense_us']:9.2f} us  sparse {row.get('sparse_us', float('nan')):9.2f} us"
                          f"  ({row['mode']})  generic {row.get('generic_us', float('nan')):9.2f} us  "
                          f"x{row.get('speedup', float('nan')):.2f}", flush=True)
    return results, arch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU run under a minute: rsp's CPU kernels vs F.conv2d on 3 shapes")
    ap.add_argument("--threads", type=int, default=None, help="CPU: threads of the dense baseline (default 1)")
    ap.add_argument("--device", default="auto", help="auto, cuda or cpu")
    ap.add_argument("--layers", default=None, help="comma-separated names from: " + ",".join(l[0] for l in VGG16_LAYERS))
    ap.add_argument("--sparsities", default="0.9,0.95,0.99")
    ap.add_argument("--structures", default="random,block")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per configuration (median)")
    ap.add_argument("--inner", type=int, default=50, help="calls per CUDA graph replay")
    ap.add_argument("--arch", default=None, help="target arch for the CUDA build (default: the local GPU's)")
    ap.add_argument("--max-statements", type=int, default=None, help="code-size cap of specialised kernels")
    ap.add_argument("--rows-per-thread", type=int, default=None,
                    help="output channels per thread of the specialised kernels (default: codegen's choice)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel nvcc builds")
    ap.add_argument("--build-only", action="store_true", help="only generate and compile (needs --arch without a GPU)")
    args = ap.parse_args(argv)
    from rsp.kernels.codegen import DEFAULT_MAX_STATEMENTS

    args.max_statements = args.max_statements or DEFAULT_MAX_STATEMENTS
    use_cuda = (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) and not args.quick
    layers = args.layers.split(",") if args.layers else ([l[0] for l in VGG16_LAYERS] if not args.quick else QUICK_LAYERS)
    unknown = set(layers) - {l[0] for l in VGG16_LAYERS}
    if unknown:
        ap.error(f"unknown layers {sorted(unknown)}")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    structures = args.structures.split(",")
    batches = [int(b) for b in args.batches.split(",")]

    if args.build_only:
        if not args.arch:
            ap.error("--build-only needs --arch (e.g. sm_90)")
        configs, _ = kernel_configs(layers, sparsities, structures, args.arch, args.max_statements,
                                    args.rows_per_thread)
        built = build_all(configs, args.arch, args.workers)
        failed = [k for k, v in built.items() if not isinstance(v[1], Path)]
        print(json.dumps({"bench": "kernels", "build_only": True, "arch": args.arch, "kernels": len(built),
                          "failed": failed, "compile_s": {k: v[2] for k, v in built.items()}}))
        return

    t0 = time.perf_counter()
    if use_cuda:
        args.rounds = args.rounds or 15
        (results, arch), dense_rows = run_gpu(args, layers, sparsities, structures, batches), {}
        device, mode = torch.cuda.get_device_name(), "cuda"
    else:
        args.rounds = args.rounds or (3 if args.quick else 7)
        (results, dense_rows), arch, device, mode = run_cpu(args, layers, sparsities, structures, batches), None, "cpu", "cpu"

    totals = vgg_totals(results, layers, sparsities, structures, batches)
    print(f"{'configuration':<34}{'dense us':>12}{'sparse us':>12}{'speedup':>10}")
    for k, v in {**results, **totals}.items():
        print(f"{k:<34}{v['dense_us']:>12.2f}{v.get('sparse_us', float('nan')):>12.2f}{v.get('speedup', float('nan')):>10.2f}")
    rsp_dense = None
    if dense_rows:
        print(f"\n{'rsp dense kernel (one thread)':<34}{'oneDNN us':>12}{'rsp us':>12}{'vs oneDNN':>10}"
              f"{'est us':>12}{'est/meas':>10}")
        for k, v in dense_rows.items():
            print(f"{k:<34}{v['dense_us']:>12.2f}{v['rsp_dense_us']:>12.2f}{v['rsp_dense_vs_library']:>10.2f}"
                  f"{v['est_rsp_dense_us']:>12.2f}{v['est_over_measured']:>10.2f}")
        ratios = [v["rsp_dense_vs_library"] for v in dense_rows.values()]
        est = [v["est_over_measured"] for v in dense_rows.values()]
        # the planner costs a dense fallback layer at its estimate: how far that is from the measurement
        rsp_dense = {"rows": dense_rows, "median_vs_library": statistics.median(ratios), "min_vs_library": min(ratios),
                     "estimate_over_measured": {"min": min(est), "median": statistics.median(est), "max": max(est)}}
        print(f"rsp dense kernel vs oneDNN: median {rsp_dense['median_vs_library']:.2f}x, min {min(ratios):.2f}x; "
              f"the planner's estimate / measured: {min(est):.2f}-{max(est):.2f}")
    goal = {}
    for st in structures:
        key = f"{'vgg16' if len(layers) == len(VGG16_LAYERS) else 'subset'}/{st}@0.99/b1"
        if key in totals:
            goal[st] = totals[key]["speedup"]
    per_layer_99 = {k: v["speedup"] for k, v in results.items() if "@0.99/b1" in k and "speedup" in v}
    print(json.dumps({
        "bench": "kernels", "device": device, "mode": mode, "arch": arch, "torch": torch.__version__, "quick": args.quick,
        "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32) if use_cuda else None,
        "layers": layers, "sparsities": sparsities, "structures": structures, "batches": batches,
        "rounds": args.rounds, "inner": args.inner, "seconds": time.perf_counter() - t0,
        "dense_threads": None if use_cuda else torch.get_num_threads(),
        "results": results, "ratios": {k: v["speedup"] for k, v in {**results, **totals}.items() if "speedup" in v},
        "vgg16_totals": totals, "rsp_dense_kernel": rsp_dense, "speedup_99_b1": goal, "speedup_99_b1_per_layer": per_layer_99,
        "goal_speedup_min": GOAL_SPEEDUP,
        "goal_met": (bool(goal) and max(goal.values()) >= GOAL_SPEEDUP) if mode == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
