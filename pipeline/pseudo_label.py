"""`rsp pseudo-label`: the extra data of RST (Carmon et al. 2019) made from any unlabeled images.

RST trains on labelled data plus unlabeled images labelled by a standard, naturally trained classifier:
each image gets the class of the labeller's largest logit (hard labels, every image kept, as the reference's
generate_pseudolabels.py does). The output is a folder, sealed like every stage folder (one writer, files
renamed into place, manifest.json written last):

  pseudo_labeled.safetensors  images (uint8 N x C x H x W, the pixels as read) and labels (int64)
  manifest.json               stage pseudo-label: the labeller (folder, objective, sha256 of its manifest and
                              weights, test accuracy), the input (path, layout, sha256 of each file read), the
                              class counts, and the agreement with the input's own labels where it has them

`rsp train --objective rst --extra-data FOLDER` reads it. Why not the pickle the 500 K TinyImages set is
distributed as: rsp writes no pickles into its folders (reading a pickle can run code; safetensors cannot).
--write-pickle adds that layout beside it, for tools that read only it (Carmon et al.'s code); rsp itself
reads a pickle only through its restricted unpickler.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import typer

PICKLE_FILE = "pseudo_labeled.pickle"  # --write-pickle: Carmon et al.'s layout (data NHWC, extrapolated_targets)
LABELLER_STAGES = ("train", "structure")  # folders holding a model to label with, and its test accuracy


@dataclass
class PseudoLabelOptions:
    split: str = "train"  # a CIFAR-layout folder's images: train | test | all
    batch_size: int = 512
    device: str = "cpu"
    threads: Optional[int] = None
    write_pickle: bool = False


def predict_labels(model, images, batch_size: int, device: str):
    """argmax of the logits per image, in batches; images uint8 N x C x H x W (numpy)."""
    import torch

    from .data import to_float

    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            xb = to_float(torch.from_numpy(images[i:i + batch_size]).to(device))
            out.append(model(xb).argmax(1).cpu())
    return torch.cat(out).to(torch.int64)


def run(model_dir: str | Path, images: str | Path, output: str | Path, opts: PseudoLabelOptions | None = None,
        log: Callable[[str], None] = lambda message: None) -> dict:
    """Label `images` with the model in `model_dir` and seal the result in `output`; returns its manifest."""
    import numpy as np
    import torch

    from . import __version__
    from .artifacts import (MODEL_FILE, ArtifactError, StageOutput, atomic_write_bytes, load_model, read_manifest,
                            require_complete, sha256_bytes, sha256_file, tensors_bytes)
    from .config import ConfigError
    from .data import (IMAGE_SPLITS, PSEUDO_LABEL_FILE, PSEUDO_LABEL_STAGE, DataError, fit_images, fit_labels,
                       read_image_set)

    opts = opts or PseudoLabelOptions()
    if opts.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.split not in IMAGE_SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(IMAGE_SPLITS)}, got {opts.split!r}")
    source, output = Path(model_dir), Path(output)
    manifest = read_manifest(source)
    if manifest["stage"] not in LABELLER_STAGES:
        raise ArtifactError(f"{source} is an rsp {manifest['stage']} folder; the labeller is a "
                            f"{' or '.join(LABELLER_STAGES)} folder")
    require_complete(source, manifest)
    shape = list((manifest.get("input") or {}).get("shape") or [])
    dataset = dict(manifest.get("dataset") or {})
    num_classes = dataset.get("num_classes") or manifest["model"].get("kwargs", {}).get("num_classes")
    if len(shape) != 3 or not isinstance(num_classes, int):
        raise ArtifactError(f"{source}/manifest.json does not say the model's input shape (C, H, W) and classes")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    model = load_model(source, device=opts.device)  # checks model.safetensors against its sha256

    found = read_image_set(images, split=opts.split)
    x = fit_images(found.images, tuple(shape), str(images))
    truth, truth_note = None, None
    if found.labels is not None:
        try:
            truth = fit_labels(found.labels, len(x), num_classes, str(images))
        except DataError as exc:  # labels of other classes (CIFAR-100 for a 10-class model): no agreement figure
            truth_note = str(exc)
    if manifest.get("objective") not in (None, "natural"):
        log(f"note: {source} was trained with --objective {manifest['objective']}; RST labels with a naturally "
            "trained model (Carmon et al. 2019)")

    held = StageOutput.open(output)  # the one writer of output until it is sealed
    log(f"labelling {len(x)} images with {manifest['model']['name']} from {source}")
    labels = predict_labels(model, x, opts.batch_size, opts.device)
    counts = np.bincount(labels.numpy(), minlength=num_classes)
    agreement = float((labels.numpy() == truth).mean()) if truth is not None else None

    labeller = {"path": str(source.resolve()), "stage": manifest["stage"], "objective": manifest.get("objective"),
                "manifest_sha256": sha256_file(source / "manifest.json"),
                "model_sha256": manifest.get("files", {}).get(MODEL_FILE) or sha256_file(source / MODEL_FILE),
                "test_clean_acc": (manifest.get("metrics") or {}).get("clean_acc")}
    data = tensors_bytes({"images": torch.from_numpy(x), "labels": labels},
                         # one key: safetensors writes its metadata in hash order, and rsp's files are byte-stable
                         metadata={"labelled_by": f"{labeller['path']} (model.safetensors sha256 "
                                                  f"{labeller['model_sha256']})"})
    atomic_write_bytes(output / PSEUDO_LABEL_FILE, data)
    files = {PSEUDO_LABEL_FILE: sha256_bytes(data)}
    if opts.write_pickle:  # asked for by name: the distributed layout, for tools that read only it
        import pickle

        blob = pickle.dumps({"data": np.ascontiguousarray(x.transpose(0, 2, 3, 1)),
                             "extrapolated_targets": labels.numpy(), "prediction_model": labeller["path"]}, protocol=4)
        atomic_write_bytes(output / PICKLE_FILE, blob)
        files[PICKLE_FILE] = sha256_bytes(blob)
    out = {
        "stage": PSEUDO_LABEL_STAGE,
        "status": "complete",
        "rsp_version": __version__,
        "model": manifest["model"],  # the labeller's architecture: read_manifest's contract, not a model file here
        "labeller": labeller,
        "dataset": dataset,  # what the labels mean: rsp train refuses them for another data set
        "input": {"shape": shape},
        "images": {"path": str(Path(images).resolve()), "layout": found.layout, "split": found.meta.get("split"),
                   "n": len(x), "files": {str(f): sha256_file(f) for f in found.files}},
        "labels": {"rule": "argmax of the labeller's logits (hard labels, every image kept)",
                   "class_counts": counts.tolist(),
                   "agreement_with_input_labels": agreement,
                   **({"input_labels_unused": truth_note} if truth_note else {})},
    }
    return held.seal(out, files)


EPILOG = ("Examples:\n\n"
          "  rsp pseudo-label runs/natural unlabeled.npz -o runs/pseudo            # an .npz with an images array\n\n"
          "  rsp pseudo-label runs/natural ~/data/cifar-10-batches-py --split test -o runs/pseudo\n\n"
          "  rsp train --objective rst --extra-data runs/pseudo --output runs/rst   # RST on the labelled set")


def command(
    model_dir: str = typer.Argument(..., help="The labeller: a naturally trained `rsp train` (or structure) folder."),
    images: str = typer.Argument(..., help="Unlabeled images: .npz or .safetensors with `images`, a pickled set "
                                           "(.pickle, a CIFAR batch file), or a CIFAR-layout folder."),
    output: str = typer.Option(..., "--output", "-o", help="New folder: pseudo_labeled.safetensors (images, labels) "
                                                            "and manifest.json."),
    split: str = typer.Option("train", help="A CIFAR-layout folder's images to label: train | test | all."),
    batch_size: int = typer.Option(512, "--batch-size", help="Images per forward pass."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch."),
    write_pickle: bool = typer.Option(False, "--write-pickle", help=f"Also write {PICKLE_FILE} in the layout the "
                                      "500 K set is distributed in (data N x H x W x C, extrapolated_targets), for "
                                      "Carmon et al.'s code; rsp reads the safetensors file."),
) -> None:
    """Label unlabeled images with a trained model, as RST does (Carmon et al. 2019): the --extra-data of
    rsp train --objective rst.

    Each image gets the class of the model's largest logit. The folder records the model and its sha256, the
    input files and theirs, the class counts, and, where the input has labels (a CIFAR folder), how often the
    pseudo-labels agree with them.
    """
    from .cli import _bad_input_types, _check_device, _check_output, _check_threads, _fail, _os_error_text

    _check_device(device)
    _check_threads(threads)
    _check_output(output)
    opts = PseudoLabelOptions(split=split, batch_size=batch_size, device=device, threads=threads,
                              write_pickle=write_pickle)
    try:
        m = run(model_dir, images, output, opts, log=lambda message: typer.echo(message, err=True))
    except _bad_input_types() as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(_os_error_text(exc), code=1)
    agree = m["labels"]["agreement_with_input_labels"]
    typer.echo(f"{output}: {m['images']['n']} images labelled by {m['model']['name']} ({m['labeller']['path']}); "
               f"class counts {m['labels']['class_counts']}"
               + (f"; agreement with the input's labels {agree:.4f}" if agree is not None else ""))
