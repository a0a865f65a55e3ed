"""The method registry (rsp.methods): a method registered from outside the package is listed by `rsp train --help`
and `rsp pipeline --help`, trains, and is recorded in the run's manifest; the derived lists follow the registry."""

import pytest
from typer.testing import CliRunner

import rsp.methods as methods
from rsp.artifacts import read_manifest

NAME = "static-random"


@pytest.fixture
def registry(monkeypatch):
    methods.list_methods()  # the package's own entries first
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    return methods


def _register(registry):
    @registry.register(NAME, "a test method: a static random mask, the same density in every layer", role="control")
    class StaticRandom(registry.Method):
        name = NAME

        def enter(self, index, model, ctx):
            from rsp.sparse import make_sparse

            return make_sparse("random", model, ctx.cfg.sparsity, ctx.generator, model_name=ctx.model_name)

    return StaticRandom


def test_roles_partition_the_registry_and_the_tables_take_the_methods():
    names = methods.list_methods()
    by_role = [methods.list_methods(role) for role in methods.ROLES]
    assert sorted(sum(by_role, [])) == sorted(names) and len(set(names)) == len(names)
    assert {"random", "lth-reinit"} <= set(methods.list_methods("control"))
    assert methods.list_methods("dense") == ["dense"]
    with pytest.raises(ValueError, match="role must be one of"):
        methods.register("x", "y", role="baseline")


def test_a_registered_method_is_listed_and_trains(registry, tmp_path):
    from rsp.cli import app

    _register(registry)  # after the CLI was imported: its help is built when shown
    runner = CliRunner()
    for command in ("train", "pipeline"):
        r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
        assert r.exit_code == 0 and NAME in r.output, (command, r.output)
    assert NAME not in methods.list_methods("method") and NAME in methods.list_methods("control")
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", "--method", NAME, "--epochs", "1", "--max-steps", "2", "--batch-size", "64",
                            "--threads", "1", "--attack-steps", "1", "--output", str(out)])
    assert r.exit_code == 0, r.output
    manifest = read_manifest(out, stage="train")
    assert manifest["method"] == NAME and manifest["status"] == "complete"
    assert abs(manifest["sparsity"] - manifest["target_sparsity"]) < 1e-3  # at the budget, as bcs
