"""The target registry's capabilities, a board added as one YAML file, and the one nvcc lookup."""

import os
import stat
import textwrap

import pytest

from rsp import targets
from rsp.artifacts import ArtifactError
from rsp.kernels import toolchain
from helpers import rsp_cli

BOARD = textwrap.dedent("""\
    name: test-board
    description: a throwaway board for the registry test
    cpu: {triple: aarch64-linux-gnu, mcpu: cortex-a78ae, cross_compiler: aarch64-linux-gnu-g++}
    gpu: cuda
    cuda: {arch: [sm_87]}
    sparse_kernels: [cuda]
    tvm: {tag: nvidia/jetson-orin-nano}
    boards: [Test Board Model]
    """)


def test_shipped_targets_declare_their_capabilities():
    reg = targets.targets()
    orin, x86, arm = reg["jetson-orin-nano"], reg["x86-cpu"], reg["arm64-cpu"]
    assert (orin.gpu_api, orin.sparse_kernels, orin.family, orin.cuda_arch) == ("cuda", ("cuda",), "jetson", ("sm_87",))
    assert (x86.gpu_api, x86.sparse_kernels, x86.host_default) == (None, ("cpu",), True)
    assert arm.sparse_kernels == ("cpu",) and not arm.host_default
    for t in reg.values():  # has_cuda, as tests and old code read it, is the declared GPU API
        assert t.has_cuda == (t.gpu_api == "cuda") == bool(t.cuda_arch)


def test_a_board_is_one_yaml_file(tmp_path, monkeypatch):
    (tmp_path / "test-board.yaml").write_text(BOARD)
    monkeypatch.setenv(targets.TARGETS_PATH_ENV, str(tmp_path))
    assert targets.target_dirs()[-1] == tmp_path
    board = targets.get_target("test-board")
    assert board.gpu_api == "cuda" and board.sparse_kernels == ("cuda",) and board.family is None
    model = tmp_path / "model"
    model.write_bytes(b"Test Board Model rev 2\x00")
    monkeypatch.setattr(targets, "DEVICE_TREE_MODEL", model)
    monkeypatch.setattr(targets.platform, "machine", lambda: "aarch64")
    assert targets.host_target_name() == "test-board"  # the running board, by its detected model
    r = rsp_cli("export", "--list-targets", env={**os.environ, targets.TARGETS_PATH_ENV: str(tmp_path)})
    assert r.returncode == 0, r.stderr
    names = [ln.split()[0] for ln in r.stdout.strip().split("\n\n")[0].splitlines()]
    assert "test-board" in names and "jetson-orin-nano" in names
    (tmp_path / "x86-cpu.yaml").write_text(BOARD.replace("test-board", "x86-cpu"))  # seen without a restart
    with pytest.raises(ArtifactError, match="'x86-cpu' is defined twice"):
        targets.targets()


@pytest.mark.parametrize("change, match", [
    (("gpu: cuda\n", ""), "gpu: cuda and a cuda.arch list go together"),
    (("sparse_kernels: [cuda]", "sparse_kernels: [fast]"), "unknown sparse kernels 'fast'"),
    (("[sm_87]", "[sm87]"), "cuda.arch entries are sm_XY names"),
    (("boards: [Test Board Model]", "boards: Test Board Model"), "boards must be a list of board model names"),
    (("name: test-board", "name: [oops"), "cannot read it"),
])
def test_a_bad_target_file_is_one_line_naming_it(tmp_path, monkeypatch, change, match):
    (tmp_path / "test-board.yaml").write_text(BOARD.replace(*change))
    monkeypatch.setenv(targets.TARGETS_PATH_ENV, str(tmp_path))
    with pytest.raises(ArtifactError, match=match) as exc:
        targets.targets()
    assert "test-board.yaml" in str(exc.value) and "\n" not in str(exc.value)


def test_nvcc_lookup_honours_cuda_home_and_raises_one_line(tmp_path, monkeypatch):
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.6, V12.6.85'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    monkeypatch.delenv("RSP_NVCC", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert toolchain.require_nvcc() == str(nvcc) == toolchain.find_nvcc()
    info = toolchain.nvcc_info(str(nvcc))
    assert (info.release, info.build, info.major) == ("12.6", "V12.6.85", 12)
    with pytest.raises(toolchain.NvccNotFoundError, match="nvcc not found at /nowhere/nvcc"):
        toolchain.require_nvcc("/nowhere/nvcc")
    assert toolchain.find_nvcc("/nowhere/nvcc") is None
    with pytest.raises(toolchain.BinaryFormatError):  # a ValueError too, as the readers raised before
        toolchain.inspect_device_code(nvcc)
