"""The package's seams, read from its source: stages talk only through folders, and the values every stage
shares are defined once. (Reads the code with `ast`; nothing is imported.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("train", "structure", "export", "verify")  # each writes a folder that the next one reads


def _package_files() -> dict[str, Path]:
    """Module name (rsp.x.y) -> file, over the folders pyproject maps into the package."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    out = {}
    for package, folder in tool["package-dir"].items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _imports(module: str, path: Path) -> set[str]:
    """Every module `module` imports, at the top or inside a function, absolute names."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{a.name}" for a in node.names)  # `from . import export`
    return found


def _stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "rsp" and parts[1] in STAGES else None


def test_every_subpackage_is_installed():
    # pyproject lists packages by hand (package-dir maps three folders): a new subpackage must be listed, or a
    # non-editable install (a wheel) silently lacks it
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {m for m, path in _package_files().items() if path.name == "__init__.py"}
    assert found == set(tool["packages"]), f"pyproject packages {sorted(tool['packages'])} vs the folders {sorted(found)}"
    assert (ROOT / "kernels").is_dir() and (ROOT / "targets").is_dir(), "the card's layout: kernels/ and targets/ at the root"


def test_no_stage_imports_another_stage():
    files = _package_files()
    assert {f"rsp.{s}" for s in STAGES} <= set(files), "a stage module moved: update STAGES"
    crossings = []
    for module, path in sorted(files.items()):
        own = _stage_of(module)
        if own is None:
            continue
        for target in sorted(_imports(module, path)):
            other = _stage_of(target)
            if other and other != own:
                crossings.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not crossings, "stages talk only through folders; move shared code below them:\n" + "\n".join(crossings)


def test_the_walk_sees_a_crossing(tmp_path):
    # the checker itself: a relative import of a sibling stage, inside a function, is found
    src = tmp_path / "structure.py"
    src.write_text("def f():\n    from .train import TrainStep\n    from . import verify\n")
    assert {"rsp.train.TrainStep", "rsp.verify"} <= _imports("rsp.structure", src)


def _constants(value) -> list[str]:
    hits = []
    for path in _package_files().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value == value and not isinstance(value, bool):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(value, tuple)
                  and isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant)
                  and (node.left.value, node.right.value) == value):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return hits


@pytest.mark.parametrize("value", [(8, 255), "model.onnx", "model.tvm.so", "tensorrt.json"],
                         ids=["eps-8/255", "onnx-file", "tvm-file", "tensorrt-file"])
def test_shared_values_are_defined_once(value):
    hits = _constants(value)
    assert len(hits) == 1, f"{value!r} is written at {hits}: define it once and import it"
