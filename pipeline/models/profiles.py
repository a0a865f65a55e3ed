"""Initial per-layer densities of BCS (and of the `fixed` mask), per registered model name.

The table lives here, not next to each constructor, so that the architectures (vgg.py, resnet.py, wrn.py)
stay independent of the sparse-training method; a profile reads layer *names* (the order of
`rsp.sparse.sparsifiable_layers`), so it follows the model as built. Each profile returns one entry per
conv/linear layer: a density, or None for "no fixed share: filled from the rest of the budget".

The reference profiles are those of the paper's code (IGITUGraz/SparseAdversarialTraining), p being the
global density 1 - sparsity:

    vgg16        conv1-2 0.6, conv3-4 0.2, conv5-13 and the two hidden linears 0.5 p, output linear 0.6
                 (vgg16-1fc, rsp's single-linear variant: the same rule over its 14 layers)
    resnet*      conv1 0.6, stage 1 (layer1.*) 0.2, stages 2-4 0.5 p, fc 0.6 (shortcut convs: their stage's)
    wrn*         conv1 0.6, group 1 (layer1.*) 0.1, groups 2-3 0.5 p, fc 0.6 (shortcut convs: their group's)

A model without a profile here keeps rsp's rule: first and last layer at max(p, 0.6) (tiny; they carry
the input and the classes), the rest None (no fixed share: with `--sparse-init budget` they share the rest of
the budget uniformly; with `--sparse-init reference` they start at the reference's bulk density 0.5 p, since
starting them empty would leave them to 1e-12 rebirths, a dead network; rsp.sparse.reference_spec).
"""

from __future__ import annotations

from typing import Callable, Sequence

Profile = Callable[[Sequence[str], float], list]


def _vgg16(names: Sequence[str], p: float) -> list:
    # Four leading convs, then 0.5 p for everything up to the output layer (16 layers in the paper's network:
    # 11 such; the 14-layer single-linear variant gets the same rule, as rsp applied before)
    n = len(names)
    if n < 5:
        return default_profile(names, p)
    return [0.6, 0.6, 0.2, 0.2] + [0.5 * p] * (n - 5) + [0.6]


def _staged(first_stage: float) -> Profile:
    def profile(names: Sequence[str], p: float) -> list:
        out = []
        for i, name in enumerate(names):
            if i == 0 or i == len(names) - 1:
                out.append(0.6)  # the stem conv and the classifier
            elif name.startswith("layer1."):
                out.append(first_stage)
            else:
                out.append(0.5 * p)
        return out

    return profile


PROFILES: dict[str, tuple[str, Profile]] = {
    "vgg16": ("vgg16-reference", _vgg16),
    # not in the reference: rsp's 5-pool, single-linear variant keeps the rule it had (14 layers, 9 at 0.5 p)
    "vgg16-1fc": ("vgg16-reference rule on the 14-layer variant", _vgg16),
    **{name: ("resnet-reference", _staged(0.2)) for name in ("resnet18", "resnet34", "resnet50")},
    **{name: ("wrn-reference", _staged(0.1)) for name in ("wrn", "wrn-28-4", "wrn-28-10", "wrn-34-10")},
}
DEFAULT_PROFILE = "first/last>=0.6"


def default_profile(names: Sequence[str], p: float) -> list:
    spec: list = [None] * len(names)
    if spec:
        spec[0] = spec[-1] = max(p, 0.6)
    return spec


def profile_name(model_name: str) -> str:
    """What the manifest records: which profile a model gets."""
    return PROFILES[model_name][0] if model_name in PROFILES else DEFAULT_PROFILE


def initial_densities(model_name: str, layer_names: Sequence[str], density: float) -> list:
    """One entry per conv/linear layer (module order): the reference profile of `model_name`, or the default."""
    fn = PROFILES[model_name][1] if model_name in PROFILES else default_profile
    return fn(list(layer_names), density)
