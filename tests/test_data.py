"""Data readers and the device-resident batch pipeline."""

import os
import pickle

import numpy as np
import pytest
import torch

from rsp.data import (DataError, DeviceBatches, augment, dataset_info, fit_images, fit_labels, load_dataset,
                      load_extra_data, read_image_set, read_pickle_safely)


def test_cifar10_subset_reads_with_val_cut_from_train(cifar_dir):
    s = load_dataset("cifar10", str(cifar_dir), val_fraction=0.1)
    assert s.train_x.dtype == torch.uint8 and s.train_x.shape[1:] == (3, 32, 32)
    assert len(s.train_y) + len(s.val_y) == 5085 and len(s.test_y) == 517
    assert 480 <= len(s.val_y) <= 530
    assert set(s.val_y.tolist()) == set(range(10))  # stratified: every class in validation
    # the folder itself works as well as its parent (torchvision's root)
    s2 = load_dataset("cifar10", str(cifar_dir / "cifar-10-batches-py"), val_fraction=0.1)
    assert torch.equal(s.val_x, s2.val_x)
    assert s.meta["val_indices_sha256"] == s2.meta["val_indices_sha256"]
    # train and val are disjoint pieces of the training data
    tr = {bytes(r) for r in s.train_x.reshape(len(s.train_x), -1).numpy()[:500]}
    va = {bytes(r) for r in s.val_x.reshape(len(s.val_x), -1).numpy()}
    assert not tr & va
    assert s.info.class_names[0] == "airplane"


def test_pickle_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match="refusing"):
        read_pickle_safely(bad)
    assert not (tmp_path / "pwned").exists()


def test_missing_and_corrupt_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path))
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(DataError, match="--data-dir is required"):
        load_dataset("cifar10", None)
    with pytest.raises(DataError, match="unknown data set"):
        dataset_info("imagenet")


def test_embedded_digits_need_no_download():
    s = load_dataset("digits")
    assert s.train_x.shape[1:] == (1, 8, 8) and s.info.num_classes == 10
    assert len(s.train_y) + len(s.val_y) + len(s.test_y) == 1797
    assert s.train_x.max() == 255


def test_augment_is_crop_and_flip_of_the_same_image():
    x = torch.rand(64, 3, 8, 8)
    out = augment(x, 2, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(64):  # each output is a shifted (zero-filled) and maybe flipped window of its input
        xp = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        found = any(torch.equal(out[i], cand[:, dy:dy + 8, dx:dx + 8])
                    for cand in (xp, xp.flip(2)) for dy in range(5) for dx in range(5))
        assert found
    again = augment(x, 2, True, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # determined by the generator


def test_device_batches_cover_every_example_once_per_epoch():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    y = torch.arange(10)
    b = DeviceBatches(x, y, 3, generator=torch.Generator().manual_seed(0), shuffle=True)
    seen = torch.cat([yb for _, yb in b])
    assert sorted(seen.tolist()) == list(range(10))
    for xb, yb in b:
        assert torch.allclose(xb[:, 0, 0, 0] * 255, yb.float())  # labels follow their images
        assert xb.dtype == torch.float32 and xb.max() <= 1
    assert len(DeviceBatches(x, y, 3, drop_last=True)) == 3


def test_extra_data_for_rst(tmp_path):
    info = dataset_info("cifar10")
    np.savez(tmp_path / "extra.npz", images=np.zeros((5, 32, 32, 3), np.uint8), labels=np.arange(5))
    ex, ey = load_extra_data(str(tmp_path / "extra.npz"), info)
    assert ex.shape == (5, 3, 32, 32) and ey.tolist() == [0, 1, 2, 3, 4]
    np.savez(tmp_path / "bad.npz", images=np.zeros((5, 16, 16, 3), np.uint8), labels=np.arange(5))
    with pytest.raises(DataError, match="expected uint8 images"):
        load_extra_data(str(tmp_path / "bad.npz"), info)
    with pytest.raises(DataError):
        load_extra_data(str(tmp_path / "missing.npz"), info)


def _ti_pickle(protocol: int, numpy1_names: bool = False) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A small set in the layout ti_500K_pseudo_labeled.pickle is distributed in (Carmon et al. 2019)."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    targets = np.array([0, 1, 2, 3, 4, 9])
    blob = pickle.dumps({"data": data, "extrapolated_targets": targets, "ti_index": np.arange(6)}, protocol=protocol)
    if numpy1_names:  # the 2019 file was written by numpy 1.x, whose arrays name numpy.core
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return blob, data, targets


@pytest.mark.parametrize("protocol,numpy1", [(2, True), (3, False), (4, False), (5, False)])
def test_rst_pickle_layout_loads_as_extra_data(tmp_path, protocol, numpy1):
    blob, data, targets = _ti_pickle(protocol, numpy1)
    path = tmp_path / "ti_500K_pseudo_labeled.pickle"
    path.write_bytes(blob)
    ex, ey = load_extra_data(str(path), dataset_info("cifar10"))
    assert ex.shape == (6, 3, 32, 32) and ey.tolist() == targets.tolist()
    assert np.array_equal(ex.numpy().transpose(0, 2, 3, 1), data)  # HWC pixels land in their CHW places


def test_rst_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "ti_500K_pseudo_labeled.pickle"
    bad.write_bytes(pickle.dumps({"data": Evil(), "extrapolated_targets": [0]}))
    with pytest.raises(DataError, match="refusing to load posix.system"):
        load_extra_data(str(bad), dataset_info("cifar10"))
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "targets_only.pickle").write_bytes(pickle.dumps({"extrapolated_targets": np.zeros(3, np.int64)}))
    with pytest.raises(DataError, match="needs `data`"):  # generate_pseudolabels.py's targets-only output
        load_extra_data(str(tmp_path / "targets_only.pickle"), dataset_info("cifar10"))


def test_image_set_layouts_and_their_errors(tmp_path, cifar_dir):
    test = read_image_set(cifar_dir, split="test")  # a CIFAR folder: the images rsp pseudo-label may label
    assert test.layout == "cifar folder" and len(test.images) == 517 and len(test.labels) == 517
    assert len(read_image_set(cifar_dir / "cifar-10-batches-py", split="all").labels) == 5085 + 517
    one = read_image_set(cifar_dir / "cifar-10-batches-py" / "test_batch")  # a batch file, no suffix
    assert np.array_equal(fit_images(one.images, (3, 32, 32), "x"), fit_images(test.images, (3, 32, 32), "x"))
    with pytest.raises(DataError, match="not an image set"):  # extra data must be pseudo-labelled, not a CIFAR folder
        load_extra_data(str(cifar_dir), dataset_info("cifar10"))
    with pytest.raises(DataError, match="got float32"):
        fit_images(np.zeros((2, 3, 32, 32), np.float32), (3, 32, 32), "x")
    with pytest.raises(DataError, match="labels must be integers"):
        fit_labels(np.zeros(2, np.float32), 2, 10, "x")
    with pytest.raises(DataError, match="need one label in 0..9"):
        fit_labels(np.array([0, 10]), 2, 10, "x")
    (tmp_path / "images.csv").write_text("1,2,3")
    with pytest.raises(DataError, match="unknown image-set layout '.csv'"):
        read_image_set(tmp_path / "images.csv")
