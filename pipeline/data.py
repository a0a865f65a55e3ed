"""Data sets as uint8 tensors on the training device, with augmentation done there.

Small vision data sets (CIFAR, SVHN, the embedded digits) fit in device memory many times over,
so rsp keeps them there and augments whole batches with tensor ops: no DataLoader workers, no
per-image Python work per step. Images stay uint8 until a batch is drawn, and come out as float
NCHW in [0, 1]: normalisation lives inside the model.

Readers never execute code from files: the one pickle reader (CIFAR batches, the RST pseudo-labelled
set as Carmon et al. distribute it) admits numpy arrays and plain types only.

Where the data is: --data-dir, else $RSP_DATA_DIR (like $TORCH_HOME: one folder holding
cifar-10-batches-py/, cifar-100-python/, svhn/), else, for a stage reading an earlier stage's folder, the
folder the run was trained on (recorded in its manifest; used only while it still holds the same data).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import defaults


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
    ("numpy.core.numeric", "_frombuffer"),  # how numpy pickles arrays at protocol 5 (bytes -> array, no objects)
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits the few globals that rebuild numpy arrays; any other class is refused, never imported."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain types are allowed")


def read_pickle_safely(path: Path, what: str = "a CIFAR batch") -> dict:
    """A pickled dict (str keys), read without running code: CIFAR batches, the RST pseudo-labelled set."""
    try:
        with open(path, "rb") as f:  # streamed: the 500 K pseudo-labelled set is 1.5 GB
            data = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"missing data file {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, expected {what} file") from None
    except Exception as exc:  # any corrupt or hostile file is bad input, not a crash
        raise DataError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not {what} (expected a dict, got {type(data).__name__})")
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


def load_dataset(name: str, data_dir: str | None = None, *, val_fraction: float = defaults.VAL_FRACTION,
                 split_seed: int = defaults.SPLIT_SEED) -> Splits:
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
    split = dict(val_fraction=recorded.get("val_fraction", defaults.VAL_FRACTION),
                 split_seed=recorded.get("split_seed", defaults.SPLIT_SEED))
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


# --- image sets in files: RST's extra data, and the images rsp pseudo-label labels -------------------------

PSEUDO_LABEL_STAGE = "pseudo-label"  # the stage name of an `rsp pseudo-label` folder
PSEUDO_LABEL_FILE = "pseudo_labeled.safetensors"
# The label keys a pickled image set may hold, the first one present wins: the RST set's, CIFAR-10's, CIFAR-100's.
PICKLE_LABEL_KEYS = ("extrapolated_targets", "labels", "fine_labels")
# A CIFAR-layout folder's batch files by split (CIFAR-10's names, then CIFAR-100's); the first split that
# finds files wins.
CIFAR_SPLIT_FILES = {"train": ([f"data_batch_{i}" for i in range(1, 6)], ["train"]),
                     "test": (["test_batch"], ["test"])}
IMAGE_SPLITS = ("train", "test", "all")

# Every layout an image set can come in: name -> what it holds (help texts and errors list these).
IMAGE_SET_LAYOUTS = {
    "npz": ".npz (read without pickled objects) with `images` (uint8 N x C x H x W or N x H x W x C) and `labels`",
    "safetensors": ".safetensors with `images` and `labels`, as .npz",
    "pickle": ".pickle/.pkl or a CIFAR batch file: a pickled dict with `data` and `extrapolated_targets` (the layout "
              "ti_500K_pseudo_labeled.pickle of Carmon et al. 2019 is distributed in: uint8 N x 32 x 32 x 3) or "
              "`labels`, read by the restricted unpickler (numpy arrays and plain types only)",
    "pseudo-label folder": "an `rsp pseudo-label` output folder (its manifest and sha256-checked safetensors)",
    "cifar folder": "a CIFAR-layout folder (cifar-10-batches-py, cifar-100-python, or the folder above it): "
                    "input of rsp pseudo-label only",
}


@dataclass
class ImageSet:
    """Images as stored (uint8 N x C x H x W, N x H x W x C, or CIFAR rows N x 3072) and labels where the set
    has them; `files` are the files read, in order (what is made from them records their sha256)."""

    images: np.ndarray
    labels: np.ndarray | None
    layout: str
    files: tuple[Path, ...]
    meta: dict = field(default_factory=dict)


def _arrays_file(p: Path) -> dict[str, np.ndarray]:
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:  # an object array inside is refused, not unpickled
            return {k: z[k] for k in z.files}
    from safetensors.numpy import load_file

    return load_file(str(p))


def _pickled_set(p: Path) -> ImageSet:
    d = read_pickle_safely(p, what="a pickled image set")
    if "data" not in d:
        raise DataError(f"{p}: a pickled image set needs `data` (and `extrapolated_targets` or `labels`), "
                        f"found keys {sorted(map(str, d))}")
    key = next((k for k in PICKLE_LABEL_KEYS if k in d), None)
    return ImageSet(d["data"], None if key is None else d[key], "pickle", (p,))


def _cifar_folder_set(p: Path, split: str) -> ImageSet | None:
    """The batches of a CIFAR-layout folder (None: `p` is not one)."""
    splits = ("train", "test") if split == "all" else (split,)
    for cand in (p, p / "cifar-10-batches-py", p / "cifar-100-python"):
        for layout in range(2):  # CIFAR-10's file names, then CIFAR-100's
            names = [n for s in splits for n in CIFAR_SPLIT_FILES[s][layout]]
            files = [cand / n for n in names if (cand / n).is_file()]
            if files:
                parts = [_pickled_set(f) for f in files]
                if any(s.labels is None for s in parts):
                    raise DataError(f"{cand}: a CIFAR batch without labels")
                return ImageSet(np.concatenate([np.asarray(s.images) for s in parts]),
                                np.concatenate([np.asarray(s.labels).reshape(-1) for s in parts]), "cifar folder",
                                tuple(files), {"split": split})
    return None


def _pseudo_label_folder(p: Path) -> ImageSet:
    from .artifacts import ArtifactError, check_files, read_manifest, require_complete

    try:
        m = read_manifest(p)
        if m["stage"] != PSEUDO_LABEL_STAGE:
            raise ArtifactError(f"{p} is an rsp {m['stage']} folder, not an image set (make one with rsp pseudo-label)")
        require_complete(p, m)
        problems = check_files(p, m)
    except ArtifactError as exc:
        raise DataError(str(exc)) from None
    if PSEUDO_LABEL_FILE not in m.get("files", {}) or problems:
        raise DataError(f"{p}: {problems[0] if problems else PSEUDO_LABEL_FILE + ' is not in its manifest'}")
    try:
        z = _arrays_file(p / PSEUDO_LABEL_FILE)
    except Exception as exc:
        raise DataError(f"cannot read {p / PSEUDO_LABEL_FILE}: {exc}") from None
    if "images" not in z or "labels" not in z:
        raise DataError(f"{p / PSEUDO_LABEL_FILE}: needs `images` and `labels` (found {sorted(z)})")
    return ImageSet(z["images"], z["labels"], "pseudo-label folder", (p / PSEUDO_LABEL_FILE,), m)


def read_image_set(path: str | Path, split: str = "train", cifar_folders: bool = True) -> ImageSet:
    """An image set in any of IMAGE_SET_LAYOUTS, as stored; split picks a CIFAR-layout folder's images."""
    p = Path(path).expanduser()
    if split not in IMAGE_SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(IMAGE_SPLITS)}")
    layouts = ", ".join(k for k in IMAGE_SET_LAYOUTS if cifar_folders or k != "cifar folder")
    if p.is_dir():
        if (p / "manifest.json").is_file():
            return _pseudo_label_folder(p)
        if (p / PSEUDO_LABEL_FILE).exists():  # the manifest is written last: without it the folder is not sealed
            raise DataError(f"{p} holds {PSEUDO_LABEL_FILE} but no manifest.json: an rsp pseudo-label run that did "
                            "not finish; run it again")
        found = _cifar_folder_set(p, split) if cifar_folders else None
        if found is None:
            raise DataError(f"{p} is a folder but not an image set; expected one of: {layouts}")
        return found
    if not p.is_file():
        raise DataError(f"missing image file {p}")
    suffix = p.suffix.lower()
    if suffix in (".pickle", ".pkl"):
        return _pickled_set(p)
    if not suffix:  # CIFAR batches (data_batch_1, test_batch) have no suffix: known by pickle's protocol byte
        with open(p, "rb") as f:
            if f.read(1) == b"\x80":
                return _pickled_set(p)
    if suffix not in (".npz", ".safetensors"):
        kind = repr(p.suffix) if suffix else "(no suffix, not a pickle)"
        raise DataError(f"{p}: unknown image-set layout {kind}; expected one of: {layouts}")
    try:
        z = _arrays_file(p)
    except Exception as exc:  # a corrupt, truncated or object-holding file is bad input
        raise DataError(f"cannot read {p}: {exc}") from None
    if "images" not in z:
        raise DataError(f"{p}: no `images` array (found {sorted(z)})")
    return ImageSet(z["images"], z.get("labels"), suffix[1:], (p,))


def fit_images(images, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """uint8 N x C x H x W from N x C x H x W, N x H x W x C or CIFAR rows (N x C*H*W, channel planes)."""
    x = np.asarray(images)
    c, h, w = shape
    if x.dtype == np.uint8 and len(x) > 0:
        if x.ndim == 2 and x.shape[1] == c * h * w:
            return x.reshape(-1, c, h, w)
        if x.ndim == 4 and tuple(x.shape[1:]) == (c, h, w):
            return np.ascontiguousarray(x)
        if x.ndim == 4 and tuple(x.shape[1:]) == (h, w, c):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataError(f"{where}: expected uint8 images N x {c} x {h} x {w} (or N x {h} x {w} x {c}), "
                    f"got {x.dtype} {'x'.join(map(str, x.shape)) or 'scalar'}")


def fit_labels(labels, n: int, num_classes: int, where: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got {y.dtype}")
    y = y.reshape(-1).astype(np.int64)
    if len(y) != n or y.min(initial=0) < 0 or y.max(initial=0) >= num_classes:
        raise DataError(f"{where}: need one label in 0..{num_classes - 1} per image ({n} images, {len(y)} labels)")
    return y


def load_extra_data(path: str, info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labelled extra images for RST, in any labelled layout of IMAGE_SET_LAYOUTS (not a CIFAR folder)."""
    s = read_image_set(path, cifar_folders=False)
    where = f"extra data {path}"
    made_for = ((s.meta.get("dataset") or {}).get("dataset")) if s.layout == "pseudo-label folder" else None
    if made_for and made_for != info.name:  # same shapes, other classes (cifar10 vs svhn): labels would lie
        raise DataError(f"{where} was labelled by a {made_for} model; this run trains on {info.name}")
    if s.labels is None:
        raise DataError(f"{where} holds no labels: label it first with rsp pseudo-label MODEL_DIR {path} -o FOLDER")
    images = fit_images(s.images, (info.in_channels, info.image_size, info.image_size), where)
    labels = fit_labels(s.labels, len(images), info.num_classes, where)
    return torch.from_numpy(images), torch.from_numpy(labels)


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
