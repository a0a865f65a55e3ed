"""Training configuration: defaults < recipe file (--config) < flags given on the command line.

The resolved config is saved with the run as config.yaml; `--resume` compares against it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .attacks import parse_eps


class ConfigError(ValueError):
    """A config value or file that cannot be used: one line, exit code 2."""


@dataclass
class TrainConfig:
    # data
    dataset: str = "digits"
    data_dir: str | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    extra_data: str | None = None  # RST: pseudo-labelled images (.npz/.safetensors: images, labels)
    # model and sparsity
    model: str | None = None  # None: the data set's default (small-cnn for digits, vgg16 for CIFAR)
    model_kwargs: dict = field(default_factory=dict)
    method: str = "bcs"  # bcs | fixed | dense | magnitude | lth | hydra | edge-popup | admm | anp-vs (rsp.methods)
    method_options: dict = field(default_factory=dict)  # the method's recipe knobs (phase split, rho, ...)
    sparsity: float = 0.9
    rewire_every: int = 1
    regrow: str = "random"  # BCS rebirth rule: random | l2 | l2-weighted (structured regrowth)
    sigma: float = 1e-6  # noise std is lr * sigma
    alpha: float = 0.0  # L1 prior (SGLD form)
    temperature: float | None = None  # SGLD temperature: noise std sqrt(2 lr T) instead of lr * sigma
    # objective and attack
    objective: str = "pgd-at"
    eps: float = 8 / 255
    attack_step_size: float = 2 / 255
    attack_steps: int = 10
    beta: float = 6.0
    vs_lambda: float | None = None  # ANP-VS vulnerability suppression: + lambda * mean |z(x) - z(x_adv)|, any
    # method; None: the method's default (anp-vs: 1e-4 as in its paper's code, others 0)
    # optimisation
    epochs: int = 30
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    lr_milestones: list = field(default_factory=lambda: [0.5, 0.75])  # fractions of the epochs
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    # evaluation (model selection uses the validation split only)
    eval_attack_steps: int = 10
    test_attack_steps: int = 20
    eval_batch_size: int = 256
    # runtime (may change on --resume)
    device: str = "auto"
    bf16: bool | None = None  # None: on for CUDA
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False
    threads: int | None = None

    RUNTIME_KEYS = ("device", "bf16", "channels_last", "compile", "threads", "max_steps", "data_dir")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def comparable(self) -> dict:
        """What a resumed run must share with the original."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_KEYS}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
EPS_KEYS = ("eps", "attack_step_size")


def recipe_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("rsp").joinpath("recipes").iterdir()
                  if p.name.endswith(".yaml"))


def read_recipe(spec: str) -> dict:
    """A YAML file path, or the name of a recipe shipped with rsp (see `rsp train --list-recipes`)."""
    path = Path(spec)
    if path.is_file():
        text = path.read_text()
    elif spec in recipe_names():
        text = resources.files("rsp").joinpath("recipes", f"{spec}.yaml").read_text()
    else:
        raise ConfigError(f"no config file {spec!r} (nor a shipped recipe; shipped: {', '.join(recipe_names())})")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{spec}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{spec}: expected a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(recipe: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    values: dict[str, Any] = {}
    for source in (recipe or {}, overrides or {}):
        for key, value in source.items():
            if value is None:
                continue
            if key not in FIELDS or key == "RUNTIME_KEYS":
                raise ConfigError(f"unknown option {key!r} in config")
            values[key] = value
    try:
        for key in EPS_KEYS:
            if key in values:
                values[key] = parse_eps(values[key])
    except ValueError as exc:
        raise ConfigError(f"--{key.replace('_', '-')}: {exc}") from None
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    from .data import DATASETS
    from .models import list_models
    from .objectives import OBJECTIVES

    def bad(msg):
        raise ConfigError(msg)

    if cfg.dataset not in DATASETS:
        bad(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    if cfg.model is not None and cfg.model not in list_models():
        bad(f"unknown model {cfg.model!r}; choose one of {', '.join(list_models())}")
    from .sparse import REGROW

    if cfg.regrow not in REGROW:
        bad(f"unknown regrow rule {cfg.regrow!r}; choose one of {', '.join(REGROW)}")
    from .methods import list_methods

    if cfg.method not in list_methods():
        bad(f"unknown method {cfg.method!r}; choose one of {', '.join(list_methods())}")
    if not isinstance(cfg.method_options, dict):
        bad("method_options must be a mapping of option: value")
    from .methods import create_method

    try:
        create_method(cfg.method, **cfg.method_options).phases(cfg)
    except ValueError as exc:
        bad(str(exc))
    if cfg.vs_lambda is not None and cfg.vs_lambda < 0:
        bad("--vs-lambda must be >= 0")
    if cfg.objective not in OBJECTIVES:
        bad(f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if not isinstance(cfg.sparsity, (int, float)) or not 0.0 <= cfg.sparsity < 1.0:
        bad(f"--sparsity must be in [0, 1), got {cfg.sparsity}")
    if cfg.objective == "rst" and not cfg.extra_data:
        bad("--objective rst needs --extra-data FILE (pseudo-labelled images: images, labels)")
    for key in ("epochs", "batch_size", "rewire_every"):
        if int(getattr(cfg, key)) < 1:
            bad(f"--{key.replace('_', '-')} must be >= 1")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        bad("--max-steps must be >= 1")
    if cfg.attack_steps < 0 or cfg.eval_attack_steps < 0 or cfg.test_attack_steps < 0:
        bad("attack steps must be >= 0")
    if cfg.lr <= 0:
        bad("--lr must be > 0")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        bad(f"--device must be cpu, cuda or auto, got {cfg.device!r}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        bad(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
