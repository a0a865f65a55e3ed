"""rsp verify: robustness, parity and latency of the artifact that will ship, with CI gates.

Order of work, so a CI job fails early and cheaply on bad input:
  1. the bundle's files against the sha256 in its manifest (a changed or missing file: exit 2)
  2. the runtimes: the PyTorch twin (weights of model.safetensors, the exact exported numbers) and
     each requested artifact runtime (onnxruntime, the TVM VM here or on a remote device over TVM RPC,
     a TensorRT engine built and cached on this GPU)
  3. parity: clean logits of every artifact vs the twin on the evaluation images
  4. robustness: white-box attacks on the twin (rsp.attacks, the package training uses); the adversarial
     examples are then classified by each artifact, and that is its robust accuracy; the black-box
     Square attack queries the artifact itself. Worst case per example over attacks and restarts.
  5. sanity checks of a careful evaluation (sanity.py); a failure marks the result unreliable
  6. latency at batch 1 and a larger batch, the dense original timed on the same runtime in the same run
  7. verify.json, report.md, PNG charts; gates -> exit 0 (pass) / 1 (a gate failed)
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .artifacts import (MANIFEST, ArtifactError, SourceRun, atomic_write_text, build_model, check_files, load_model,
                        lock_folder, read_manifest, require_complete, write_json)
from .attacks import ATTACK_REGISTRY, attack_names, default_step_size
from .latency import compare
from .progress import StepProgress
from .formats import backends as registered_backends, formats as registered_formats
from .runtimes import Runtime, RuntimeUnavailable, close_runtimes, torch_runtime
from .runtimes import tvm_runtime  # noqa: F401  (the old name here: tests guard it; rsp.formats.tvm opens the library)

GATES = ("min_clean_acc", "min_robust_acc", "max_latency_ms", "max_parity_error", "min_speedup")


def __getattr__(name: str):
    # asked for, not fixed at import: a format registered later (rsp.formats.register) is listed
    if name == "BACKENDS":  # the twin, then every registered backend
        return ("torch", *registered_backends())
    if name == "DENSE_RUNTIMES":
        return _dense_runtime_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TORCH_DENSE_PRIORITY = 15  # eager PyTorch among the formats' dense runtimes: after onnxruntime, as reports list them


def _dense_runtime_sources() -> list[tuple[str, object]]:
    """(name, the format that runs it, None for eager PyTorch), in the order reports list them."""
    entries = [(TORCH_DENSE_PRIORITY, "torch", None)] + [(f.priority, f.dense_runtime_name, f)
                                                         for f in registered_formats().values() if f.dense_runtime_name]
    return [(name, fmt) for _, name, fmt in sorted(entries, key=lambda e: e[0])]


def _dense_runtime_names() -> tuple[str, ...]:
    """The dense runtimes a user could run instead of the artifact, timed on this machine beside it."""
    return tuple(name for name, _ in _dense_runtime_sources())


def _same_dense_runtime(backend: str) -> str | None:
    """The dense runtime that is the backend's same-runtime dense original (timed once, as that one)."""
    return "torch" if backend == "torch" else registered_backends()[backend].same_dense_runtime


def _remote(backend: str) -> bool:
    return backend != "torch" and registered_backends()[backend].remote


class VerifyError(ArtifactError):
    """Bad verify input: one line, exit code 2."""


@dataclass
class VerifyOptions:
    output: str
    backends: list[str] | None = None  # None: every artifact in the bundle that runs here (else the twin)
    dataset: str | None = None
    data_dir: str | None = None
    attacks: list[str] | None = None  # None: the preset's (PRESETS); a list: those attacks, each on every image
    preset: str | None = None  # None: 'default' unless attacks are named
    eps: float | None = None
    steps: int | None = None  # PGD; None: the preset's (50)
    restarts: int | None = None  # PGD; None: the preset's (10)
    step_size: float | None = None  # PGD; None: the preset's rule
    n_examples: int | None = None  # None: the preset's (1000; reference: all); 0: all
    seed: int = 0
    sanity: bool = True
    latency_batches: tuple[int, ...] = (1, 32)
    latency_runs: int = 100
    latency_max_seconds: float = 20.0
    device: str = "cpu"
    threads: int | None = None
    gates: dict = field(default_factory=dict)  # overrides of the manifest's gates
    rpc: str | None = None  # HOST:PORT of a TVM RPC server (or tracker, with rpc_key): backend tvm-rpc runs there
    rpc_key: str | None = None
    expect_sha256: str | None = None  # the sha256 of the bundle's manifest.json; any other bundle is refused


def bundle_origin(bundle: Path, manifest: dict, expected: str | None) -> str:
    """The sha256 of the bundle's manifest.json, refused unless it is `expected` (--expect-sha256).

    The sha256 list in a manifest proves that the files are intact, not who made them: whoever can write the
    folder can swap model.tvm.so (native code verify loads and runs) and re-hash the manifest. The manifest's
    own hash, taken from export's output and checked here before anything native is loaded, pins every file."""
    if expected is not None and not re.fullmatch(r"[0-9a-f]{64}", expected.strip().lower()):
        raise VerifyError(f"--expect-sha256 must be a sha256 (64 hex digits), got {expected!r}")
    path = bundle / MANIFEST
    max_bytes = 16 << 20  # as read_manifest: a manifest is kilobytes
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise VerifyError(f"{path}: cannot read ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected is not None and digest != expected.strip().lower():
        raise VerifyError(f"{path} has sha256 {digest}, not the expected {expected.strip().lower()}: refusing to load "
                          "this bundle (its files, the TVM library included, are not the ones exported)")
    # the hashed bytes must be the manifest that was parsed (not a file swapped in between)
    try:
        same = json.dumps(json.loads(data), sort_keys=True) == json.dumps(manifest, sort_keys=True)
    except (ValueError, RecursionError):
        same = False
    if not same:
        raise VerifyError(f"{path} changed while it was being read: refusing to load this bundle")
    return digest


def _chw(manifest: dict, model: torch.nn.Module) -> tuple[int, int, int]:
    shape = (manifest.get("input") or {}).get("shape")
    if shape and len(shape) == 3:
        return tuple(int(v) for v in shape)
    c = getattr(model, "rsp_config", {}).get("in_channels", 3)
    return (c, 8, 8) if c == 1 else (c, 32, 32)


def _runtimes(bundle: Path, manifest: dict, model, chw, opts: VerifyOptions, log) -> dict[str, Runtime]:
    registry = registered_backends()
    asked = list(opts.backends or [])
    for b in asked:
        if b != "torch" and b not in registry:
            raise VerifyError(f"unknown backend {b!r}; choose from {', '.join(('torch', *registry))}")
    for backend in registry.values():
        problem = backend.check_verify_options(opts, asked)
        if problem:
            raise VerifyError(problem)
    requested = [name for name, backend in registry.items() if backend.requested(opts)]
    if opts.backends is not None:
        wanted = list(opts.backends)
    else:
        formats = registered_formats()
        wanted = [name for name, backend in registry.items()
                  if backend.by_default and formats[backend.format].present(bundle)] or ([] if requested else ["torch"])
    # asked for by another option (--rpc): first, the device's numbers are the ones scored and gated
    wanted = [b for b in requested if b not in wanted] + wanted
    asked = set(asked) | set(requested)
    out = {}
    for b in wanted:
        try:
            out[b] = (torch_runtime(model, chw, opts.device) if b == "torch"
                      else registry[b].runtime(bundle, manifest, chw, opts, log))
        except RuntimeUnavailable as exc:
            if b in asked:  # asked for explicitly: bad input
                raise
            log(f"{b}: skipped ({exc})")
    if not out:  # no artifact of the bundle runs here: score the twin rather than nothing
        log("no artifact of the bundle runs here: scoring the PyTorch twin")
        out["torch"] = torch_runtime(model, chw, opts.device)
    return out


def _eval_data(manifest: dict, opts: VerifyOptions):
    from .data import load_run_dataset, to_float

    source = SourceRun.of(manifest)
    name = opts.dataset or source.dataset_name
    splits = load_run_dataset(source.dataset, opts.data_dir, name=name)  # --data-dir, RSP_DATA_DIR or where the run was trained
    n_examples = resolve_evaluation(opts)["n_examples"]
    n = min(n_examples, len(splits.test_y)) if n_examples > 0 else len(splits.test_y)
    # the first N test images in file order: anyone can reproduce the subset
    return to_float(splits.test_x[:n]), splits.test_y[:n], name, splits.info.num_classes


def _parity(twin: Runtime, runtimes: dict[str, Runtime], x: torch.Tensor) -> dict:
    ref = twin.predict(x)
    out = {}
    for name, rt in runtimes.items():
        if name == "torch":
            continue
        logits = rt.predict(x)
        out[name] = {"max_abs_err": (logits - ref).abs().max().item(),
                     "prediction_agreement": (logits.argmax(1) == ref.argmax(1)).float().mean().item(), "n": len(x)}
    return out


@dataclass(frozen=True)
class Preset:
    """A named evaluation: which attacks, with which budgets, on how many images."""

    help: str
    attacks: tuple[str, ...]
    steps: int = 50  # PGD
    restarts: int = 10  # PGD
    step_rule: str = "default"  # PGD step: 'default' (attacks.default_step_size) or 'reference' (2.5 eps / steps)
    n_examples: int = 1000  # 0: every test image
    cumulative: bool = True  # each attack runs on the examples the earlier ones left robust (AutoAttack's order)
    tunable: bool = True  # --steps, --restarts, --step-size may change the PGD part


PRESETS = {
    "default": Preset("PGD-50 x 10 (step max(eps/4, 2.5 eps/50)), then APGD-CE (100 steps) and APGD-T (9 targets x "
                      "100 steps) on the examples PGD left robust; first 1000 test images",
                      ("pgd", "apgd-ce", "apgd-t")),
    "reference": Preset("the reference's evaluation (run_foolbox_eval.py): PGD-50 x 10 restarts, random start, step "
                        "2.5 eps / 50, every test image", ("pgd",), step_rule="reference", n_examples=0, tunable=False),
    "autoattack": Preset("standard AutoAttack (Croce & Hein 2020): APGD-CE (100 steps, 1 run), APGD-T (9 targets x 100 "
                         "steps), FAB-T (9 targets x 100 steps), Square (5000 queries), each on the examples the "
                         "earlier ones left robust; first 1000 test images", ("apgd-ce", "apgd-t", "fab-t", "square"),
                         tunable=False),
}
# the budgets of the attacks other than PGD, as AutoAttack's standard version sets them (every preset uses them)
AUTOATTACK_BUDGETS = {"apgd_steps": 100, "apgd_restarts": 1, "n_target_classes": 9, "fab_steps": 100,
                      "fab_restarts": 1, "square_queries": 5000}


def attack_aliases() -> dict[str, list[str]]:
    """--attacks names that stand for several attacks: autoattack (the autoattack preset's) and all (every registered
    attack that is part of it, in registry order)."""
    return {"autoattack": list(PRESETS["autoattack"].attacks),
            "all": [a.name for a in ATTACK_REGISTRY.values() if a.in_all]}


def resolve_evaluation(opts: VerifyOptions) -> dict:
    """The evaluation opts ask for: preset name, attacks, PGD steps/restarts/step rule, images, mode.
    Raises VerifyError on a conflict (a fixed preset with PGD overrides, --preset with --attacks)."""
    if opts.preset is not None and opts.preset not in PRESETS:
        raise VerifyError(f"unknown preset {opts.preset!r}; choose from {', '.join(PRESETS)}")
    if opts.preset is not None and opts.attacks:
        raise VerifyError("--preset and --attacks both given: a preset names its attacks; pass one of them")
    if opts.preset is None and opts.attacks:
        name, preset = "custom", Preset("the attacks named, each on every image", tuple(expand_attacks(opts.attacks)),
                                        cumulative=False)
    else:
        name = opts.preset or "default"
        preset = PRESETS[name]
    given = [f for f, v in (("--steps", opts.steps), ("--restarts", opts.restarts), ("--step-size", opts.step_size))
             if v is not None]
    if given and not preset.tunable:
        raise VerifyError(f"--preset {name} fixes its attacks' budgets; drop {', '.join(given)}")
    steps = preset.steps if opts.steps is None else opts.steps
    restarts = preset.restarts if opts.restarts is None else opts.restarts
    n_examples = preset.n_examples if opts.n_examples is None else opts.n_examples
    if n_examples < 0 or steps < 1 or restarts < 1:
        raise VerifyError("--n-examples must be >= 0, --steps and --restarts >= 1")
    if opts.step_size is not None and not 0 < opts.step_size <= 1:
        raise VerifyError(f"--step-size must be in (0, 1], got {opts.step_size}")
    known = attack_names()
    bad = [a for a in preset.attacks if a not in known]
    if bad or not preset.attacks:
        raise VerifyError(f"unknown attack(s) {', '.join(bad) or '(none)'}; choose from {', '.join(known)}, "
                          f"or {', '.join(attack_aliases())}")
    return {"preset": name, "help": preset.help, "attacks": list(preset.attacks), "steps": steps,
            "restarts": restarts, "step_size": opts.step_size, "step_rule": preset.step_rule,
            "n_examples": n_examples, "cumulative": preset.cumulative}


def pgd_step_size(plan: dict, eps: float) -> float:
    if plan["step_size"] is not None:
        return plan["step_size"]
    if plan["step_rule"] == "reference":
        return 2.5 * eps / plan["steps"]
    return default_step_size(eps, plan["steps"])


def expand_attacks(names: list[str]) -> list[str]:
    aliases = attack_aliases()
    out: list[str] = []
    for n in names:
        for a in aliases.get(n, [n]):
            if a not in out:
                out.append(a)
    return out


def _robustness(model, runtimes: dict[str, Runtime], judge, x, y, eps, opts: VerifyOptions, plan: dict, log) -> dict:
    """attacks.ensemble_eval on the twin, judged by the primary runtime (Square queries it); the adversarial
    examples of every attack are then judged by each other runtime too. Worst case per example."""
    from .attacks import ensemble_eval
    from .methods.anp import latent_vulnerability

    dev = torch.device(opts.device)
    x, y = x.to(dev), y.to(dev)
    primary_name = next(iter(runtimes))
    try:
        ens = ensemble_eval(model, x, y, attacks=plan["attacks"], eps=eps, steps=plan["steps"],
                            restarts=plan["restarts"], step_size=pgd_step_size(plan, eps), seed=opts.seed,
                            predict=judge, cumulative=plan["cumulative"], **AUTOATTACK_BUDGETS)
    except ValueError as exc:
        raise VerifyError(str(exc)) from None
    backends = {primary_name: {"clean_acc": ens["clean_acc"], "robust_acc": ens["robust_acc"],
                               "per_attack": {a: v["robust_acc"] for a, v in ens["per_attack"].items()}}}
    for name, rt in runtimes.items():
        if name == primary_name:
            continue
        clean = rt.predict(x.cpu()).argmax(1) == y.cpu()
        worst, per = clean.clone(), {}
        for a in ens["attacks"]:
            ok = clean & (rt.predict(ens["x_adv_by_attack"][a].cpu()).argmax(1) == y.cpu())
            per[a], worst = ok.float().mean().item(), worst & ok
        backends[name] = {"clean_acc": clean.float().mean().item(), "robust_acc": worst.float().mean().item(),
                          "per_attack": per, "note": f"adversarial examples crafted for {primary_name}"
                          + (" (Square queried it)" if "square" in ens["attacks"] else "")}
    for name, b in backends.items():
        log(f"{name}: clean {b['clean_acc']:.4f}, robust {b['robust_acc']:.4f} ("
            + ", ".join(f"{a} {v:.4f}" for a, v in b["per_attack"].items()) + ")")
    attacks = {a: {"description": json.dumps(v["config"], default=str) if v.get("config") else a,
                   "config": v.get("config") or {}, "time_s": round(v["seconds"], 2),
                   "model_robust_acc": v["model_robust_acc"], "seed": v["seed"]}
               for a, v in ens["per_attack"].items()}
    latent = latent_vulnerability(model, x, ens["x_adv"])
    log(f"latent vulnerability (ANP-VS, mean |z(x) - z(x_adv)| over {len(latent['layers'])} {latent['sites']} sites, "
        f"at the headline's adversarial examples): {latent['vulnerability']:.4g}")
    return {"backends": backends, "attacks": attacks, "ensemble": ens, "latent_vulnerability": latent}


def _dense_runtimes(dense, chw, tmp: Path, runtimes: dict[str, Runtime], opts: VerifyOptions, log) -> dict[str, Runtime]:
    """The dense original on every dense runtime this machine has (DENSE_RUNTIMES): what a user would run
    instead of the artifact: eager PyTorch (on --device) always, and each format's (onnxruntime's CPU
    provider; a TensorRT engine where the bundle's TensorRT runtime is here)."""
    out: dict[str, Runtime] = {}
    for name, fmt in _dense_runtime_sources():
        if fmt is None:
            out[name] = torch_runtime(dense, chw, opts.device, name)
            continue
        try:
            rt = fmt.dense_runtime(dense, chw, tmp, runtimes, opts)
        except Exception as exc:
            log(f"latency: no dense {fmt.dense_runtime_name} ({str(exc).splitlines()[0][:120]})")
            continue
        if rt is not None:
            out[fmt.dense_runtime_name] = rt
    return out


def _latency(runtimes: dict[str, Runtime], manifest: dict, chw, opts: VerifyOptions, log) -> dict:
    """Each runtime against the dense original (the unshrunk architecture, dense weights) on the same runtime,
    and, where the artifact runs on this machine, against the dense original on every dense runtime here
    (``_dense_runtimes``), all timed in the same interleaved rounds: ``fastest_dense`` is the quickest of
    them, the comparison a user should trust."""
    ref_spec = manifest.get("dense_reference") or manifest["model"]
    dense = build_model({"model": ref_spec}).eval()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        local = any(not _remote(name) for name in runtimes)
        others = _dense_runtimes(dense, chw, Path(tmp), runtimes, opts, log) if local else {}
        for name, rt in runtimes.items():
            dense_rt = _dense_twin(name, dense, chw, Path(tmp), rt, manifest, opts, log)
            for b in opts.latency_batches:
                if rt.batches is not None and b not in rt.batches:
                    continue
                cands = {"artifact": rt.make_timer(b)}
                if dense_rt is not None:
                    cands["dense"] = dense_rt.make_timer(b)
                same = _same_dense_runtime(name) if dense_rt is not None else None
                if not _remote(name):
                    for k, drt in others.items():
                        if k != same and (drt.batches is None or b in drt.batches):
                            cands[f"dense:{k}"] = drt.make_timer(b)
                res = compare(cands, b, warmup=5, runs=opts.latency_runs, max_seconds=opts.latency_max_seconds, settle=2)
                entry = {**res["artifact"], "runtime": rt.info.get("runtime")}
                if "dense" in res:
                    entry["dense_original"] = res["dense"]
                    if "build" in dense_rt.info:  # how a TVM dense original was compiled (tuned like the bundle?)
                        entry["dense_original"]["build"] = dense_rt.info["build"]
                    entry["speedup_vs_dense"] = res["dense"]["p50_ms"] / res["artifact"]["p50_ms"]
                dense_times = {k.split(":", 1)[1]: v for k, v in res.items() if k.startswith("dense:")}
                if same and dense_times:  # the same runtime's dense original is that dense runtime
                    dense_times[same] = res["dense"]
                if dense_times:
                    entry["dense_runtimes"] = dense_times
                pool = dict(dense_times)
                if "dense" in res and not same:
                    pool[f"{name} (same runtime)"] = res["dense"]
                if pool:
                    best = min(pool, key=lambda k: pool[k]["p50_ms"])
                    entry["fastest_dense"] = {"runtime": best, "p50_ms": pool[best]["p50_ms"],
                                              "speedup": pool[best]["p50_ms"] / res["artifact"]["p50_ms"],
                                              "candidates": sorted(pool),
                                              "note": ("the dense original timed on this machine's dense runtimes "
                                                       "in the same interleaved rounds" if dense_times else
                                                       "on the device only the same runtime's dense original runs")}
                out[f"{name}/batch{b}"] = entry
                fd = entry.get("fastest_dense")
                log(f"latency {name} batch {b}: p50 {entry['p50_ms']:.3f} ms, p99 {entry['p99_ms']:.3f} ms"
                    + (f", dense original p50 {entry['dense_original']['p50_ms']:.3f} ms "
                       f"(speedup {entry['speedup_vs_dense']:.2f}x)" if "dense_original" in entry else "")
                    + (f"; fastest dense: {fd['runtime']} {fd['p50_ms']:.3f} ms ({fd['speedup']:.2f}x)" if fd else ""))
            close_runtimes([dense_rt])
        close_runtimes(others.values())
    return out


def _dense_twin(name, dense, chw, tmp: Path, rt: Runtime, manifest: dict, opts: VerifyOptions, log) -> Runtime | None:
    try:
        if name == "torch":
            return torch_runtime(dense, chw, opts.device, "torch-dense")
        return registered_backends()[name].dense_twin(dense, chw, tmp, rt, manifest, opts, log)
    except Exception as exc:  # the ratio is a bonus: never fail verify because the dense twin cannot build
        log(f"latency: no dense original on {name} ({str(exc).splitlines()[0][:120]})")
    return None


def _system_info(opts: VerifyOptions, runtimes: dict[str, Runtime]) -> dict:
    import subprocess

    info = {"machine": platform.machine(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "device": opts.device}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass  # Jetsons before JetPack 6 have no nvidia-smi; the L4T release below names the driver
    remote = [name for name in runtimes if _remote(name)]
    if remote:  # where the scored latency was measured
        info["remote"] = {k: v for k, v in runtimes[remote[0]].info.items() if k != "file"}
    nv = Path("/etc/nv_tegra_release")
    if nv.is_file():  # a Jetson: record the L4T release and the power mode
        info["l4t"] = nv.read_text().splitlines()[0][:120]
        try:
            info["power_mode"] = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["power_mode"] = "unknown (nvpmodel not found)"
    return info


def _plain(obj):
    """JSON-ready: tensors become lists or numbers."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    return obj


def evaluate_gates(summary: dict, gates: dict) -> list[dict]:
    """Each gate that is set -> {gate, limit, value, passed}."""
    checks = []
    lat = summary.get("latency_p50_ms")
    values = {"min_clean_acc": summary.get("clean_acc"), "min_robust_acc": summary.get("robust_acc"),
              "max_latency_ms": lat, "max_parity_error": summary.get("max_parity_error"),
              "min_speedup": summary.get("speedup_vs_fastest_dense")}
    for gate in GATES:
        limit = gates.get(gate)
        if limit is None:
            continue
        value = values[gate]
        ok = value is not None and (value >= limit if gate.startswith("min_") else value <= limit)
        checks.append({"gate": gate, "limit": limit, "value": value, "passed": bool(ok)})
    return checks


def run(bundle: str | Path, opts: VerifyOptions, log=print) -> dict:
    bundle, output = Path(bundle), Path(opts.output)
    manifest = read_manifest(bundle)
    require_complete(bundle, manifest)
    # before any file of the bundle is loaded: the TVM library is native code, run as soon as it is loaded
    manifest_sha256 = bundle_origin(bundle, manifest, opts.expect_sha256)
    bad = check_files(bundle, manifest)
    if bad:
        raise VerifyError(f"{bundle}: {bad[0]}")
    for g in opts.gates:
        if g not in GATES:
            raise VerifyError(f"unknown gate {g!r}")
    resolve_evaluation(opts)
    gates = {**(manifest.get("gates") or {}), **{k: v for k, v in opts.gates.items() if v is not None}}
    if opts.threads:
        torch.set_num_threads(opts.threads)
    # the one writer of output from here on: a second verify into it fails now, not after its attacks
    _held = lock_folder(output)
    t0 = time.perf_counter()
    model = load_model(bundle, device=opts.device)
    chw = _chw(manifest, model)
    runtimes = _runtimes(bundle, manifest, model, chw, opts, log)
    try:
        return _verify(bundle, output, manifest, model, chw, runtimes, gates, opts, log, t0, manifest_sha256)
    finally:
        close_runtimes(runtimes.values())  # an RPC device is free for the next client as soon as we are done


def _sanity_checks(model, x, y, eps, opts: VerifyOptions, judge, ensemble: dict, progress: StepProgress, log) -> dict:
    """sanity.run_sanity_checks one check at a time, so that progress names the one running; the result is
    the same as one call (the checks are independent and run in the same order)."""
    from .sanity import CHECKS, run_sanity_checks

    parts = []
    for name in CHECKS:
        progress.step(f"sanity check {name}")
        part = run_sanity_checks(model, x, y, eps, seed=opts.seed, predict=judge, ensemble=ensemble, checks=[name])
        for c in part["checks"]:
            log(f"sanity {'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c.get('detail', '')}")
        parts.append(part)
        progress.advance()
    failed = [name for part in parts for name in part["failed"]]
    return {"passed": not failed, "reliable": not failed, "failed": failed,
            "checks": [c for part in parts for c in part["checks"]], "n": parts[0]["n"],
            "seconds": sum(part["seconds"] for part in parts)}


def _verify(bundle: Path, output: Path, manifest: dict, model, chw, runtimes: dict[str, Runtime], gates: dict,
            opts: VerifyOptions, log, t0: float, manifest_sha256: str) -> dict:
    x, y, dataset, num_classes = _eval_data(manifest, opts)
    eps = opts.eps if opts.eps is not None else SourceRun.of(manifest).attack.eps
    log(f"verify {bundle} ({manifest['stage']}, {manifest['model']['name']}) on {', '.join(runtimes)}: "
        f"{len(y)} {dataset} test images, eps {eps:.6g}")
    log(f"bundle manifest sha256 {manifest_sha256}"
        + (" (as expected)" if opts.expect_sha256 else " (pin it with rsp verify --expect-sha256)"))
    from .sanity import CHECKS, check_eps_monotone

    # parity, the attacks, each sanity check (or the eps sweep alone), latency
    n_steps = 3 + (len(CHECKS) if opts.sanity else 1)
    with StepProgress(f"verify {bundle.name}", total=n_steps) as progress:
        progress.step("parity")
        twin = torch_runtime(model, chw, opts.device)
        parity = _parity(twin, runtimes, x)
        progress.advance()
        # the primary runtime judges every attack (and Square queries it); the twin only when no artifact runs here
        primary_name, primary = next(iter(runtimes.items()))
        judge = None if primary_name == "torch" else (lambda xb: primary.predict(xb).to(opts.device))
        plan = resolve_evaluation(opts)
        progress.step(f"attacks ({plan['preset']}: {', '.join(plan['attacks'])}, {len(y)} images)")
        robust = _robustness(model, runtimes, judge, x, y, eps, opts, plan, log)
        progress.advance()
        xd, yd = x.to(opts.device), y.to(opts.device)
        sanity = {"checks": [], "unreliable": None, "note": "not run"}
        if opts.sanity:
            sanity = _sanity_checks(model, xd, yd, eps, opts, judge, robust["ensemble"], progress, log)
            sanity["unreliable"] = not sanity["reliable"]
        else:
            progress.step("robust accuracy vs eps")
        # the robust-vs-eps plot reuses the monotonicity check's sweep (run alone under --no-sanity)
        mono = next((c for c in sanity["checks"] if c["name"] == "eps_monotone"), None) \
            or check_eps_monotone(model, xd[:200], yd[:200], eps, seed=opts.seed, predict=judge)
        sweep = list(zip(mono["figures"]["eps"], mono["figures"]["robust_acc"]))
        if not opts.sanity:
            progress.advance()
        progress.step("latency")
        latency = _latency(runtimes, manifest, chw, opts, log)
        progress.advance()

    primary = next(iter(runtimes))
    prim = robust["backends"][primary]
    lat_b1 = latency.get(f"{primary}/batch1", {})
    fastest = lat_b1.get("fastest_dense") or {}
    summary = {"clean_acc": prim["clean_acc"], "robust_acc": prim["robust_acc"], "backend": primary,
               "max_parity_error": max((p["max_abs_err"] for p in parity.values()), default=0.0),
               "latency_p50_ms": lat_b1.get("p50_ms"), "speedup_vs_fastest_dense": fastest.get("speedup"),
               "fastest_dense_runtime": fastest.get("runtime")}
    gate_results = evaluate_gates(summary, gates)
    passed = all(g["passed"] for g in gate_results) and not sanity.get("unreliable")
    result = {
        "rsp_version": __version__, "bundle": str(bundle), "bundle_stage": manifest["stage"],
        "bundle_manifest_sha256": manifest_sha256, "bundle_manifest_sha256_expected": opts.expect_sha256 is not None,
        "bundle_manifest_files": manifest.get("files", {}),
        "model": manifest["model"], "target": (manifest.get("target") or {}).get("name"),
        "clean_acc": summary["clean_acc"], "robust_acc": summary["robust_acc"],
        "threat_model": "Linf", "eps": eps, "n_examples": len(y), "dataset": dataset, "seed": opts.seed,
        "evaluation_images": "the first n_examples test images in file order",
        "preset": plan["preset"], "evaluation": {"preset": plan["preset"], "description": plan["help"],
                                                 "mode": robust["ensemble"]["mode"],
                                                 "headline": "worst case per example over " + ", ".join(plan["attacks"])},
        "attacks": robust["attacks"], "backends": robust["backends"], "eps_sweep": sweep,
        "latent_vulnerability": _plain(robust["latent_vulnerability"]),
        "unreliable": bool(sanity.get("unreliable")), "sanity": _plain(sanity),
        "parity": parity, "latency": latency, "gates": gate_results, "passed": passed,
        "speed": {"backend": primary, "batch": 1, "p50_ms": summary["latency_p50_ms"],
                  "fastest_dense_runtime": summary["fastest_dense_runtime"],
                  "fastest_dense_p50_ms": fastest.get("p50_ms"), "speedup_vs_fastest_dense": summary["speedup_vs_fastest_dense"],
                  # the bundle's other artifacts at batch 1, same rounds: the headline is the first backend only
                  "other_backends": {name: latency[f"{name}/batch1"]["fastest_dense"]["speedup"] for name in runtimes
                                     if name != primary and (latency.get(f"{name}/batch1") or {}).get("fastest_dense")},
                  "note": "the headline speed-up: the artifact against the dense original on the fastest dense runtime "
                          "timed here (below 1x: the artifact is slower than what a user would otherwise run)"},
        "selection_note": "the model was selected in rsp train on a validation split cut from the training data; "
                          "the test images are used here only",
        "runtimes": {name: rt.info for name, rt in runtimes.items()},
        "system": _system_info(opts, runtimes), "time_s": round(time.perf_counter() - t0, 2),
    }
    output.mkdir(parents=True, exist_ok=True)  # locked by run()
    write_json(output / "verify.json", result)
    _report(output, result, num_classes, log)
    return result


def _param(key: str, value) -> str:
    return f"{value:.6g} ({value * 255:.3g}/255)" if key in ("eps", "step_size") and isinstance(value, float) else str(value)


def _report(output: Path, r: dict, num_classes: int, log) -> None:
    from .report_plots import latency_bars, robust_vs_eps

    plots = []
    if robust_vs_eps(output / "robust_vs_eps.png", {f"{next(iter(r['backends']))} (PGD-20x2, first 200 images)": r["eps_sweep"]}, r["eps"], 1.0 / num_classes):
        plots.append("robust_vs_eps.png")
    rows = []
    for k, v in r["latency"].items():
        rows.append((k, v["p50_ms"], v["p99_ms"]))
        if "dense_original" in v:
            rows.append((k + " dense original", v["dense_original"]["p50_ms"], v["dense_original"]["p99_ms"]))
    if latency_bars(output / "latency.png", rows):
        plots.append("latency.png")
    lines = ["# rsp verify report", "",
             f"Bundle `{r['bundle']}` ({r['bundle_stage']}, {r['model']['name']}, target {r['target']}); "
             f"{r['n_examples']} {r['dataset']} test images ({r['evaluation_images']}); Linf eps = {r['eps']:.6g} "
             f"({r['eps'] * 255:.3g}/255); seed {r['seed']}.", "",
             f"Bundle manifest sha256 `{r['bundle_manifest_sha256']}`"
             + (" (as expected: --expect-sha256)." if r["bundle_manifest_sha256_expected"] else
                " (not pinned: pass it to --expect-sha256 to refuse any other bundle)."), "",
             f"**clean {r['clean_acc']:.4f}, robust {r['robust_acc']:.4f}** on `{next(iter(r['backends']))}`"
             + (" — **UNRELIABLE** (a sanity check failed)" if r["unreliable"] else ""), "",
             "| backend | clean | robust (worst case) | " + " | ".join(r["attacks"]) + " |",
             "|---|---|---|" + "---|" * len(r["attacks"])]
    for name, b in r["backends"].items():
        lines.append(f"| {name} | {b['clean_acc']:.4f} | {b['robust_acc']:.4f} | "
                     + " | ".join(f"{b['per_attack'][a]:.4f}" for a in r["attacks"]) + " |")
    ev = r.get("evaluation") or {}
    lines += ["", f"Evaluation preset **{ev.get('preset')}** ({ev.get('description')}); robust = {ev.get('headline')}"
              + ("; each attack ran on the examples the earlier ones left robust, so its column is a running minimum"
                 if ev.get("mode") == "cumulative" else "; each attack ran on every image") + ".", "",
              "| attack | parameters |", "|---|---|"]
    lines += [f"| {a} | " + ", ".join(f"{k} {_param(k, val)}" for k, val in v.get("config", {}).items()) + " |"
              for a, v in r["attacks"].items()]
    lv = r.get("latent_vulnerability") or {}
    if lv.get("layers"):
        lines += ["## Latent vulnerability (ANP-VS)", "",
                  f"**{lv['vulnerability']:.4g}**: mean over {len(lv['layers'])} feature sites ({lv.get('sites')}) of "
                  "mean |z(x) - z(x_adv)| (Madaan et al. 2020), the twin in eval mode, x_adv the headline's adversarial "
                  "examples (per example the lowest-margin attack's point; a misclassified clean image is not attacked "
                  "and adds 0). Lower: features that move less "
                  "under attack.", "", "| site | vulnerability |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in lv["layers"].items()]
    lines.append("")
    if r["parity"]:
        lines += ["## Parity (clean logits vs the PyTorch twin)", "", "| artifact | max abs diff | prediction agreement |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v['max_abs_err']:.3g} | {v['prediction_agreement']:.4f} |" for k, v in r["parity"].items()]
        lines.append("")
    lines += ["## Sanity checks", ""]
    for c in r["sanity"].get("checks", []):
        lines.append(f"- {'PASS' if c.get('passed') else 'FAIL'} `{c.get('name')}`: {c.get('detail', '')}")
    if not r["sanity"].get("checks"):
        lines.append(f"- {r['sanity'].get('note', 'none')}")
    sp = r.get("speed") or {}
    if sp.get("speedup_vs_fastest_dense") is not None:
        dense_names = _dense_runtime_names()
        lines += ["", "## Speed against what a user would otherwise run", "",
                  f"**{sp['speedup_vs_fastest_dense']:.2f}x** the fastest dense runtime on this machine at batch 1: "
                  f"`{sp['backend']}` {sp['p50_ms']:.3f} ms vs the dense original on **{sp['fastest_dense_runtime']}** "
                  f"{sp['fastest_dense_p50_ms']:.3f} ms (p50, same interleaved rounds)"
                  + (" — the artifact is **slower**" if sp["speedup_vs_fastest_dense"] < 1 else "") + ".", "",
                  "| runtime / batch | artifact p50 ms | " + " | ".join(f"dense {k} p50 ms" for k in dense_names) +
                  " | fastest dense | speedup vs fastest |", "|---|---|" + "---|" * len(dense_names) + "---|---|"]
        for k, v in r["latency"].items():
            fd = v.get("fastest_dense")
            if not fd:
                continue
            dr = v.get("dense_runtimes") or {}
            lines.append(f"| {k} | {v['p50_ms']:.3f} | " + " | ".join(f"{dr[n]['p50_ms']:.3f}" if n in dr else "-"
                                                                     for n in dense_names)
                         + f" | {fd['runtime']} | {fd['speedup']:.2f}x |")
    lines += ["", "## Latency", "", "| runtime / batch | p50 ms | p90 ms | p99 ms | images/s | dense original p50 ms | speedup |",
              "|---|---|---|---|---|---|---|"]
    for k, v in r["latency"].items():
        d = v.get("dense_original")
        lines.append(f"| {k} | {v['p50_ms']:.3f} | {v['p90_ms']:.3f} | {v['p99_ms']:.3f} | {v['throughput_ips']:.1f} | "
                     + (f"{d['p50_ms']:.3f} | {v['speedup_vs_dense']:.2f}x |" if d else "| |"))
    lines += ["", "## Gates", ""]
    lines += [f"- {'PASS' if g['passed'] else 'FAIL'} {g['gate']}: value {g['value']}, limit {g['limit']}" for g in r["gates"]] \
        or ["- none set"]
    lines += ["", "## System", "", "```", json.dumps(r["system"], indent=1), "```", ""]
    lines += [f"![robust accuracy vs eps]({p})" for p in plots]
    atomic_write_text(output / "report.md", "\n".join(lines) + "\n")
