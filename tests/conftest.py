import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

CIFAR_SUBSET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar-10-subset"


@pytest.fixture(scope="session")
def cifar_dir():
    """The real CIFAR-10 subset shipped beside the repo (../shared/data); tests skip where it is absent."""
    path = Path(os.environ.get("RSP_CIFAR_DIR", CIFAR_SUBSET))
    if not (path / "cifar-10-batches-py" / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {path}")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
