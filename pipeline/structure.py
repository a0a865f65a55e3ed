"""rsp structure: turn learned sparsity into structure hardware can use, and report it.

Steps, each measured (analysis + clean/robust accuracy) before and after:
  1. regroup   channel permutations that gather non-zeros (dense filters first), applied to every
               producer, BatchNorm and consumer of a channel group: the function does not change
  2. prune     zero the vectors (GEMM columns: one (in, kh, kw) across all outputs) with <= k non-zeros
  3. shrink    physically remove channels nobody reads (all consumer slices zero) and zero filters whose
               BatchNorm+ReLU output is exactly 0; rebuild the registry model with the new widths
  4. nm        optional N:M projection (2:4 for sparse tensor cores) over the GEMM view
The output folder has the train-folder contract: model.safetensors (the shrunk plain model), manifest.json
(stage "structure", model kwargs with the new widths), config.yaml, plus analysis.json, report.md, PNGs.
"""

from __future__ import annotations

import json
import time
import zlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import __version__
from .artifacts import (MODEL_FILE, ArtifactError, SourceRun, StageOutput, atomic_write_bytes, atomic_write_text,
                        build_model, check_new_output, load_tensors, read_source, save_tensors)
from .channels import ChannelGroup, channel_groups, select_channels
from .progress import StepProgress
from .sparse import layer_report, sparsifiable_layers

DEFAULT_BLOCKS = ((1, 4), (4, 4), (16, 1), (32, 1))


class StructureError(ArtifactError):
    """Bad options for the structure stage: one line, exit code 2."""


def parse_block(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.lower().split("x"))
        if r < 1 or c < 1:
            raise ValueError
        return r, c
    except ValueError:
        raise StructureError(f"block shape must look like 4x4 (rows x cols of the GEMM view), got {text!r}") from None


def parse_nm(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        n, m = (int(v) for v in text.split(":"))
        if not 0 < n < m:
            raise ValueError
        return n, m
    except ValueError:
        raise StructureError(f"--nm must look like 2:4 (keep N of every M), got {text!r}") from None


# --- analysis -----------------------------------------------------------------------------------


def gemm_view(w: torch.Tensor) -> torch.Tensor:
    """out x (in * kh * kw): the matrix a convolution multiplies (im2col)."""
    return w.reshape(w.shape[0], -1)


def vector_view(w: torch.Tensor) -> torch.Tensor:
    """(in * kh * kw) x out: one row per vector of the study. Its TensorFlow kernels are HWIO, so the
    innermost dimension is the output channel and a vector is a column of the GEMM view. A zero vector is
    an im2col row that no output reads: skipping it shortens the GEMM's reduction dimension."""
    return gemm_view(w).t()


def zero_block_share(w: torch.Tensor, block: tuple[int, int]) -> float | None:
    g = gemm_view(w)
    r, c = block
    if g.shape[0] % r or g.shape[1] % c:
        return None
    nz = (g != 0).reshape(g.shape[0] // r, r, g.shape[1] // c, c).any(3).any(1)
    return 1.0 - nz.float().mean().item()


def nm_view(w: torch.Tensor) -> torch.Tensor:
    """out x (kh * kw * in): the GEMM view with input channels innermost (NHWC implicit GEMM). N:M groups
    are M consecutive *input channels* at one (out, kh, kw), the layout sparse tensor cores (cuSPARSELt,
    TensorRT's 2:4) require."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w


def _from_nm_view(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) == 4:
        o, i, kh, kw = shape
        return g.reshape(o, kh, kw, i).permute(0, 3, 1, 2).contiguous()
    return g.reshape(shape)


def nm_compliance(w: torch.Tensor, n: int = 2, m: int = 4) -> float | None:
    in_ch = w.shape[1]
    if in_ch % m:
        return None
    counts = (nm_view(w) != 0).reshape(w.shape[0], -1, m).sum(2)
    return (counts <= n).float().mean().item()


def analyse_layer(w: torch.Tensor, blocks=DEFAULT_BLOCKS) -> dict:
    nz = w != 0
    w4 = nz if nz.dim() == 4 else nz[:, :, None, None]
    vec = gemm_view(nz).any(0)  # the study's vectors: one per (in, kh, kw) across all outputs (see vector_view)
    kernels = w4.any(3).any(2)  # (out, in)
    return {
        "shape": list(w.shape),
        "numel": w.numel(),
        "nonzero": int(nz.sum()),
        "sparsity": 1.0 - nz.float().mean().item(),
        "zero_vectors": 1.0 - vec.float().mean().item(),
        "zero_kernels": 1.0 - kernels.float().mean().item(),
        "zero_input_channels": 1.0 - kernels.any(0).float().mean().item(),
        "zero_filters": 1.0 - kernels.any(1).float().mean().item(),
        "nm_2_4_compliance": nm_compliance(w),
        "zero_blocks": {f"{r}x{c}": zero_block_share(w, (r, c)) for r, c in blocks},
    }


def analyse(state: dict[str, torch.Tensor], layer_names: list[str], blocks=DEFAULT_BLOCKS) -> dict:
    layers = {n: analyse_layer(state[f"{n}.weight"], blocks) for n in layer_names}
    total = sum(v["numel"] for v in layers.values())
    overall = {"numel": total, "nonzero": sum(v["nonzero"] for v in layers.values())}
    overall["sparsity"] = 1.0 - overall["nonzero"] / total
    for key in ("zero_vectors", "zero_kernels", "zero_input_channels", "zero_filters"):
        # weighted by the number of such structures is what Table 1 of the study reports for vectors
        if key == "zero_vectors":
            counts = {n: state[f"{n}.weight"].numel() // state[f"{n}.weight"].shape[0] for n in layer_names}
        else:
            counts = {n: 1 for n in layer_names}
        overall[key] = sum(layers[n][key] * counts[n] for n in layer_names) / sum(counts.values())
    return {"overall": overall, "layers": layers}


# --- transformations ----------------------------------------------------------------------------


def regroup_permutations(state: dict[str, torch.Tensor], groups: list[ChannelGroup]) -> dict[int, torch.Tensor]:
    """Per group: channels ordered by non-zero count of their filters (dense first), ties by input pattern."""
    perms = {}
    for gi, g in enumerate(groups):
        counts = sum((gemm_view(state[f"{p}.weight"]) != 0).sum(1) for p in g.producers)
        perms[gi] = torch.sort(counts, descending=True, stable=True).indices
    return perms


def prune_vectors(state: dict[str, torch.Tensor], layer_names: list[str], k: int,
                  block: tuple[int, int] | None = None) -> tuple[dict, int]:
    """Zero every vector (see vector_view) -- or, with `block`, every R x C block of the GEMM view (ragged
    edge blocks included) -- holding at most k non-zeros. Returns the new state and the weights removed."""
    if k == 0:
        return state, 0
    state = dict(state)
    removed = 0
    for n in layer_names:
        w = state[f"{n}.weight"]
        g = gemm_view(w)
        if block is None:
            drop = ((g != 0).sum(0) <= k)[None, :].expand_as(g)
        else:
            r, c = block
            rows, cols = -(-g.shape[0] // r), -(-g.shape[1] // c)
            padded = torch.zeros(rows * r, cols * c, dtype=torch.bool)
            padded[: g.shape[0], : g.shape[1]] = g != 0
            counts = padded.reshape(rows, r, cols, c).sum((1, 3))
            drop = (counts <= k).repeat_interleave(r, 0).repeat_interleave(c, 1)[: g.shape[0], : g.shape[1]]
        removed += int((g[drop] != 0).sum())
        state[f"{n}.weight"] = torch.where(drop, torch.zeros_like(g), g).reshape(w.shape)
    return state, removed


def project_nm(state: dict[str, torch.Tensor], layer_names: list[str], n: int, m: int) -> tuple[dict, list[str]]:
    """Keep the n largest of every m consecutive input channels at each (out, kh, kw) (see nm_view); layers
    whose input width m does not divide (e.g. the RGB stem) are left as they are and listed."""
    state = dict(state)
    skipped = []
    for name in layer_names:
        w = state[f"{name}.weight"]
        if w.shape[1] % m:
            skipped.append(name)
            continue
        g = nm_view(w)
        groups = g.reshape(g.shape[0], -1, m)
        top = groups.abs().topk(n, dim=2).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, top, True)
        state[f"{name}.weight"] = _from_nm_view((groups * keep).reshape(g.shape), w.shape)
    return state, skipped


def removable_channels(state: dict[str, torch.Tensor], g: ChannelGroup) -> torch.Tensor:
    """Channels whose removal leaves the function exactly unchanged (bool mask over the group)."""
    unread = torch.ones(g.size, dtype=torch.bool)
    for c in g.consumers:
        w = state[f"{c}.weight"]
        # rows of the transposed weight are input features; a linear after a flatten has several per channel
        unread &= ~(w != 0).transpose(0, 1).reshape(g.size, -1).any(1)
    if not (g.post_bn_relu or g.post_relu):
        return unread
    zero_filter = ~(gemm_view(state[f"{g.producers[0]}.weight"]) != 0).any(1)
    if g.post_relu:  # producer -> ReLU: a zero row outputs relu(bias), exactly 0 where the bias is <= 0
        bias = state.get(f"{g.producers[0]}.bias")
        return unread | (zero_filter & (bias is None or torch.relu(bias) == 0))
    if f"{g.producers[0]}.bias" in state:
        zero_filter &= state[f"{g.producers[0]}.bias"] == 0
    bn = g.norms[0]
    const = (0 - state[f"{bn}.running_mean"]) / torch.sqrt(state[f"{bn}.running_var"] + 1e-5) * state[f"{bn}.weight"] \
        + state[f"{bn}.bias"]
    silent = zero_filter & (torch.relu(const) == 0)  # the channel is exactly 0 after BN + ReLU
    return unread | silent


def width_kwargs(name: str, kwargs: dict, model: nn.Module) -> dict[str, tuple]:
    """Map producer conv -> where its width lives in the registry kwargs (for rebuilding a shrunk model)."""
    out: dict[str, tuple] = {}
    family = getattr(model, "rsp_family", "")
    if family in ("vgg", "small-cnn"):
        key = "cfg" if family == "vgg" else "channels"
        positions = [i for i, v in enumerate(kwargs[key]) if v != "M"]
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("features.")]
        for conv, pos in zip(convs, positions):
            out[conv] = (key, pos)
        # the hidden linears of a VGG head (classifier.0, .2, ...): their widths are kwargs["hidden"]
        head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("classifier.")]
        for j, linear in enumerate(head[: len(kwargs.get("hidden") or [])]):
            out[linear] = ("hidden", j)
    elif family in ("resnet", "wrn"):
        for s, stage in enumerate(kwargs["block_channels"]):
            for j in range(len(stage)):
                out[f"layer{s + 1}.{j}.conv1"] = ("block_channels", s, j)
    return out


def _set_width(kwargs: dict, path: tuple, value: int) -> None:
    target = kwargs[path[0]]
    for p in path[1:-1]:
        target = target[p]
    target[path[-1]] = value


def shrink(state, groups, model_name, kwargs, model) -> tuple[dict, dict, dict]:
    """Remove exactly-removable channels of every group the registry can rebuild narrower."""
    kwargs = json.loads(json.dumps(kwargs))
    where = width_kwargs(model_name, kwargs, model)
    selection, removed = {}, {}
    for gi, g in enumerate(groups):
        if g.merged or len(g.producers) != 1 or g.producers[0] not in where:
            continue
        keep = ~removable_channels(state, g)
        if keep.all():
            continue
        if not keep.any():  # keep one channel so the layer still exists (its output is exactly zero)
            keep[0] = True
        selection[gi] = torch.nonzero(keep).squeeze(1)
        removed[g.producers[0]] = int((~keep).sum())
        _set_width(kwargs, where[g.producers[0]], int(keep.sum()))
    return select_channels(state, groups, selection), kwargs, removed


# --- report pictures ----------------------------------------------------------------------------


def write_png(path: Path, pixels: torch.Tensor) -> None:
    """A greyscale PNG from a uint8 H x W tensor (no imaging library needed)."""
    h, w = pixels.shape
    raw = b"".join(b"\x00" + bytes(pixels[i].tolist()) for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    atomic_write_bytes(path, png)


def occupancy(w: torch.Tensor, max_side: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """The GEMM view's non-zero pattern (1 = non-zero), at most max_side cells a side: a cell covering r x c
    weights is 1 if any of them is non-zero. Returns (cells, (r, c))."""
    g = (gemm_view(w) != 0).float()
    r = max(1, -(-g.shape[0] // max_side))
    c = max(1, -(-g.shape[1] // max_side))
    if r > 1 or c > 1:
        g = torch.nn.functional.max_pool2d(g[None, None], (r, c), ceil_mode=True)[0, 0]
    return g, (r, c)


def weight_picture(w: torch.Tensor, max_side: int = 1024) -> torch.Tensor:
    """The GEMM view as bare pixels: black = non-zero, white = zero (as the study's figures)."""
    g, _ = occupancy(w, max_side)
    scale = max(1, min(4, 512 // max(g.shape)))
    g = g.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return ((1 - g) * 255).to(torch.uint8)


def weight_picture_title(layer: str, step: str, w: torch.Tensor) -> str:
    return f"{layer} ({'x'.join(map(str, w.shape))}), {step}: sparsity {1.0 - (w != 0).float().mean().item():.4f}"


def write_weight_picture(path: Path, w: torch.Tensor, layer: str, step: str) -> None:
    """The GEMM view with axes in weight indices, a title (layer, step, sparsity) and a scale (what black and
    white mean, how many weights a pixel covers); the bare pixels where matplotlib is missing."""
    from .report_plots import weight_matrix

    cells, cell = occupancy(w, max_side=512)
    if not weight_matrix(path, cells.numpy(), tuple(gemm_view(w).shape), cell, weight_picture_title(layer, step, w)):
        write_png(path, weight_picture(w))


# --- the stage ----------------------------------------------------------------------------------


@dataclass
class StructureOptions:
    k: int = 1
    regroup: bool = True
    nm: str | None = None
    blocks: list = field(default_factory=lambda: [f"{r}x{c}" for r, c in DEFAULT_BLOCKS])
    plot_layers: list | None = None
    n_examples: int = 500
    attack_steps: int = 20
    eps: float | None = None
    data_dir: str | None = None
    device: str = "cpu"
    seed: int = 0
    prune_block: str | None = None  # None: the study's vectors; "4x4": blocks of the GEMM view
    finetune: int = 0  # epochs of robust fine-tuning with the structure frozen
    finetune_lr: float = 0.01
    batch_size: int | None = None  # fine-tuning batch; default: the source run's


def finetune(model: nn.Module, manifest: dict, splits, opts: StructureOptions, source: Path, log=print) -> tuple[dict, dict]:
    """A short robust fine-tune with the structure frozen (FixedMask of the current non-zeros), the source
    run's objective and attack, a cosine schedule from --finetune-lr, and selection on the validation split
    (epoch 0, i.e. no fine-tuning, is a candidate: the fine-tune can only help). Returns (state, summary)."""
    import copy
    import math

    import yaml

    from .attacks import PGDConfig, evaluate
    from .data import DeviceBatches
    from .engine import Selection, TrainStep, run_epoch
    from .objectives import Objective
    from .sparse import FixedMask

    device = torch.device(opts.device)
    model = copy.deepcopy(model).to(device)
    mask = FixedMask.from_pattern(model)
    trained = SourceRun.of(manifest)
    eps, step_size = trained.attack.eps, trained.attack.step_size
    objective_name = trained.objective
    note = ""
    if objective_name == "rst":  # the extra pseudo-labelled data is not part of the run folder
        objective_name, note = "trades", "rst run fine-tuned with trades (no extra data here)"
    objective = Objective(objective_name, PGDConfig(eps, step_size, trained.attack.steps), trained.attack.beta)
    batch = opts.batch_size
    if batch is None:
        try:
            from .config import read_text_file, safe_yaml  # bounded: a config.yaml cannot expand or hang

            saved = safe_yaml(read_text_file(source / "config.yaml", "config file")) or {}
            batch = int(saved.get("batch_size") or 128)
        except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError):  # AttributeError: not a mapping
            batch = 128
    step = TrainStep(model, mask, objective, lr=opts.finetune_lr)
    gen = torch.Generator(device).manual_seed(opts.seed)
    train_x, train_y = splits.train_x.to(device), splits.train_y.to(device)
    val_x, val_y = splits.val_x[:1000].to(device), splits.val_y[:1000].to(device)
    val_cfg = PGDConfig(eps, step_size, opts.attack_steps or 10) if objective.robust else None

    def validate():
        return evaluate(model, val_x, val_y, val_cfg, generator=torch.Generator(device).manual_seed(opts.seed))

    batches = DeviceBatches(train_x, train_y, min(batch, len(train_y)), generator=gen, shuffle=True,
                            augment_with=splits.info, drop_last=True)
    total = max(1, opts.finetune * len(batches))
    t = 0  # steps done: the cosine runs over the whole fine-tune
    selection = Selection()  # the trainer's rule; epoch 0 (no fine-tuning) is a candidate
    history = []
    for epoch in range(opts.finetune + 1):
        if epoch:
            stats = run_epoch(step, batches, lambda k: 0.5 * opts.finetune_lr * (1 + math.cos(math.pi * (t + k) / total)),
                              gen, device=device)
            t += stats.steps
            if stats.diverged:
                raise StructureError(f"fine-tuning diverged at epoch {epoch} (loss {stats.train_loss}); try a lower --finetune-lr")
        r = validate()
        score, collapsed = Selection.judge(r, val_y, objective.robust)
        history.append({"epoch": epoch, **r, "collapsed": collapsed})
        if epoch:
            log(f"finetune  epoch {epoch}/{opts.finetune}  val clean {r['clean_acc']:.3f}"
                + (f" robust {r['robust_acc']:.3f}" if val_cfg else ""))
        if selection.beats(score, collapsed):
            selection.keep(model, score, collapsed, epoch=epoch)
    summary = {"epochs": opts.finetune, "selected_epoch": selection.best["epoch"], "selected_on": "val", "lr": opts.finetune_lr,
               "schedule": "cosine", "batch_size": batch, "objective": objective_name, "history": history, "note": note}
    return {k: v.cpu() for k, v in selection.state.items()}, summary


def _accuracy(model, manifest, opts, splits) -> dict:
    from .attacks import PGDConfig, evaluate
    from .engine import is_collapsed

    if splits is None:
        return {}
    attack = SourceRun.of(manifest).attack
    eps = opts.eps if opts.eps is not None else attack.eps
    cfg = PGDConfig(eps, attack.step_size, opts.attack_steps) if opts.attack_steps else None
    x, y = splits.test_x[: opts.n_examples], splits.test_y[: opts.n_examples]
    r = evaluate(model, x.to(opts.device), y.to(opts.device), cfg, generator=torch.Generator(opts.device).manual_seed(opts.seed))
    return {"clean_acc": r["clean_acc"], "robust_acc": r.get("robust_acc"), "n": r["n"], "attack": r.get("attack"),
            "top_class_share": r.get("top_class_share"), "collapsed": is_collapsed(r, y)}


# A prune step that removes more than this share of the remaining non-zeros changes the model a lot.
PRUNE_WARN_SHARE = 0.1


def prune_warnings(before: dict, after: dict, k: int, finetune: int) -> list[str]:
    """What a user must hear about a lossy prune step: a large share of the weights gone, accuracy halved,
    a collapsed classifier (the steps' entries as recorded: analysis, clean_acc, collapsed, top_class_share)."""
    found = []
    nnz_before = before["analysis"]["overall"]["nonzero"]
    pruned = nnz_before - after["analysis"]["overall"]["nonzero"]
    share = pruned / nnz_before if nnz_before else 0.0
    if share > PRUNE_WARN_SHARE:
        found.append(f"{share:.0%} of the remaining non-zeros ({pruned} of {nnz_before})")
    a, b = before.get("clean_acc"), after.get("clean_acc")
    if a is not None and b is not None and b < 0.5 * a:
        found.append(f"clean accuracy {a:.3f} -> {b:.3f}")
    if after.get("collapsed") and not before.get("collapsed"):
        found.append(f"one class now takes {after['top_class_share']:.0%} of the test predictions")
    if not found:
        return []
    advice = ("" if finetune else "win it back with --finetune N, ") + \
        "use --k 0 (exact changes only), or train with --regrow l2-magnitude-seeded so that vectors keep several non-zeros"
    return [f"the prune step (k = {k}) cost {'; '.join(found)}: {advice}"]


def run(source: str | Path, output: str | Path, opts: StructureOptions, log=print) -> dict:
    source, output = Path(source), Path(output)
    trained = read_source(source)
    manifest = trained.manifest
    if opts.k < 0:
        raise StructureError(f"--k must be >= 0, got {opts.k}")
    if opts.finetune < 0 or opts.finetune_lr <= 0:
        raise StructureError("--finetune must be >= 0 epochs and --finetune-lr > 0")
    prune_block = parse_block(opts.prune_block) if opts.prune_block else None
    nm = parse_nm(opts.nm)
    blocks = [parse_block(b) for b in opts.blocks]
    check_new_output(output, source)

    model = build_model(manifest)
    state = load_tensors(source / MODEL_FILE)
    model.load_state_dict(state)
    model.eval()
    layer_names = [n for n, _ in sparsifiable_layers(model)]
    for b in blocks:  # a block shape must tile at least the layers it is meant for
        if not any(zero_block_share(state[f"{n}.weight"], b) is not None for n in layer_names):
            raise StructureError(f"block {b[0]}x{b[1]} divides no layer's GEMM view (out x in*kh*kw)")
    for n in opts.plot_layers or []:
        if n not in layer_names:
            raise StructureError(f"--plot-layer {n!r} is not a conv/linear layer; layers: {', '.join(layer_names)}")

    splits = None
    if opts.n_examples > 0 or opts.finetune:
        from .data import load_run_dataset

        splits = load_run_dataset(trained.dataset, opts.data_dir)  # --data-dir, RSP_DATA_DIR or the run's
    name, kwargs = manifest["model"]["name"], manifest["model"].get("kwargs", {})
    groups = channel_groups(model)
    held = StageOutput.open(output)  # the one writer of output until it is sealed
    steps = []

    def record(step, st, mdl, note=""):
        progress.step(f"evaluating {step}")
        entry = {"step": step, "note": note, "analysis": analyse(st, layer_names, blocks),
                 **_accuracy(mdl.to(opts.device), manifest, opts, splits)}
        steps.append(entry)
        progress.advance()
        ov = entry["analysis"]["overall"]
        acc = f"  clean {entry['clean_acc']:.3f} robust {entry['robust_acc']:.3f}" if entry.get("robust_acc") is not None else ""
        log(f"{step:<9} sparsity {ov['sparsity']:.4f}  zero vectors {ov['zero_vectors']:.4f}  "
            f"zero filters {ov['zero_filters']:.4f}{acc}")
        return entry

    t0 = time.perf_counter()
    n_steps = 3 + bool(opts.regroup) + bool(nm) + bool(opts.finetune)  # original, prune, shrink + optional
    with StepProgress(f"structure {source.name}", total=n_steps) as progress:
        record("original", state, model)
        pictures = opts.plot_layers or list(dict.fromkeys([layer_names[len(layer_names) // 2], layer_names[-2]]))
        for n in pictures:
            write_weight_picture(output / f"weights_{n.replace('.', '_')}_original.png", state[f"{n}.weight"], n, "original")

        if opts.regroup:
            state = select_channels(state, groups, regroup_permutations(state, groups))
            model.load_state_dict(state)
            record("regroup", state, model, "channel permutations, function unchanged")
            for n in pictures:
                write_weight_picture(output / f"weights_{n.replace('.', '_')}_regrouped.png", state[f"{n}.weight"], n,
                                     "regrouped")
        state, pruned = prune_vectors(state, layer_names, opts.k, prune_block)
        model.load_state_dict(state)
        unit = "vectors" if prune_block is None else f"{prune_block[0]}x{prune_block[1]} blocks"
        record("prune", state, model, f"{unit} with <= {opts.k} non-zeros zeroed ({pruned} weights)")
        warnings = prune_warnings(steps[-2], steps[-1], opts.k, opts.finetune)
        state, new_kwargs, removed = shrink(state, groups, name, kwargs, model)
        small = build_model({"model": {"name": name, "kwargs": new_kwargs}})
        small.load_state_dict(state, strict=True)
        small.eval()
        record("shrink", state, small, f"{sum(removed.values())} channels removed in {len(removed)} layers")
        nm_skipped = []
        if nm:
            state, nm_skipped = project_nm(state, layer_names, *nm)
            small.load_state_dict(state)
            record(f"nm {nm[0]}:{nm[1]}", state, small, f"skipped (width not a multiple of {nm[1]}): {nm_skipped}")
        tuned = None
        if opts.finetune:
            progress.step(f"fine-tuning {opts.finetune} epoch(s)")
            state, tuned = finetune(small, manifest, splits, opts, source, log)
            small.load_state_dict(state)
            record("finetune", state, small, f"{opts.finetune} epochs, structure frozen, selected epoch "
                   f"{tuned['selected_epoch']} on validation")
            if steps[-1].get("collapsed") and not steps[0].get("collapsed"):
                warnings.append(f"after fine-tuning one class still takes {steps[-1]['top_class_share']:.0%} of the test "
                                "predictions: the structured model is a constant classifier")
    for w in warnings:
        log(f"warning: {w}")

    save_tensors(output / MODEL_FILE, state)
    analysis = {"steps": steps, "groups": [g.__dict__ for g in groups], "removed_channels": removed}
    atomic_write_text(output / "analysis.json", json.dumps(analysis, indent=1) + "\n")
    atomic_write_text(output / "config.yaml", json.dumps({**opts.__dict__, "source": str(source)}, indent=1) + "\n")
    report = _markdown(manifest, source, steps, pictures, removed, opts, nm_skipped, warnings)
    atomic_write_text(output / "report.md", report)
    layers, sparsity = layer_report(state, layer_names)
    final = steps[-1]
    out = {
        "stage": "structure",
        "status": "complete",
        "rsp_version": __version__,
        "model": {"name": name, "kwargs": new_kwargs},
        # the unshrunk architecture: verify builds it to time the dense original on the same runtime
        "dense_reference": manifest.get("dense_reference") or {"name": name, "kwargs": kwargs},
        "source": {"path": str(source), "stage": manifest["stage"], "manifest_sha256": _sha(source / "manifest.json")},
        **{k: manifest[k] for k in ("dataset", "input", "normalization", "objective", "attack", "method", "target_sparsity")
           if k in manifest},
        "sparsity": sparsity,
        "layers": layers,
        "params": {"before": _n_params(load_tensors(source / MODEL_FILE)), "after": _n_params(state)},
        "structure": {"regroup": opts.regroup, "k": opts.k, "prune_unit": opts.prune_block or "vector", "nm": opts.nm,
                      "removed_channels": removed, "nm_skipped_layers": nm_skipped, "finetune": tuned,
                      "warnings": warnings,
                      "time_s": round(time.perf_counter() - t0, 3)},
        "metrics": {"clean_acc": final.get("clean_acc"), "robust_acc": final.get("robust_acc"), "split": "test",
                    "n_test": final.get("n"), "attack": final.get("attack"),
                    "source_metrics": manifest.get("metrics")},
    }
    files = [MODEL_FILE, "analysis.json", "config.yaml", "report.md"] + sorted(p.name for p in output.glob("*.png"))
    return held.seal(out, files)


def _n_params(state: dict) -> int:
    return sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked",
                                                                        "normalize.mean", "normalize.std")))


def _sha(path: Path) -> str:
    from .artifacts import sha256_file

    return sha256_file(path)


def _markdown(manifest, source, steps, pictures, removed, opts, nm_skipped, warnings=()) -> str:
    lines = ["# rsp structure report", "", f"Source: `{source}` ({manifest['model']['name']}, method "
             f"{manifest.get('method')}, objective {manifest.get('objective')}, target sparsity "
             f"{manifest.get('target_sparsity')}).", ""]
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    lines += [
             f"Accuracy on the first {opts.n_examples} test images (clean, and PGD-{opts.attack_steps}); "
             "model selection happened in `rsp train` on a validation split, not here.", "",
             "| step | sparsity | zero vectors | zero kernels | zero in-channels | zero filters | 2:4 ok | clean | robust | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        ov = s["analysis"]["overall"]
        lay = s["analysis"]["layers"].values()
        nm_ok = [v["nm_2_4_compliance"] for v in lay if v["nm_2_4_compliance"] is not None]
        f = lambda v: "" if v is None else f"{v:.4f}"
        lines.append(f"| {s['step']} | {ov['sparsity']:.4f} | {ov['zero_vectors']:.4f} | {ov['zero_kernels']:.4f} | "
                     f"{ov['zero_input_channels']:.4f} | {ov['zero_filters']:.4f} | {sum(nm_ok) / max(1, len(nm_ok)):.4f} | "
                     f"{f(s.get('clean_acc'))} | {f(s.get('robust_acc'))} | {s['note']} |")
    final = steps[-1]["analysis"]["layers"]
    blocks = list(next(iter(final.values()))["zero_blocks"])
    lines += ["", "## Per layer (final)", "",
              "| layer | shape | non-zero | zero vectors | zero filters | " + " | ".join(f"zero {b}" for b in blocks) + " |",
              "|---|---|---|---|---|" + "---|" * len(blocks)]
    for n, v in final.items():
        zb = " | ".join("n/a" if v["zero_blocks"][b] is None else f"{v['zero_blocks'][b]:.3f}" for b in blocks)
        lines.append(f"| {n} | {'x'.join(map(str, v['shape']))} | {v['nonzero']} | {v['zero_vectors']:.3f} | "
                     f"{v['zero_filters']:.3f} | {zb} |")
    lines += ["", f"Removed channels: {removed or 'none'}.", ""]
    if nm_skipped:
        lines += [f"N:M projection skipped for: {', '.join(nm_skipped)}.", ""]
    lines += ["## Weight matrices (GEMM view out x in*kh*kw; black = non-zero)", ""]
    for n in pictures:
        stem = n.replace(".", "_")
        lines.append(f"- `{n}`: ![original](weights_{stem}_original.png)"
                     + (f" ![regrouped](weights_{stem}_regrouped.png)" if opts.regroup else ""))
    return "\n".join(lines) + "\n"
