"""L-infinity attacks: the one implementation that training and verification share.

Field rules kept here so no caller can forget them: inputs live in [0, 1] (normalisation is inside the
model), the model is in eval mode while an attack is crafted (BatchNorm uses running statistics),
adversarial examples never leave the eps-ball nor [0, 1], and robust accuracy is the worst case per
example over restarts (an example counts only if it survives every one).

One module per attack family, each registering its attacks (`register_attack`, rsp.attacks.registry):
projected_gradient (PGD: training's attack and verify's), apgd (APGD-CE, APGD-DLR, APGD-T), fab (FAB-T) and
square (Square, black-box); core holds what they share, ensemble the worst case over any registered attacks.
"""

from .core import (AttackResult, Predict, as_float_images, attack_mode, attack_seed, chunked_logits, default_step_size,
                   dlr_loss, input_grad, margin, model_predict, parse_eps)
from .registry import ATTACK_REGISTRY, KINDS, Attack, AttackSettings, attack_names, register_attack

# the families register on import (their `order` fixes the lists, not this import order); the names here are
# the package's API, and _load_all below finds any further attack module
from .projected_gradient import PGDConfig, evaluate, pgd, pgd_eval, pgd_once
from .apgd import apgd_eval
from .fab import fab_eval
from .square import square_eval
from .ensemble import ATTACKS, ensemble_eval


def _load_all() -> None:
    # a new attack is one new module in this package: imported here, it registers itself
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_load_all()

__all__ = ["ATTACKS", "ATTACK_REGISTRY", "KINDS", "Attack", "AttackResult", "AttackSettings", "PGDConfig", "Predict",
           "apgd_eval", "as_float_images", "attack_mode", "attack_names", "attack_seed", "chunked_logits",
           "default_step_size", "dlr_loss", "ensemble_eval", "evaluate", "fab_eval", "input_grad", "margin",
           "model_predict", "parse_eps", "pgd", "pgd_eval", "pgd_once", "register_attack", "square_eval"]
