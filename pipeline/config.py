"""Training configuration: defaults < recipe file (--config) < flags given on the command line.

The resolved config is saved with the run as config.yaml; `--resume` compares against it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from . import defaults
from .attacks import parse_eps


class ConfigError(ValueError):
    """A config value or file that cannot be used: one line, exit code 2."""


DECAY_SCOPES = ("weights", "all")  # TrainConfig.decay_scope


@dataclass
class TrainConfig:
    # data
    dataset: str = "digits"
    data_dir: str | None = None
    val_fraction: float = defaults.VAL_FRACTION
    split_seed: int = defaults.SPLIT_SEED
    extra_data: str | None = None  # RST: pseudo-labelled images (rsp pseudo-label folder, .npz/.safetensors, the ti_500K pickle)
    # model and sparsity
    model: str | None = None  # None: the data set's default (small-cnn for digits, vgg16 for CIFAR)
    model_kwargs: dict = field(default_factory=dict)
    method: str = "bcs"  # a name registered in rsp.methods (rsp.methods.list_methods())
    method_options: dict = field(default_factory=dict)  # the method's recipe knobs (phase split, rho, ...)
    sparsity: float = 0.9
    rewire_every: int = 1
    # BCS rebirth rule: random | layer-size (the reference's) | l2 | l2-magnitude-seeded (structured: nearest
    # dormant position to random / to the largest-|theta| live seeds; the old name l2-weighted is an alias)
    regrow: str = "random"
    # BCS / fixed start: budget (rsp: exactly K from step one, |He| values) | reference (the paper's code:
    # under K with the layer profile, the first step fills the rest at 1e-12, layers in proportion to size)
    sparse_init: str = "budget"
    sigma: float = 1e-6  # noise std is lr * sigma
    alpha: float = 0.0  # L1 prior (SGLD form)
    temperature: float | None = None  # SGLD temperature: noise std sqrt(2 lr T) instead of lr * sigma
    # objective and attack
    objective: str = "pgd-at"
    eps: float = defaults.EPS
    attack_step_size: float = defaults.STEP_SIZE
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
    # which parameters the decoupled decay shrinks: weights (rsp: conv/linear weights, BCS's theta) | all
    # (the reference's SGDW: every trainable parameter, BatchNorm and biases too)
    decay_scope: str = "weights"
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

    def __post_init__(self):
        from .sparse import canonical_regrow

        self.regrow = canonical_regrow(self.regrow)  # l2-weighted -> l2-magnitude-seeded, in config and manifest

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


# What rsp reads from a YAML file or flag. A recipe or config.yaml is a few KB with ~100 values; the bounds
# leave ample room and stop a small file from expanding into gigabytes (aliases), recursing past the stack,
# or keeping PyYAML's pure-Python parser busy for long (it reads ~100 KB/s).
MAX_YAML_BYTES = 256 << 10
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 64


class BoundedYAMLError(yaml.YAMLError):
    """A YAML text beyond rsp's bounds (size, nodes, depth) or using an alias."""


class _BoundedSafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data, no Python tags) that refuses aliases (*name): a "billion laughs" recipe
    expands by nesting aliases of aliases, and recipes never need them; nodes and nesting depth are counted."""

    def __init__(self, stream):
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise BoundedYAMLError(f"aliases (*name) are not allowed (line {mark.line + 1})")
        self._nodes += 1
        self._depth += 1
        try:
            if self._nodes > MAX_YAML_NODES:
                raise BoundedYAMLError(f"more than {MAX_YAML_NODES} values")
            if self._depth > MAX_YAML_DEPTH:
                raise BoundedYAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: `lr: 1e-3` would be the text
# "1e-3" (and then refused as not a number). YAML 1.2 reads it as a number; so does rsp. Quoted stays text.
_BoundedSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def safe_yaml(text: str) -> Any:
    """yaml.safe_load within rsp's bounds: raises yaml.YAMLError (BoundedYAMLError beyond them)."""
    if len(text) > MAX_YAML_BYTES:
        raise BoundedYAMLError(f"longer than {MAX_YAML_BYTES} characters")
    loader = _BoundedSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: PyYAML's messages span several (problem, context, marks)."""
    first = str(exc).strip().splitlines()
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None and len(first) > 1 else ""
    return (first[0] if first else type(exc).__name__) + where


def read_text_file(path: Path, what: str, max_bytes: int = MAX_YAML_BYTES) -> str:
    """A small UTF-8 text file, read at most max_bytes + 1 bytes (a huge file or device is never read whole)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{what} {path} is larger than {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def read_recipe(spec: str) -> dict:
    """A YAML file path, or the name of a recipe shipped with rsp (see `rsp train --list-recipes`)."""
    path = Path(spec)
    if path.is_file():
        text = read_text_file(path, "config file")
    elif spec in recipe_names():
        text = resources.files("rsp").joinpath("recipes", f"{spec}.yaml").read_text()
    else:
        raise ConfigError(f"no config file {spec!r} (nor a shipped recipe; shipped: {', '.join(recipe_names())})")
    try:
        data = safe_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{spec}: not usable YAML ({yaml_error_line(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{spec}: expected a mapping of option: value, got {_kind(data)}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"{spec}: option names must be text, got {bad_keys[0]!r}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _kind(value: Any) -> str:
    """What a YAML value is, in a user's words."""
    if isinstance(value, bool):
        return f"a boolean ({value!r})"
    names = {str: "text", int: "an integer", float: "a number", list: "a list", dict: "a mapping", type(None): "nothing"}
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{names.get(type(value), type(value).__name__)} ({shown})"


_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def check_types(values: dict) -> None:
    """Each value has its field's type (TrainConfig's annotations): YAML reads `lr: "0.1"` as text and
    `epochs: abc` as text; either would otherwise fail later with a traceback. Numbers must be finite."""
    for key, value in values.items():
        hint = _FIELD_TYPES[key]
        allowed = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
        flag = f"--{key.replace('_', '-')}"
        if value is None and type(None) in allowed:
            continue
        ok = False
        if bool in allowed:
            ok = isinstance(value, bool)
        if not ok and int in allowed:
            ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok and float in allowed:
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and math.isfinite(value))
        if not ok and str in allowed:
            ok = isinstance(value, str)
        if not ok and (dict in allowed or list in allowed):
            ok = isinstance(value, dict if dict in allowed else list)
        if not ok:
            want = " or ".join(n for t, n in ((bool, "true/false"), (int, "an integer"), (float, "a finite number"),
                                              (str, "text"), (dict, "a mapping"), (list, "a list"))
                               if t in allowed and not (t is int and float in allowed))
            raise ConfigError(f"{flag} must be {want}, got {_kind(value)}")
        if isinstance(value, dict) and not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{flag} must be a mapping with text keys, got {_kind(value)}")
    for m in values.get("lr_milestones") or []:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or (isinstance(m, float) and not math.isfinite(m)):
            raise ConfigError(f"--lr-milestones must be a list of numbers, got {_kind(m)} in it")


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
                if not isinstance(values[key], (int, float, str)) or isinstance(values[key], bool):
                    raise ValueError(f"expected a number or fraction such as 8/255, got {_kind(values[key])}")
                values[key] = parse_eps(values[key])
    except ValueError as exc:
        raise ConfigError(f"--{key.replace('_', '-')}: {exc}") from None
    check_types(values)
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
        bad(f"unknown regrow rule {cfg.regrow!r}; choose one of {', '.join(REGROW)} (or the alias l2-weighted)")
    from .sparse import INITS

    if cfg.sparse_init not in INITS:
        bad(f"unknown sparse init {cfg.sparse_init!r}; choose one of {', '.join(INITS)}")
    if cfg.decay_scope not in DECAY_SCOPES:
        bad(f"unknown decay scope {cfg.decay_scope!r}; choose one of {', '.join(DECAY_SCOPES)}")
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
    except TypeError as exc:  # a method option of the wrong kind (rounds: abc) met by the method's arithmetic
        bad(f"method {cfg.method}: a method_options value of the wrong kind ({str(exc).strip()[:200]})")
    if cfg.vs_lambda is not None and cfg.vs_lambda < 0:
        bad("--vs-lambda must be >= 0")
    if cfg.objective not in OBJECTIVES:
        bad(f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if not isinstance(cfg.sparsity, (int, float)) or not 0.0 <= cfg.sparsity < 1.0:
        bad(f"--sparsity must be in [0, 1), got {cfg.sparsity}")
    if cfg.objective == "rst" and not cfg.extra_data:
        bad("--objective rst needs --extra-data (pseudo-labelled images: an rsp pseudo-label folder, .npz/.safetensors with images and labels, or the ti_500K pickle)")
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
    # without these a negative temperature is a NaN noise std, a negative weight decay grows the weights, a
    # thread count < 1 a torch traceback
    if cfg.threads is not None and cfg.threads < 1:
        bad(f"--threads must be >= 1, got {cfg.threads}")
    for key in ("weight_decay", "beta", "sigma", "alpha"):
        if getattr(cfg, key) < 0:
            bad(f"--{key.replace('_', '-')} must be >= 0, got {getattr(cfg, key)}")
    if cfg.temperature is not None and cfg.temperature <= 0:
        bad(f"--temperature must be > 0, got {cfg.temperature}")


class _PlainDumper(yaml.SafeDumper):
    """Never writes anchors/aliases: config.yaml must read back through the alias-refusing loader."""

    def ignore_aliases(self, data):
        return True


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.dump(cfg.to_dict(), Dumper=_PlainDumper, sort_keys=False)
