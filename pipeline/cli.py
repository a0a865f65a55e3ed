"""The `rsp` command line: thin verbs over the stage modules.

Bad input (a missing data folder, an unknown model, a sparsity outside [0, 1), a resume folder from
another config, an --output that cannot be written, ...) prints one line on stderr and exits with code 2;
no traceback. Each command checks its options and its --output before it does any work.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import typer
from typer.core import TyperCommand

from . import defaults  # torch-free: the attack defaults the help shows

app = typer.Typer(
    name="rsp",
    help="Robust sparse networks, from training to the edge.\n\n"
    "Stages: train -> structure -> export -> verify. Each writes a folder (manifest.json + model.safetensors)"
    " that the next one reads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    typer.echo(f"rsp: error: {message}", err=True)
    raise typer.Exit(code)


def _registry_help() -> dict[str, Callable[[], str]]:
    """{placeholder}: its text, for the option helps that a registry writes; each is built only where an option's
    help holds its placeholder (rsp.formats is light; rsp.methods imports torch)."""
    from .formats import backends, formats

    def methods() -> str:
        from .methods import list_methods

        return " | ".join(list_methods())

    def method_help() -> str:
        from .methods import method_help

        return method_help()

    return {"{formats}": lambda: " | ".join(formats()), "{backends}": lambda: " | ".join(("torch", *backends())),
            "{format_help}": lambda: "; ".join(f"{name}: {f.export_help}" for name, f in formats().items()),
            "{backend_help}": lambda: "; ".join(["torch: the PyTorch twin"] + [f"{name}: {b.verify_help}"
                                                                               for name, b in backends().items()]),
            "{methods}": methods, "{method_help}": method_help}


class _RegistryHelpCommand(TyperCommand):
    """A command whose option helps fill {formats}, {backends}, ... from the format registry when they are shown,
    not when this module is imported: a format registered later (a plugin) is listed too."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        texts = _registry_help()
        for p in params:
            template = getattr(p, "registry_help", None) or p.help or ""
            if any(key in template for key in texts):
                p.registry_help, p.help = template, template
                for key, text in texts.items():
                    if key in p.help:
                        p.help = p.help.replace(key, text())
        return params


def _yaml_mapping(flag: str, text: str) -> dict:
    """A flag's YAML mapping ('{width: 0.25}'), or a one-line error."""
    import yaml

    from .config import safe_yaml

    try:
        value = safe_yaml(text)  # bounded: no aliases, limits on size and depth
    except yaml.YAMLError as exc:
        _fail(f"{flag} {text!r}: not YAML ({str(exc).splitlines()[0]})")
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        _fail(f"{flag} {text!r}: expected a mapping such as '{{width: 0.25}}'")
    return value


def _check_output(path: str, flag: str = "--output") -> None:
    """Fail now, not after the work, when `path` cannot be created and written: probe the folder itself, or
    the nearest folder above it that exists (where it would be created), with a temporary file."""
    import pathlib
    import tempfile

    p = pathlib.Path(path).expanduser()
    if p.exists() and not p.is_dir():
        _fail(f"{flag} {path} exists and is not a folder")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        _fail(f"{flag} {path} cannot be created: {probe} is not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".rsp-write-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        _fail(f"{flag} {path} cannot be {'written' if probe == p else 'created'} ({probe}: {exc.strerror or exc})")


def _check_threads(threads: Optional[int], flag: str = "--threads") -> None:
    if threads is not None and threads < 1:
        _fail(f"{flag} must be >= 1, got {threads}")


def _check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and a CUDA device that exists here."""
    import re

    if device == "cpu":
        return
    if not re.fullmatch(r"cuda(:\d+)?", device):
        _fail(f"--device must be cpu or cuda (cuda:N), got {device!r}")
    import torch

    if not torch.cuda.is_available():
        _fail(f"--device {device}: no CUDA device is available here (use --device cpu)")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        _fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _onnx_opset_range() -> tuple[int, int]:
    """The opsets rsp's ONNX export can write: from export's minimum to the TorchScript exporter's maximum."""
    from .export import MIN_OPSET

    try:
        from torch.onnx import _constants

        top = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):  # a torch without these private constants: export says what fails
        top = 10**6
    return MIN_OPSET, int(top)


def _check_dataset_fits(bundle: str, dataset: Optional[str]) -> None:
    """verify --dataset on a bundle: the data set's images and classes must be the ones the model takes."""
    if dataset is None:
        return
    from .artifacts import read_manifest
    from .data import dataset_info

    info = dataset_info(dataset)
    manifest = read_manifest(bundle)
    shape = list((manifest.get("input") or {}).get("shape") or [])
    want = [info.in_channels, info.image_size, info.image_size]
    classes = (manifest.get("dataset") or {}).get("num_classes")
    if shape and shape != want:
        _fail(f"--dataset {dataset}: its images are {'x'.join(map(str, want))}, the bundle's model takes "
              f"{'x'.join(map(str, shape))}")
    if classes is not None and classes != info.num_classes:
        _fail(f"--dataset {dataset}: it has {info.num_classes} classes, the bundle's model {classes}")


def _method_options(items: list[str]) -> dict:
    """--method-option KEY=VALUE (VALUE in YAML), repeatable."""
    import yaml

    from .config import safe_yaml  # bounded: no aliases, limits on size and depth

    opts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--method-option {item!r}: expected KEY=VALUE")
        try:
            opts[key.strip().replace("-", "_")] = safe_yaml(value)
        except yaml.YAMLError as exc:
            _fail(f"--method-option {item!r}: the value is not YAML ({str(exc).strip().splitlines()[0]})")
    return opts


def _bad_input_types():
    from .artifacts import ArtifactError
    from .config import ConfigError
    from .data import DataError
    from .models import ModelArgumentError, UnknownModelError

    return (ArtifactError, ConfigError, DataError, ModelArgumentError, UnknownModelError)


@app.command(
    cls=_RegistryHelpCommand,
    epilog="Examples:\n\n"
    "  rsp train                                   # embedded digits, small CNN, 90 % sparse, PGD-AT\n\n"
    "  rsp train --dataset cifar10 --data-dir ~/data --model vgg16 --sparsity 0.99 --objective trades\n\n"
    "  rsp train --config cifar10-vgg16-99-trades --data-dir ~/data --output runs/vgg16-99\n\n"
    "  rsp train --output runs/vgg16-99 --resume   # continue after an interruption, bit for bit\n\n"
    "  torchrun --nproc-per-node 4 -m rsp.cli train --config ...   # multi-GPU",
)
def train(
    dataset: Optional[str] = typer.Option(None, help="digits (embedded, no download) | cifar10 | cifar100 | svhn.", rich_help_panel="Data"),
    data_dir: Optional[str] = typer.Option(None, help="Folder holding cifar-10-batches-py/ (torchvision's root) or that folder itself (default: $RSP_DATA_DIR).", rich_help_panel="Data"),
    val_fraction: Optional[float] = typer.Option(None, help=f"Share of the training data held out for model selection (default: {defaults.VAL_FRACTION:g}).", rich_help_panel="Data"),
    extra_data: Optional[str] = typer.Option(None, help="RST: pseudo-labelled images mixed 50/50 into each batch: an rsp pseudo-label folder, an .npz/.safetensors (images, labels), or the distributed ti_500K pickle (data, extrapolated_targets; read without executing code).", rich_help_panel="Data"),
    model: Optional[str] = typer.Option(None, help="Registry name (rsp models lists them) (default: the data set's: small-cnn, vgg16).", rich_help_panel="Model"),
    model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help="YAML mapping of the model constructor's keyword arguments, e.g. '{width: 0.25}' (vgg), '{widen_factor: 4}' (wrn).", rich_help_panel="Model"),
    sparsity: Optional[float] = typer.Option(None, help="Share of conv/linear weights that are zero, fixed from step one (default: 0.9).", rich_help_panel="Model"),
    method: Optional[str] = typer.Option(None, help="{method_help}. "
                                         "--epochs is a method's whole budget, split over its phases (see the manifest) (default: bcs).", rich_help_panel="Model"),
    method_option: Optional[list[str]] = typer.Option(None, "--method-option", help="KEY=VALUE (YAML value) for the method's recipe, e.g. rounds=3; repeatable.", rich_help_panel="Model"),
    rewire_every: Optional[int] = typer.Option(None, help="BCS: rebirth dead connections every N steps (default: 1).", rich_help_panel="Model"),
    regrow: Optional[str] = typer.Option(None, help="BCS rebirth rule: random (uniform over dormant positions) | layer-size (the paper's code: layer in proportion to its size, then uniform in it) | l2 (the nearest dormant position, exact Euclidean distance in (out, in, kh, kw), to random live seeds) | l2-magnitude-seeded (the same, seeds: the live connections of largest |theta|; the magnitude weights the choice of seeds, not the distance; alias l2-weighted) (default: random).", rich_help_panel="Model"),
    sparse_init: Optional[str] = typer.Option(None, help="BCS/fixed start: budget (exactly the budget from step one, |He| values) | reference (the paper's code: under the budget with the layer profile, the first step fills the rest at 1e-12, layers drawn in proportion to size) (default: budget; the paper recipes: reference).", rich_help_panel="Model"),
    sigma: Optional[float] = typer.Option(None, help="BCS: noise std is lr * sigma (default: 1e-6).", rich_help_panel="Model"),
    alpha: Optional[float] = typer.Option(None, help="BCS: L1 prior strength (default: 0).", rich_help_panel="Model"),
    temperature: Optional[float] = typer.Option(None, help="BCS: SGLD temperature T, noise std sqrt(2 lr T) (overrides sigma).", rich_help_panel="Model"),
    objective: Optional[str] = typer.Option(None, help="natural | pgd-at | mixed-at | trades | mart | rst (default: pgd-at).", rich_help_panel="Robustness"),
    eps: Optional[str] = typer.Option(None, help=f"Linf radius, inputs in [0, 1]; fractions allowed (default: {defaults.as_fraction(defaults.EPS)}).", rich_help_panel="Robustness"),
    attack_step_size: Optional[str] = typer.Option(None, help=f"PGD step size (default: {defaults.as_fraction(defaults.STEP_SIZE)}).", rich_help_panel="Robustness"),
    attack_steps: Optional[int] = typer.Option(None, help="PGD steps while training (default: 10).", rich_help_panel="Robustness"),
    beta: Optional[float] = typer.Option(None, help="TRADES/MART/RST robust-loss weight (default: 6).", rich_help_panel="Robustness"),
    vs_lambda: Optional[float] = typer.Option(None, help="ANP-VS vulnerability suppression, any method: + lambda * mean |z(x) - z(x_adv)| over ReLU features (default: 0).", rich_help_panel="Robustness"),
    eval_attack_steps: Optional[int] = typer.Option(None, help="PGD steps of the per-epoch validation attack (model selection) (default: 10).", rich_help_panel="Robustness"),
    test_attack_steps: Optional[int] = typer.Option(None, help="PGD steps of the final test-set attack (default: 20).", rich_help_panel="Robustness"),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: 30).", rich_help_panel="Optimisation"),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N optimizer steps (smoke runs).", rich_help_panel="Optimisation"),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size (default: 128).", rich_help_panel="Optimisation"),
    lr: Optional[float] = typer.Option(None, help="Initial learning rate; x0.1 at 50 % and 75 % of the epochs (default: 0.1).", rich_help_panel="Optimisation"),
    weight_decay: Optional[float] = typer.Option(None, help="Decoupled (SGDW) weight decay (default: 5e-4).", rich_help_panel="Optimisation"),
    decay_scope: Optional[str] = typer.Option(None, help="What the decay shrinks: weights (conv/linear weights) | all (every trainable parameter, BatchNorm and biases too, as the paper's code) (default: weights; the paper recipes: all).", rich_help_panel="Optimisation"),
    seed: Optional[int] = typer.Option(None, help="Seed of init, data order, attacks, rewiring (default: 0).", rich_help_panel="Optimisation"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | auto (default: auto).", rich_help_panel="Runtime"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (default: on for CUDA).", rich_help_panel="Runtime"),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model.", rich_help_panel="Runtime"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch.", rich_help_panel="Runtime"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run folder (default: runs/train-<time>).", rich_help_panel="Run"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint.", rich_help_panel="Run"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Recipe YAML (or a shipped recipe name); flags override it.", rich_help_panel="Run"),
    list_recipes: bool = typer.Option(False, "--list-recipes", help="Print the shipped recipes and exit.", rich_help_panel="Run"),
) -> None:
    """Train a sparse, adversarially robust network from scratch (no dense pre-training).

    The connection budget K = (1 - sparsity) x (conv + linear weights) holds from the first step to the
    last: with --method bcs, connections whose parameter crosses zero die and as many dormant ones are
    reborn (Bayesian connectivity sampling, Özdenizci & Legenstein 2021). The run folder holds
    model.safetensors (the epoch with the best *validation* accuracy), train_state.safetensors (for
    --resume), config.yaml, metrics.jsonl and manifest.json; `rsp structure` reads it next.
    """
    import time

    from .config import read_recipe, recipe_names, resolve

    if list_recipes:
        for name in recipe_names():
            typer.echo(name)
        return
    overrides = {k: v for k, v in dict(
        dataset=dataset, data_dir=data_dir, val_fraction=val_fraction, extra_data=extra_data, model=model,
        sparsity=sparsity, method=method, rewire_every=rewire_every, regrow=regrow, sparse_init=sparse_init, sigma=sigma, alpha=alpha, temperature=temperature,
        objective=objective, eps=eps, attack_step_size=attack_step_size, attack_steps=attack_steps, beta=beta,
        vs_lambda=vs_lambda, eval_attack_steps=eval_attack_steps, test_attack_steps=test_attack_steps,
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, decay_scope=decay_scope,
        seed=seed, device=device, bf16=bf16, compile=compile, threads=threads).items() if v is not None}
    if model_kwargs is not None:
        overrides["model_kwargs"] = _yaml_mapping("--model-kwargs", model_kwargs)
    if method_option:
        overrides["method_options"] = _method_options(method_option)
    try:
        from .train import CONFIG_FILE, TrainingError, run

        if resume and output is None:
            _fail("--resume needs --output DIR (the run folder to continue)")
        recipe = read_recipe(config) if config else None
        if resume and recipe is None and output:
            import pathlib

            saved = pathlib.Path(output) / CONFIG_FILE
            if saved.is_file():  # resuming: the saved config is the recipe, flags may change runtime options
                recipe = read_recipe(str(saved))
        cfg = resolve(recipe, overrides)
        out = output or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}"
        _check_output(out)
        manifest = run(cfg, out, resume=resume, log=lambda m: typer.echo(m, err=True))
    except _bad_input_types() as exc:
        _fail(str(exc))
    except TrainingError as exc:
        _fail(str(exc), code=1)
    except OSError as exc:  # the disk filled up, a folder vanished mid-run: one line, not a traceback
        _fail(_os_error_text(exc), code=1)
    except KeyboardInterrupt:
        _fail("interrupted; continue with --resume", code=130)
    if manifest:
        m = manifest["metrics"]
        rob = f", robust {m['robust_acc']:.4f} ({m['attack']})" if m.get("robust_acc") is not None else ""
        typer.echo(f"{out}: {manifest['model']['name']} {manifest['method']} sparsity {manifest['sparsity']:.4f}; "
                   f"test clean {m['clean_acc']:.4f}{rob}; {_selection_text(manifest)}")


def _selection_text(manifest: dict) -> str:
    """How the saved epoch was chosen, as the run did it: on the validation split, or (none held out) the last."""
    m = manifest["metrics"]
    if m.get("selected_on") == "last" or (manifest.get("dataset") or {}).get("n_val") == 0:
        return f"kept the last epoch, {m['epoch']} (--val-fraction 0: no validation split to select on)"
    return f"selected epoch {m['epoch']} on validation"


def _os_error_text(exc: OSError) -> str:
    return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)


@app.command(
    epilog="Examples:\n\n"
    "  rsp structure runs/vgg16-99 --output runs/vgg16-99-structured          # regroup, k=1 pruning, shrink\n\n"
    "  rsp structure runs/resnet18-99 --k 0 --output runs/r18-exact           # only exact changes: same logits\n\n"
    "  rsp structure runs/vgg16-90 --nm 2:4 --output runs/vgg16-90-24         # for sparse tensor cores\n\n"
    "  rsp structure runs/vgg16-99 --finetune 5 --output runs/vgg16-99-ft    # win back what k=1 pruning cost",
)
def structure(
    run_dir: str = typer.Argument(..., help="A train (or structure) folder."),
    output: str = typer.Option(..., "--output", "-o", help="New folder (same contract: model.safetensors, manifest.json, report)."),
    k: int = typer.Option(1, "--k", help="Zero vectors (one (in,kh,kw) position across all output channels, the study's measure) holding at most k non-zeros (0: only exact, function-preserving changes)."),
    prune_block: Optional[str] = typer.Option(None, "--prune-block", help="Prune RxC blocks of the GEMM view (e.g. 4x4, 1x4 for a BSR kernel) instead of the study's vectors."),
    regroup: bool = typer.Option(True, "--regroup/--no-regroup", help="Permute channels to gather non-zeros (function unchanged)."),
    nm: Optional[str] = typer.Option(None, "--nm", help="N:M projection over the GEMM view, e.g. 2:4 for sparse tensor cores."),
    block: Optional[list[str]] = typer.Option(None, "--block", help="Block shapes (RxC of out x in*kh*kw) to report zero shares for (default: 1x4 4x4 16x1 32x1)."),
    plot_layer: Optional[list[str]] = typer.Option(None, "--plot-layer", help="Layers to draw (GEMM view PNG) (default: two)."),
    n_examples: int = typer.Option(500, help="Test images for clean/robust accuracy after each step (0: skip)."),
    attack_steps: int = typer.Option(20, help="PGD steps for the robust accuracy in the report (0: clean only)."),
    data_dir: Optional[str] = typer.Option(None, help="Data folder of the run's data set (default: $RSP_DATA_DIR, else the folder the run was trained on while it still holds that data; not needed for digits)."),
    finetune: int = typer.Option(0, "--finetune", help="Epochs of robust fine-tuning with the structure frozen (same objective as training; selected on validation)."),
    finetune_lr: float = typer.Option(0.01, "--finetune-lr", help="Peak learning rate of the fine-tune (cosine)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Fine-tuning batch size (default: the run's)."),
    seed: int = typer.Option(0, "--seed", help="Seed of attacks and fine-tuning."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
) -> None:
    """Turn learned sparsity into structure hardware can use, and report it.

    Steps: regroup (channel permutations that gather non-zeros, applied to producers, BatchNorms and
    consumers alike, residual streams included) -> prune (vectors = GEMM columns with <= k non-zeros) ->
    shrink (physically remove channels that are exactly dead; rebuild the registry model narrower) ->
    optional N:M -> optional robust fine-tune (--finetune). Each step is analysed (zero vectors, kernels, input channels, filters, 2:4, blocks)
    and evaluated (clean and PGD accuracy); report.md and PNG weight pictures go into --output.
    """
    from .structure import StructureOptions, run as run_structure

    _check_device(device)
    if n_examples < 0 or attack_steps < 0:
        _fail("--n-examples and --attack-steps must be >= 0")
    if batch_size is not None and batch_size < 1:
        _fail(f"--batch-size must be >= 1, got {batch_size}")
    _check_output(output)
    opts = StructureOptions(k=k, regroup=regroup, nm=nm, n_examples=n_examples, attack_steps=attack_steps,
                            data_dir=data_dir, device=device, plot_layers=plot_layer or None, prune_block=prune_block,
                            finetune=finetune, finetune_lr=finetune_lr, batch_size=batch_size, seed=seed)
    if block:
        opts.blocks = block
    try:
        manifest = run_structure(run_dir, output, opts, log=lambda m: typer.echo(m, err=True))
    except _bad_input_types() as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(_os_error_text(exc), code=1)
    p = manifest["params"]
    typer.echo(f"{output}: {manifest['model']['name']} parameters {p['before']} -> {p['after']}, "
               f"sparsity {manifest['sparsity']:.4f}; report {output}/report.md")


@app.command(
    epilog="Examples:\n\n"
    "  rsp compare runs/dense runs/magnitude runs/hydra --output runs/compare\n\n"
    "  rsp compare runs/v99 runs/v99-s --label trained --label structured --output runs/v99-vs-s",
)
def compare(
    runs: Optional[list[str]] = typer.Argument(None, metavar="RUN", help="Train or structure folders (one or more; e.g. a dense run and its pruned versions)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="New (or empty) folder for report.md, compare.json and the PNGs."),
    label: Optional[list[str]] = typer.Option(None, "--label", help="Name of each run in the report, in the order of RUNS (default: the folder names); repeat once per run."),
    bins: int = typer.Option(60, "--bins", help="Bins of the weight histograms (degree histograms: one bin per degree up to this many)."),
) -> None:
    """Compare the weights and topology of runs: a dense model and its pruned versions, any methods.

    Per run, per conv/linear layer and over all layers: density; mean, std, skewness, excess kurtosis and
    mean |w| of the non-zero weights; their histograms (runs overlaid); in- and out-degree distributions of
    units (non-zero weights and connected channels); zero filters and zero input channels; and the Jaccard
    overlap of the non-zero masks between every pair of runs of the same architecture (skipped, with the
    reason, for other pairs). Writes report.md, compare.json and PNGs into --output.
    """
    from .compare import CompareOptions, run as run_compare

    if not runs:
        _fail("missing RUN: give one or more train or structure folders to compare")
    if not output:
        _fail("--output is required: a new or empty folder for the report")
    _check_output(output)
    try:
        result = run_compare(runs, output, CompareOptions(bins=bins, labels=label or None),
                             log=lambda m: typer.echo(m, err=True))
    except _bad_input_types() as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(_os_error_text(exc), code=1)
    pairs = result["result"]["overlap"]["pairs"]
    done = sum(p["computed"] for p in pairs)
    typer.echo(f"{output}: {len(runs)} run(s) compared, mask overlap for {done} of {len(pairs)} pair(s); "
               f"report {output}/report.md")


@app.command(
    cls=_RegistryHelpCommand,
    epilog="Examples:\n\n"
    "  rsp export --list-targets\n\n"
    "  rsp export runs/v99-s --target jetson-orin-nano --data-dir ~/data --output out/orin   # ONNX + TVM (sm_87 fatbin) + TensorRT settings\n\n"
    "  rsp export runs/v99-s --target jetson --output out/jetson   # a family alias: the Jetson rsp runs on, else the family's default\n\n"
    "  rsp export runs/demo --target x86-cpu --output out/x86 --tune-trials 256             # tuned CPU library\n\n"
    "  rsp export runs/demo --target cuda --format onnx --precision fp16 --output out/onnx16",
)
def export(
    run_dir: Optional[str] = typer.Argument(None, help="A train or structure folder."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Registry target or family alias (rsp export --list-targets lists both)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Bundle folder (default: exports/<run>-<target>)."),
    format: Optional[list[str]] = typer.Option(None, "--format", "-f", help="{formats}; repeat for several (default: the target's). {format_help}."),
    precision: Optional[str] = typer.Option(None, help="ONNX numbers: fp32 | fp16 (default: the target's)."),
    trt_precision: Optional[str] = typer.Option(None, "--trt-precision", help="TensorRT engine: fp32 | fp16 | int8 (default: the target's)."),
    opset: int = typer.Option(17, help="ONNX opset (>= 17)."),
    batch: int = typer.Option(1, help="Static batch of the TVM library (the ONNX model's batch is dynamic)."),
    tune_trials: int = typer.Option(0, "--tune-trials", help="MetaSchedule trials for the TVM CPU library (0: untuned); records are cached and reused."),
    tune_cache: Optional[str] = typer.Option(None, "--tune-cache", help="Tuning record folder (default: ~/.cache/rsp/tvm-tuning/<target>)."),
    nvcc: Optional[str] = typer.Option(None, "--nvcc", help="nvcc that compiles the TVM CUDA kernels into a fatbin (default: nvcc on PATH)."),
    data_dir: Optional[str] = typer.Option(None, help="Data folder of the run's data set, for the parity images (default: $RSP_DATA_DIR, else the folder the run was trained on while it still holds that data; not needed for digits)."),
    parity_images: int = typer.Option(256, "--parity-images", help="Test images on which exported logits are compared with PyTorch."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch and onnxruntime."),
    sparse_kernels: str = typer.Option(
        "auto", "--sparse-kernels",
        help="rsp's kernels in the TVM library: auto (GPU targets: the CUDA kernels for the layers the cost model "
             "marks sparse; CPU targets such as x86-cpu: every layer on rsp's CPU kernels, sparse where that beats the "
             "dense alternative (oneDNN timed here), else rsp's dense kernel), off (TVM's kernels only), "
             "host (link the CUDA kernels' CPU emulator into a CPU library: a correctness path for testing the GPU "
             "code's linkage, not a fast one)."),
    list_targets: bool = typer.Option(False, "--list-targets", help="Print the target registry (rsp/targets/*.yaml and the folders of $RSP_TARGETS_PATH) and exit."),
) -> None:
    """Turn a train or structure folder into a deployable bundle for a target device.

    ONNX (opset >= 17, dynamic batch, sparsity in the metadata), an Apache TVM 0.27 library compiled for the
    target (CUDA kernels precompiled into a fatbin, aarch64 host code cross-linked for Jetsons), and TensorRT
    build settings (engines are built on the device by rsp verify). Logits of every artifact that runs here
    are compared with PyTorch on real test images; manifest.json records the parity, hashes of every file,
    the target, and model.safetensors so rsp.load_model works on the bundle.
    """
    from .targets import aliases, describe, describe_aliases, resolve_target, target_names, targets

    if list_targets:
        for t in targets().values():
            typer.echo(describe(t))
        if aliases():
            typer.echo("")
            for line in describe_aliases():
                typer.echo(line)
        return
    try:
        from .export import ExportOptions, ParityError, run as run_export
        from .tvm_build import TVMCompileError

        if not target:
            _fail(f"--target is required; targets: {', '.join(target_names())}; aliases: {', '.join(sorted(aliases()))}")
        if not run_dir:
            _fail("missing RUN_DIR: the train or structure folder to export")
        resolved, why = resolve_target(target)
        if why:
            typer.echo(f"target {why}", err=True)
        target = resolved.name
        low, high = _onnx_opset_range()
        if not low <= opset <= high:
            _fail(f"--opset must be in {low}..{high} (what the ONNX exporter writes), got {opset}")
        _check_threads(threads)
        import pathlib

        out = output or f"exports/{pathlib.Path(run_dir).resolve().name}-{target}"
        _check_output(out)
        opts = ExportOptions(target=target, formats=format or None, precision=precision, trt_precision=trt_precision,
                             opset=opset, batch=batch, tune_trials=tune_trials, tune_cache=tune_cache, nvcc=nvcc,
                             data_dir=data_dir, parity_images=parity_images, threads=threads,
                             sparse_kernels=sparse_kernels)
        manifest = run_export(run_dir, out, opts, log=lambda m: typer.echo(m, err=True))
    except _bad_input_types() as exc:
        _fail(str(exc))
    except (ParityError, TVMCompileError) as exc:
        _fail(str(exc), code=1)
    except OSError as exc:
        _fail(_os_error_text(exc), code=1)
    par = ", ".join(f"{k} {v['max_abs_err']:.1e}" for k, v in manifest["parity"].items() if v.get("passed") is not None)
    typer.echo(f"{out}: {manifest['target']['name']} {'+'.join(manifest['formats'])}"
               + (f"; parity max |diff| {par}" if par else "") + f"; manifest {out}/manifest.json")


def _preset_help() -> str:
    from .verify import PRESETS

    return ("Evaluation preset; robust = worst case per example over its attacks: "
            + "; ".join(f"{name}: {p.help}" for name, p in PRESETS.items()) + " (default: default).")


def _attacks_help() -> str:
    from .attacks import ATTACK_REGISTRY
    from .verify import attack_aliases

    attacks = [f"{a.name} ({a.note})" if a.note else a.name for a in ATTACK_REGISTRY.values()]
    aliases = [name if name == "all" else f"{name} ({', '.join(members)})"
               for name, members in attack_aliases().items()]
    return ("Instead of a preset: " + " | ".join(attacks + aliases)
            + "; repeatable, each on every image, robust = worst case per example over them.")


class _VerifyCommand(_RegistryHelpCommand):
    """rsp verify, whose --preset and --attacks help (and, as every registry command, its format/backend help) is
    built when it is shown, from the presets and the attack registry as they are then: an attack registered after
    rsp.cli was imported is listed, and importing rsp.cli does not import torch."""

    def format_help(self, ctx, formatter) -> None:
        built = {"preset": _preset_help, "attacks": _attacks_help}
        for param in self.params:
            if param.name in built:
                param.help = built[param.name]()
        super().format_help(ctx, formatter)


@app.command(
    cls=_VerifyCommand,
    epilog="Examples:\n\n"
    "  rsp verify out/orin --data-dir ~/data --min-robust-acc 0.45 --max-latency-ms 5    # a CI gate on the device\n\n"
    "  rsp verify out/x86 --backend onnx --backend tvm --attacks pgd --n-examples 500\n\n"
    "  rsp verify runs/v99-s --backend torch --eps 4/255 --steps 100 --restarts 20\n\n"
    "  rsp verify out/x86 --preset autoattack --n-examples 1000    # standard AutoAttack, worst case per example\n\n"
    "  rsp verify out/orin --rpc 192.168.1.20:9090 --max-latency-ms 5    # the TVM library on a Jetson's RPC server",
)
def verify(
    bundle: str = typer.Argument(..., help="An export bundle (or any rsp stage folder: then the PyTorch twin is run)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Report folder: verify.json, report.md, PNG charts (default: BUNDLE/verify)."),
    backend: Optional[list[str]] = typer.Option(None, "--backend", "-b", help="{backends}; repeat for several (default: every artifact in the bundle that runs here; tvm-rpc first with --rpc). {backend_help}."),
    dataset: Optional[str] = typer.Option(None, help="Evaluation data set (default: the bundle's)."),
    data_dir: Optional[str] = typer.Option(None, help="Data folder (as in rsp train) (default: $RSP_DATA_DIR, else the folder the run was trained on while it still holds that data; not needed for digits)."),
    preset: Optional[str] = typer.Option(None, "--preset"),  # help: _VerifyCommand
    attacks: Optional[list[str]] = typer.Option(None, "--attacks"),  # help: _VerifyCommand
    eps: Optional[str] = typer.Option(None, help=f"Linf radius; fractions allowed (default: the bundle's, {defaults.as_fraction(defaults.EPS)})."),
    steps: Optional[int] = typer.Option(None, help="PGD steps (default: 50)."),
    restarts: Optional[int] = typer.Option(None, help="PGD random restarts; an example is robust only if it survives all (default: 10)."),
    step_size: Optional[str] = typer.Option(None, "--step-size", help="PGD step; fractions allowed (default: max(eps/4, 2.5 eps/steps); preset reference: 2.5 eps/steps)."),
    n_examples: Optional[int] = typer.Option(None, "--n-examples", help="The first N test images in file order (0: all) (default: 1000; preset reference: all)."),
    seed: int = typer.Option(0, help="Seed of the attacks (recorded)."),
    sanity: bool = typer.Option(True, "--sanity/--no-sanity", help="Sanity checks of the evaluation; a failure marks it unreliable and fails the run."),
    latency_runs: int = typer.Option(100, "--latency-runs", help="Timed runs per batch size (after warm-up)."),
    min_clean_acc: Optional[float] = typer.Option(None, "--min-clean-acc", help="Gate: fail (exit 1) below this clean accuracy.", rich_help_panel="Gates"),
    min_robust_acc: Optional[float] = typer.Option(None, "--min-robust-acc", help="Gate: fail below this robust accuracy.", rich_help_panel="Gates"),
    max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", help="Gate: fail above this p50 latency at batch 1.", rich_help_panel="Gates"),
    max_parity_error: Optional[float] = typer.Option(None, "--max-parity-error", help="Gate: fail above this max |logit difference| vs PyTorch.", rich_help_panel="Gates"),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="Gate: fail below this speed-up at batch 1 over the dense original on the fastest dense runtime timed here (onnxruntime, torch, TensorRT where present).", rich_help_panel="Gates"),
    device: str = typer.Option("cpu", help="cpu | cuda (the PyTorch twin and the attacks)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch and onnxruntime."),
    rpc: Optional[str] = typer.Option(None, "--rpc", help="HOST:PORT of a TVM RPC server on the device (python -m tvm.exec.rpc_server): the TVM library runs, is scored and timed there (backend tvm-rpc).", rich_help_panel="Remote device"),
    rpc_key: Optional[str] = typer.Option(None, "--rpc-key", help="Device key at a TVM RPC tracker; --rpc is then the tracker's HOST:PORT.", rich_help_panel="Remote device"),
    expect_sha256: Optional[str] = typer.Option(None, "--expect-sha256", help="The sha256 of the bundle's manifest.json, as rsp export printed it: any other bundle is refused (exit 2) before anything of it is loaded. The TVM library is native code: trust a bundle as you would trust code.", rich_help_panel="Trust"),
) -> None:
    """Check the artifact that will ship: robust, accurate, fast; exit 1 when a gate fails.

    The sha256 of every bundle file is checked first (a changed file: exit 2). White-box attacks run on
    the PyTorch twin of the exported weights; the adversarial examples are then classified by each
    artifact runtime, and that is the robust accuracy reported (worst case over attacks and restarts).
    Latency (p50/p90/p99, images/s at batch 1 and 32) is measured against the dense original on the same
    runtime in the same run. Gates come from the flags or the bundle manifest.
    """
    import pathlib

    from .attacks import parse_eps

    _check_device(device)
    _check_threads(threads)
    if latency_runs < 1:
        _fail(f"--latency-runs must be >= 1 (timed runs per batch size), got {latency_runs}")
    try:
        from .verify import VerifyOptions, run as run_verify

        _check_dataset_fits(bundle, dataset)
        _check_output(output or str(pathlib.Path(bundle) / "verify"), "--output" if output else
                      "the report folder (default BUNDLE/verify; pass --output elsewhere)")

        gates = {"min_clean_acc": min_clean_acc, "min_robust_acc": min_robust_acc, "max_latency_ms": max_latency_ms,
                 "max_parity_error": max_parity_error, "min_speedup": min_speedup}
        opts = VerifyOptions(output=output or str(pathlib.Path(bundle) / "verify"), backends=backend or None,
                             dataset=dataset, data_dir=data_dir, attacks=attacks or None, preset=preset,
                             eps=parse_eps(eps) if eps is not None else None, steps=steps, restarts=restarts,
                             step_size=parse_eps(step_size) if step_size is not None else None,
                             n_examples=n_examples, seed=seed, sanity=sanity, latency_runs=latency_runs,
                             device=device, threads=threads, gates={k: v for k, v in gates.items() if v is not None},
                             rpc=rpc, rpc_key=rpc_key, expect_sha256=expect_sha256)
        result = run_verify(bundle, opts, log=lambda m: typer.echo(m, err=True))
    except _bad_input_types() as exc:
        _fail(str(exc))
    except ValueError as exc:  # e.g. an eps that does not parse
        _fail(str(exc))
    except OSError as exc:
        _fail(_os_error_text(exc), code=1)
    b1 = result["latency"].get(f"{next(iter(result['backends']))}/batch1", {})
    typer.echo(f"{bundle}: clean {result['clean_acc']:.4f}, robust {result['robust_acc']:.4f} "
               f"({_headline_text(result)}, eps {result['eps'] * 255:.3g}/255, {result['n_examples']} images)"
               + (f", p50 {b1['p50_ms']:.3f} ms at batch 1" if b1 else "")
               + _speed_text(result)
               + (", UNRELIABLE" if result["unreliable"] else "")
               + ("; gates passed" if result["passed"] else "; FAILED: " + (", ".join(
                   g["gate"] for g in result["gates"] if not g["passed"]) or "sanity checks")))
    typer.echo(f"report: {opts.output}/report.md")
    if not result["passed"]:
        raise typer.Exit(1)


@app.command(
    cls=_RegistryHelpCommand,
    epilog="Examples:\n\n"
    "  rsp pipeline --output runs/demo        # embedded digits, small CNN, 90 %: the whole chain in minutes on a CPU\n\n"
    "  rsp pipeline --config cifar10-vgg16-99-trades --data-dir ~/data --target jetson-orin-nano --output runs/v99\n\n"
    "  rsp pipeline --output runs/demo        # again after an interruption: resumes at the stage it was in",
)
def pipeline(
    output: str = typer.Option(..., "--output", "-o", help="Folder for train/, structure/, export/, verify/."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Training recipe (YAML or shipped name); flags override it.", rich_help_panel="train"),
    dataset: Optional[str] = typer.Option(None, help="digits (embedded) | cifar10 | cifar100 | svhn.", rich_help_panel="train"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder (all stages) (default: $RSP_DATA_DIR).", rich_help_panel="train"),
    model: Optional[str] = typer.Option(None, help="Registry model.", rich_help_panel="train"),
    model_kwargs: Optional[str] = typer.Option(None, "--model-kwargs", help="YAML mapping of model constructor arguments, e.g. '{width: 0.25}'.", rich_help_panel="train"),
    sparsity: Optional[float] = typer.Option(None, help="Weight sparsity fixed from step one.", rich_help_panel="train"),
    method: Optional[str] = typer.Option(None, help="{methods} (see rsp train --help).", rich_help_panel="train"),
    regrow: Optional[str] = typer.Option(None, help="BCS rebirth rule: random | l2 | l2-magnitude-seeded (alias l2-weighted; seeds = largest |theta|).", rich_help_panel="train"),
    objective: Optional[str] = typer.Option(None, help="natural | pgd-at | mixed-at | trades | mart | rst.", rich_help_panel="train"),
    epochs: Optional[int] = typer.Option(None, help="Training epochs.", rich_help_panel="train"),
    max_steps: Optional[int] = typer.Option(None, help="Stop training after N steps (smoke runs).", rich_help_panel="train"),
    seed: Optional[int] = typer.Option(None, help="Seed (training, fine-tuning, attacks).", rich_help_panel="train"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | auto.", rich_help_panel="train"),
    k: int = typer.Option(1, "--k", help="Prune vectors with <= k non-zeros (0: exact changes only).", rich_help_panel="structure"),
    finetune: int = typer.Option(0, "--finetune", help="Robust fine-tune epochs after pruning.", rich_help_panel="structure"),
    nm: Optional[str] = typer.Option(None, "--nm", help="N:M projection, e.g. 2:4.", rich_help_panel="structure"),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Export target or family alias (rsp export --list-targets) (default: this machine's, e.g. x86-cpu).", rich_help_panel="export"),
    format: Optional[list[str]] = typer.Option(None, "--format", "-f", help="{formats} (default: the target's).", rich_help_panel="export"),
    tune_trials: int = typer.Option(0, "--tune-trials", help="MetaSchedule trials for a CPU TVM library.", rich_help_panel="export"),
    preset: Optional[str] = typer.Option(None, "--preset", help="Verify's evaluation preset, as in rsp verify (default: default).", rich_help_panel="verify"),
    attacks: Optional[list[str]] = typer.Option(None, "--attacks", help="Verify attacks instead of a preset, as in rsp verify.", rich_help_panel="verify"),
    steps: Optional[int] = typer.Option(None, help="Verify PGD steps (default: 50).", rich_help_panel="verify"),
    restarts: Optional[int] = typer.Option(None, help="Verify PGD restarts (default: 10).", rich_help_panel="verify"),
    n_examples: Optional[int] = typer.Option(None, "--n-examples", help="Verify on the first N test images (default: 1000).", rich_help_panel="verify"),
    min_clean_acc: Optional[float] = typer.Option(None, "--min-clean-acc", rich_help_panel="verify"),
    min_robust_acc: Optional[float] = typer.Option(None, "--min-robust-acc", rich_help_panel="verify"),
    max_latency_ms: Optional[float] = typer.Option(None, "--max-latency-ms", rich_help_panel="verify"),
    max_parity_error: Optional[float] = typer.Option(None, "--max-parity-error", rich_help_panel="verify"),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="Gate: the speed-up at batch 1 over the fastest dense runtime here.", rich_help_panel="verify"),
) -> None:
    """Run train -> structure -> export -> verify into one folder; resumes where it stopped.

    With no flags: the embedded digits data set, a small CNN at 90 % sparsity trained with PGD-AT, k = 1
    structuring, ONNX + TVM for this machine, and PGD-50x10 verification with the sanity checks; a few
    minutes on two CPU cores. Exit 0 when verify passes, 1 when a gate fails, 2 for bad input.
    """
    try:
        from . import workflow
        from .config import read_recipe, resolve
        from .export import ExportOptions, ParityError
        from .structure import StructureOptions
        from .train import TrainingError
        from .tvm_build import TVMCompileError
        from .verify import VerifyOptions

        overrides = {k_: v for k_, v in dict(dataset=dataset, data_dir=data_dir, model=model, sparsity=sparsity,
                                             method=method, regrow=regrow, objective=objective, epochs=epochs,
                                             max_steps=max_steps, seed=seed, device=device).items() if v is not None}
        if model_kwargs is not None:
            overrides["model_kwargs"] = _yaml_mapping("--model-kwargs", model_kwargs)
        import pathlib

        saved = pathlib.Path(output) / "train" / "config.yaml"
        ours = saved.is_file() and (saved.parent / "manifest.json").is_file()  # a run's config, not any file
        recipe = read_recipe(config) if config else (read_recipe(str(saved)) if ours else None)
        cfg = resolve(recipe, overrides)
        _check_output(output)
        dev = "cuda" if cfg.device == "cuda" else "cpu"
        s_opts = StructureOptions(k=k, nm=nm, finetune=finetune, data_dir=cfg.data_dir, device=dev, seed=cfg.seed,
                                  n_examples=500, attack_steps=20)
        from .targets import resolve_target

        resolved, why = resolve_target(target or workflow.host_target())
        if why:
            typer.echo(f"target {why}", err=True)
        e_opts = ExportOptions(target=resolved.name, formats=format or None, tune_trials=tune_trials,
                               data_dir=cfg.data_dir)
        gates = {"min_clean_acc": min_clean_acc, "min_robust_acc": min_robust_acc, "max_latency_ms": max_latency_ms,
                 "max_parity_error": max_parity_error, "min_speedup": min_speedup}
        v_opts = VerifyOptions(output="", data_dir=cfg.data_dir, attacks=attacks or None, preset=preset, steps=steps,
                               restarts=restarts, n_examples=n_examples, seed=cfg.seed, device=dev,
                               gates={g: v for g, v in gates.items() if v is not None})
        result = workflow.run(output, cfg, s_opts, e_opts, v_opts, log=lambda m: typer.echo(m, err=True))
    except _bad_input_types() as exc:
        _fail(str(exc))
    except (TrainingError, ParityError, TVMCompileError) as exc:
        _fail(str(exc), code=1)
    except OSError as exc:
        _fail(_os_error_text(exc), code=1)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume", code=130)
    r = result["verify"]
    typer.echo(f"{output}: clean {r['clean_acc']:.4f}, robust {r['robust_acc']:.4f} ({_headline_text(r)}, "
               f"eps {r['eps'] * 255:.3g}/255) on {next(iter(r['backends']))}" + _speed_text(r)
               + (", UNRELIABLE" if r["unreliable"] else "") + ("; gates passed" if r["passed"] else "; FAILED")
               + f"; report {result['stages']['verify']}/report.md")
    if not r["passed"]:
        raise typer.Exit(1)


def _headline_text(result: dict) -> str:
    """"worst case of pgd, apgd-ce, apgd-t (preset default)": what the headline robust accuracy is."""
    return f"worst case of {', '.join(result['attacks'])} (preset {result.get('preset')})"


def _speed_text(result: dict) -> str:
    """", 0.95x vs onnxruntime (the fastest dense runtime here, 0.072 ms); tvm 2.61x": verify's headline
    speed-up (the first backend's) and the bundle's other artifacts' against the same fastest-dense pool, or ""."""
    sp = result.get("speed") or {}
    if sp.get("speedup_vs_fastest_dense") is None:
        return ""
    others = sp.get("other_backends") or {}
    return (f", {sp['speedup_vs_fastest_dense']:.2f}x vs {sp['fastest_dense_runtime']} "
            f"(the fastest dense runtime here, {sp['fastest_dense_p50_ms']:.3f} ms)"
            + "".join(f"; {name} {x:.2f}x" for name, x in others.items()))


from .pseudo_label import EPILOG as _PSEUDO_LABEL_EPILOG, command as _pseudo_label  # noqa: E402  (light: no torch)

app.command("pseudo-label", epilog=_PSEUDO_LABEL_EPILOG)(_pseudo_label)


@app.command()
def models() -> None:
    """List the model registry."""
    from .models import list_models

    for name in list_models():
        typer.echo(name)


def _help_paragraphs(doc: str | None) -> str | None:
    """A docstring with each paragraph on one line. Typer's rich help keeps single line breaks, so a line
    wrapped in the source would end mid-sentence on screen next to the terminal's own wrapping."""
    if not doc:
        return doc
    import inspect

    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


for _command in app.registered_commands:
    _command.callback.__doc__ = _help_paragraphs(_command.callback.__doc__)


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        _exit_past_stuck_connects(exc.code)
        raise
    except BrokenPipeError:
        sys.exit(1)


def _exit_past_stuck_connects(code) -> None:
    """A TVM RPC connect that timed out is still blocked in C++; a normal interpreter exit would abort on it
    (exit 134 instead of the 2 that was meant). Flush and leave without finalising."""
    runtimes = sys.modules.get("rsp.runtimes")
    if runtimes is None or not any(t.is_alive() for t in runtimes.ABANDONED_THREADS):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":
    main()
