"""Data sets as uint8 tensors on the training device, with augmentation done there.

Small vision data sets (CIFAR, SVHN, the embedded digits) fit in device memory many times over,
so rsp keeps them there and augments whole batches with tensor ops: no DataLoader workers, no
per-image Python work per step. Images stay uint8 until a batch is drawn, and come out as float
NCHW in [0, 1]: normalisation lives inside the model.

Readers never execute code from files: the CIFAR pickle reader admits numpy arrays and plain
types only.

Where the data is: --data-dir, else $RSP_DATA_DIR (like $TORCH_HOME: one folder holding
cifar-10-batches-py/, cifar-100-python/, svhn/), else, for a stage reading an earlier stage's folder, the
folder the run was trained on (recorded in its manifest; used only while it still holds the same data).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """Bad or missing data: the message is one line a user can act on."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int  # random-crop padding in pixels (0: no crop)
    hflip: bool  # horizontal flips keep the label (not for digits)
    default_model: str
    class_names: tuple[str, ...] = ()


@dataclass
class Splits:
    """uint8 NCHW images and int64 labels; `val` is cut from the training data, never from test."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str = ""
    meta: dict = field(default_factory=dict)

    def to(self, device) -> "Splits":
        moved = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
        return Splits(info=self.info, source=self.source, meta=self.meta, **moved)


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)

DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, 1, 8, (0.0,), (1.0,), 1, False, "small-cnn", tuple(str(i) for i in range(10))),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, CIFAR_MEAN, CIFAR_STD, 4, True, "vgg16"),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True, "vgg16"),
    "svhn": DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 4, False, "vgg16"),
}
EMBEDDED = "digits"
DATA_DIR_ENV = "RSP_DATA_DIR"


# --- safe pickle reading -----------------------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits the few globals that rebuild numpy arrays; any other class is refused, never imported."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain types are allowed")


def read_pickle_safely(path: Path) -> dict:
    try:
        data = _ArrayOnlyUnpickler(io.BytesIO(Path(path).read_bytes()), encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"missing data file {path}") from None
    except Exception as exc:  # any corrupt or hostile file is bad input, not a crash
        raise DataError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a CIFAR batch (expected a dict, got {type(data).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _cifar_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = read_pickle_safely(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path} is not a CIFAR batch (keys {sorted(d)})")
    x = np.asarray(d["data"])
    y = np.asarray(d[label_key], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(y):
        raise DataError(f"{path}: expected uint8 N x 3072 images and N labels, got {x.dtype} {x.shape} and {y.shape}")
    return x.reshape(-1, 3, 32, 32), y


# Each file-backed data set: the folder its files live in, and the one file that says they are there.
DATA_FOLDERS = {"cifar10": ("cifar-10-batches-py", "data_batch_1"), "cifar100": ("cifar-100-python", "train"),
                "svhn": ("svhn", "train_32x32.mat")}


def _data_root(data_dir: str | None) -> tuple[str | None, str]:
    """(the folder to look in, where it came from): --data-dir wins over $RSP_DATA_DIR."""
    if data_dir:
        return data_dir, "--data-dir"
    env = os.environ.get(DATA_DIR_ENV)
    return (env, DATA_DIR_ENV) if env else (None, "")


def holds_data(path: str | Path, name: str) -> bool:
    """Whether `path` (a data root or the data set's own folder) holds the files of data set `name`."""
    if name not in DATA_FOLDERS:
        return name in DATASETS
    folder, marker = DATA_FOLDERS[name]
    root = Path(path).expanduser()
    return any((cand / marker).is_file() for cand in (root, root / folder))


def _find_folder(data_dir: str | None, folder: str, marker: str) -> Path:
    root_text, origin = _data_root(data_dir)
    if not root_text:
        raise DataError(f"--data-dir is required for this data set (the folder holding {folder}/, or that folder; "
                        f"or set {DATA_DIR_ENV})")
    root = Path(root_text).expanduser()
    for cand in (root, root / folder):
        if (cand / marker).is_file():
            return cand.resolve()  # absolute: manifests record it as the run's data location
    raise DataError(f"no {folder}/ data under {root} ({origin}): expected {root / folder / marker}")


def _load_cifar10(data_dir):
    base = _find_folder(data_dir, *DATA_FOLDERS["cifar10"])
    parts = [_cifar_arrays(base / f"data_batch_{i}", "labels") for i in range(1, 6)]
    tx, ty = _cifar_arrays(base / "test_batch", "labels")
    names = ()
    if (base / "batches.meta").is_file():
        meta = read_pickle_safely(base / "batches.meta")
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", ()))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), tx, ty, base, names


def _load_cifar100(data_dir):
    base = _find_folder(data_dir, *DATA_FOLDERS["cifar100"])
    x, y = _cifar_arrays(base / "train", "fine_labels")
    tx, ty = _cifar_arrays(base / "test", "fine_labels")
    return x, y, tx, ty, base, ()


def _load_svhn(data_dir):
    base = _find_folder(data_dir, *DATA_FOLDERS["svhn"])
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("svhn needs scipy: pip install 'rsp[svhn]'") from None

    def read(name):
        try:
            m = loadmat(base / name)
        except FileNotFoundError:
            raise DataError(f"missing data file {base / name}") from None
        except Exception as exc:
            raise DataError(f"cannot read {base / name}: {exc}") from None
        x = np.ascontiguousarray(np.transpose(m["X"], (3, 2, 0, 1)).astype(np.uint8))
        y = m["y"].reshape(-1).astype(np.int64) % 10  # SVHN stores digit 0 as label 10
        return x, y

    x, y = read("train_32x32.mat")
    tx, ty = read("test_32x32.mat")
    return x, y, tx, ty, base, ()


def _load_digits(_data_dir):
    """scikit-learn's bundled 8x8 digits (1797 real scans): the embedded default, no download."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 grey levels -> uint8
    y = d.target.astype(np.int64)
    # Fixed train/test cut (first 80 % / last 20 % of the file order), like a shipped test set.
    n_test = len(x) // 5
    return x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:], Path("sklearn.datasets.load_digits"), ()


_LOADERS = {"digits": _load_digits, "cifar10": _load_cifar10, "cifar100": _load_cifar100, "svhn": _load_svhn}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def load_dataset(name: str, data_dir: str | None = None, *, val_fraction: float = 0.1, split_seed: int = 0) -> Splits:
    """Train/val/test splits; val is a seeded random cut of the training data (stratified by class)."""
    info = dataset_info(name)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    x, y, tx, ty, source, names = _LOADERS[name](data_dir)
    if names:
        info = DatasetInfo(**{**info.__dict__, "class_names": names})
    if y.min() < 0 or y.max() >= info.num_classes or ty.min() < 0 or ty.max() >= info.num_classes:
        raise DataError(f"{name}: labels outside 0..{info.num_classes - 1} in {source}")
    val_idx = _stratified_val_indices(y, val_fraction, split_seed)
    keep = np.ones(len(y), dtype=bool)
    keep[val_idx] = False
    t = torch.from_numpy
    splits = Splits(
        info=info,
        train_x=t(np.ascontiguousarray(x[keep])),
        train_y=t(y[keep]),
        val_x=t(np.ascontiguousarray(x[val_idx])),
        val_y=t(y[val_idx]),
        test_x=t(np.ascontiguousarray(tx)),
        test_y=t(ty),
        source=str(source),
    )
    splits.meta = {
        "dataset": name,
        "source": str(source),
        "n_train": int(keep.sum()),
        "n_val": int(len(val_idx)),
        "n_test": int(len(ty)),
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "val_indices_sha256": hashlib.sha256(np.sort(val_idx).astype(np.int64).tobytes()).hexdigest(),
    }
    return splits


# What a run's manifest records of its data that a reload must reproduce: the same files give the same counts
# and the same validation cut (its indices' hash depends on every training label).
SPLIT_FINGERPRINT = ("n_train", "n_val", "n_test", "val_indices_sha256")


def load_run_dataset(recorded: dict, data_dir: str | None = None, name: str | None = None) -> Splits:
    """The data set a run was trained on, with its validation cut, for a later stage.

    `recorded` is the run's manifest["dataset"]. The data comes from --data-dir, else $RSP_DATA_DIR, else
    the folder the run was trained on (recorded["source"]): that hint is used only while it still holds the
    data set and the same data (SPLIT_FINGERPRINT); otherwise one line says it moved or changed.
    `name` (e.g. verify --dataset) may ask for another data set, which the hint does not cover.
    """
    recorded = recorded or {}
    trained_on = recorded.get("dataset", EMBEDDED)
    name = name or trained_on
    split = dict(val_fraction=recorded.get("val_fraction", 0.1), split_seed=recorded.get("split_seed", 0))
    hint = recorded.get("source")
    if data_dir or _data_root(None)[0] or name not in DATA_FOLDERS or name != trained_on or not hint:
        return load_dataset(name, data_dir, **split)
    if not holds_data(hint, name):
        raise DataError(f"the run was trained on {name} data in {hint}, which no longer holds it (moved?): "
                        f"pass --data-dir or set {DATA_DIR_ENV}")
    splits = load_dataset(name, hint, **split)
    changed = [k for k in SPLIT_FINGERPRINT if k in recorded and splits.meta.get(k) != recorded[k]]
    if changed:
        k = changed[0]
        raise DataError(f"{hint} no longer holds the {name} data the run was trained on ({k} "
                        f"{splits.meta.get(k)} here, {recorded[k]} recorded): pass --data-dir or set {DATA_DIR_ENV}")
    return splits


def _stratified_val_indices(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    if fraction == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        out.append(idx[: max(1, int(round(fraction * len(idx))))])
    return np.sort(np.concatenate(out))


def load_extra_data(path: str, info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labelled extra images for RST: .npz or .safetensors with `images` (uint8 NCHW or NHWC) and `labels`."""
    p = Path(path)
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                images, labels = z["images"], z["labels"]
        elif p.suffix == ".safetensors":
            from safetensors.numpy import load_file

            z = load_file(str(p))
            images, labels = z["images"], z["labels"]
        else:
            raise DataError(f"--extra-data must be a .npz or .safetensors file, got {p.name}")
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"missing extra-data file {p}") from None
    except Exception as exc:
        raise DataError(f"cannot read extra data {p}: {exc}") from None
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == info.in_channels and images.shape[1] != info.in_channels:
        images = images.transpose(0, 3, 1, 2)
    want = (info.in_channels, info.image_size, info.image_size)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise DataError(f"extra data {p}: expected uint8 images N x {want}, got {images.dtype} {images.shape}")
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != len(images) or labels.min() < 0 or labels.max() >= info.num_classes:
        raise DataError(f"extra data {p}: need one label in 0..{info.num_classes - 1} per image")
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


# --- batches on the device ----------------------------------------------------------------------


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(255.0)


def augment(x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per image, as whole-batch tensor ops."""
    n, _, h, w = x.shape
    if padding > 0:
        xp = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        off = torch.randint(0, 2 * padding + 1, (2, n), device=x.device, generator=generator)
        rows = (off[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (off[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[batch, chan, rows, cols]
    if hflip:
        flip = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


class DeviceBatches:
    """Shuffled (optionally augmented) batches from device-resident uint8 tensors.

    The permutation and the augmentation draw from `generator`, whose state the trainer checkpoints:
    that is what makes a resumed run repeat an uninterrupted one bit for bit.
    """

    def __init__(self, x, y, batch_size, *, generator=None, shuffle=False, augment_with: DatasetInfo | None = None,
                 drop_last=False):
        self.x, self.y, self.batch_size = x, y, int(batch_size)
        self.generator, self.shuffle, self.info, self.drop_last = generator, shuffle, augment_with, drop_last

    def __len__(self):
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, device=self.x.device, generator=self.generator) if self.shuffle else None
        for b in range(len(self)):
            sl = slice(b * self.batch_size, min(n, (b + 1) * self.batch_size))
            idx = order[sl] if order is not None else None
            xb = to_float(self.x[idx] if idx is not None else self.x[sl])
            yb = self.y[idx] if idx is not None else self.y[sl]
            if self.info is not None:
                xb = augment(xb, self.info.crop_padding, self.info.hflip, self.generator)
            yield xb, yb
