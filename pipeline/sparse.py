"""Sparse layers and Bayesian connectivity sampling (BCS).

Parametrisations of a conv/linear weight, each a layer whose `forward` shows the math:

  bcs   w = sign * relu(theta)       sign in {-1, +1} drawn once per position and never changed;
                                     theta <= 0 is a dormant connection: w = 0 and relu passes no gradient.
  mask  w = weight * mask            a fixed binary mask (the `fixed` baseline and pruning methods).
  score w = weight * topk(|score|, k) the k largest |scores| pick the connections; the gradient reaches the
                                     scores straight through (HYDRA, edge-popup; rsp.methods).
  gate  w = weight * mask * g[out]   a per-output-unit gate module g (ANP-VS's beta-Bernoulli masks).

`BayesianRewiring` owns one flat theta (and sign, gradient, momentum) for all sparsified layers; each
layer's parameter is a view into it, so the whole update — SGDW, noise, death, rebirth — is a few
tensor ops over one buffer: no Python loop over weights, no host synchronisation, no sort of all
parameters. The number of active connections equals the budget K after every rewiring step.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

SPARSIFIABLE = (nn.Conv2d, nn.Linear)
REBIRTH_THETA = 1e-12


class SparseMixin:
    """Shared by SparseConv2d and SparseLinear: the effective weight of either parametrisation."""

    parametrization: str  # "bcs" | "mask"
    _frozen_weight: torch.Tensor | None = None

    def effective_weight(self) -> torch.Tensor:
        if self._frozen_weight is not None:
            return self._frozen_weight
        p = self.parametrization
        if p == "bcs":
            return self.sign * F.relu(self.theta)
        if p == "score":
            return self.weight * TopKStraightThrough.apply(self.score.abs(), self.k)
        if p == "gate":
            return self.weight * self.mask * self.gate().view(-1, *([1] * (self.weight.dim() - 1)))
        return self.weight * self.mask

    def active_mask(self) -> torch.Tensor:
        p = self.parametrization
        if p == "bcs":
            return self.theta > 0
        if p == "score":
            return topk_mask(self.score.detach().abs(), self.k).bool()
        return self.mask.bool()

    @property
    def weight_shape(self) -> torch.Size:
        return (self.theta if self.parametrization == "bcs" else self.weight).shape


    def example_gates(self, batch: int) -> torch.Tensor | None:
        """ANP-VS while training: one mask per example and output unit, (batch, units), applied to the
        pre-bias output (train-mode BatchNorm would divide out a mask shared by the batch). Else None."""
        if self.parametrization != "gate" or self._frozen_weight is not None:
            return None
        return self.gate.example_masks(batch)


class SparseConv2d(SparseMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.example_gates(x.shape[0])
        if z is None:
            return self._conv_forward(x, self.effective_weight(), self.bias)
        out = self._conv_forward(x, self.weight * self.mask, None) * z[:, :, None, None].to(x.dtype)
        return out if self.bias is None else out + self.bias[:, None, None]


class SparseLinear(SparseMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.example_gates(x.shape[0])
        if z is None:
            return F.linear(x, self.effective_weight(), self.bias)
        out = F.linear(x, self.weight * self.mask) * z.to(x.dtype)
        return out if self.bias is None else out + self.bias


_SPARSE_CLASS = {nn.Conv2d: SparseConv2d, nn.Linear: SparseLinear}
_DENSE_CLASS = {v: k for k, v in _SPARSE_CLASS.items()}


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """1 at the k largest entries of score, 0 elsewhere (ties broken by position, deterministic)."""
    flat = score.reshape(-1)
    out = torch.zeros_like(flat)
    if k > 0:
        out[flat.topk(min(k, flat.numel()), sorted=False).indices] = 1
    return out.view_as(score)


class TopKStraightThrough(torch.autograd.Function):
    """Forward: the top-k mask of the scores. Backward: the gradient w.r.t. the mask passes to the scores
    unchanged (straight-through estimator, as in edge-popup and HYDRA)."""

    @staticmethod
    def forward(ctx, score: torch.Tensor, k: int) -> torch.Tensor:
        return topk_mask(score, k)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sparsifiable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every conv and linear layer (first conv, 1x1 shortcuts and classifier included), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SPARSIFIABLE)]


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseMixin]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseMixin)]


def _convert(module: nn.Module, parametrization: str) -> SparseMixin:
    """Turn a dense conv/linear into its sparse twin in place (same object, same attributes)."""
    module.__class__ = _SPARSE_CLASS[type(module)] if type(module) in _SPARSE_CLASS else module.__class__
    if not isinstance(module, SparseMixin):
        raise TypeError(f"cannot sparsify {type(module).__name__}: only plain nn.Conv2d / nn.Linear")
    module.parametrization = parametrization
    return module


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain registry model's state_dict: effective weights under `<layer>.weight`, exact zeros where
    dormant. This is what model.safetensors holds, so any stage can load it without rsp's sparse layers."""
    sparse = dict(sparse_layers(model))
    out = {}
    for key, value in model.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        # a sparse layer keeps only its bias: weight/theta/sign/mask/score and gate modules are folded below
        owner = next((n for n in sparse if key.startswith(n + ".")), None) if sparse else None
        if owner is not None and key != f"{owner}.bias":
            continue
        out[key] = value.detach()
    with torch.no_grad():
        for name, m in sparse.items():
            out[f"{name}.weight"] = m.effective_weight().detach().clone()
    return out


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Compute each sparse layer's effective weight once and reuse it (attack steps do not change weights)."""
    layers = [m for _, m in sparse_layers(model)]
    with torch.no_grad():
        for m in layers:
            m._frozen_weight = m.effective_weight().detach()
    try:
        yield
    finally:
        for m in layers:
            m._frozen_weight = None


def to_dense(model: nn.Module) -> nn.Module:
    """Fold every sparse layer back into a plain conv/linear whose weight is its effective weight (zeros
    where inactive), dropping theta/sign/mask/score/gate: the start of each phase of a multi-phase method."""
    for _, m in sparse_layers(model):
        with torch.no_grad():
            w = m.effective_weight().detach().clone()
        for attr in ("theta", "weight", "score", "sign", "mask", "gate"):
            if attr in m._parameters or attr in m._buffers or attr in m._modules:
                delattr(m, attr)
        for attr in ("k", "parametrization", "_frozen_weight"):
            m.__dict__.pop(attr, None)
        m.__class__ = _DENSE_CLASS[type(m)]
        m.weight = nn.Parameter(w)
    return model


def global_magnitude_masks(model: nn.Module, keep: int) -> dict[str, torch.Tensor]:
    """Masks keeping the `keep` largest |w| over all conv/linear layers together (one global threshold).
    Exact count: ties at the threshold are broken by position."""
    layers = sparsifiable_layers(model)
    flat = torch.cat([(m.effective_weight() if isinstance(m, SparseMixin) else m.weight).detach().abs().reshape(-1)
                      for _, m in layers])
    keep_flat = topk_mask(flat, keep)
    out, start = {}, 0
    for name, m in layers:
        n = m.weight_shape.numel() if isinstance(m, SparseMixin) else m.weight.numel()
        shape = m.weight_shape if isinstance(m, SparseMixin) else m.weight.shape
        out[name] = keep_flat[start:start + n].view(shape).clone()
        start += n
    return out


# --- initial connectivity -----------------------------------------------------------------------


INITS = ("budget", "reference")  # how BCS / fixed start (TrainConfig.sparse_init); see BayesianRewiring


def initial_densities(model_name: str, layers: Sequence[str] | int, density: float) -> list[float | None]:
    """Per-layer initial densities (None: filled at random from the rest of the budget), one per conv/linear
    layer in module order; `layers` are their names (or just their count, for profiles that need no names).

    The table is rsp.models.profiles (the reference's profiles for VGG-16, ResNet and WideResNet, keyed by
    registered model name); other models keep the first and last layer at >= 0.6 and fill the rest.
    """
    from .models.profiles import initial_densities as profile

    names = [str(i) for i in range(layers)] if isinstance(layers, int) else list(layers)
    return profile(model_name, names, density)


def reference_spec(spec: list[float | None], density: float) -> list[float]:
    """The profile as the reference's under-budget start reads it. Every reference profile names a density for
    every layer, 0.5 p for the bulk; a model the reference does not define (vgg11, say) has layers with no fixed
    share (None), which the reference start would leave empty, to be filled only by 1e-12 rebirths: a dead
    network (BatchNorm then sees ~1e-12 activations). rsp starts such layers at the reference's bulk rule,
    0.5 p, an rsp choice the docstring of rsp.models.profiles states."""
    return [0.5 * density if d is None else d for d in spec]


def profile_counts(sizes: list[int], budget: int, spec: list[float | None], *, floor: bool = False) -> list[int]:
    """Active connections per layer from `spec` (round(d * size), or int(d * size) as the reference's
    initialize_conn_mask with floor=True), scaled down, largest remainders first, if they exceed the budget."""
    fixed = [0 if d is None else min(s, math.floor(d * s) if floor else round(d * s)) for s, d in zip(sizes, spec)]
    if sum(fixed) > budget:
        exact = [f * budget / sum(fixed) for f in fixed]
        fixed = [math.floor(e) for e in exact]
        order = sorted(range(len(exact)), key=lambda i: exact[i] - fixed[i], reverse=True)
        for i in order[: budget - sum(fixed)]:
            fixed[i] += 1
    return fixed


def uniform_counts(sizes: list[int], budget: int) -> list[int]:
    """The same density in every layer at exactly `budget` connections: budget * size / total, the rounding
    remainders to the largest fractions, so every layer is within one weight of the common density."""
    n = sum(sizes)
    if not 0 <= budget <= n:
        raise ValueError(f"budget {budget} outside [0, {n}]")
    exact = [budget * s / n for s in sizes]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)[: budget - sum(counts)]:
        counts[i] += 1
    return counts


def fill_by_layer_size(sizes: list[int], counts: list[int], need: int, generator: torch.Generator) -> list[int]:
    """How many of `need` new connections go to each layer: each one's layer drawn with probability in
    proportion to the layer's size (the reference's get_rewire_n_units, a Categorical over layer sizes).
    A full layer's overflow is drawn again among the layers with room (the reference would leave it for
    the next step), so the result lands exactly on the budget."""
    free = [s - c for s, c in zip(sizes, counts)]
    if need > sum(free):
        raise ValueError(f"{need} connections do not fit in {sum(free)} dormant positions")
    add = [0] * len(sizes)
    while need > 0:
        probs = torch.tensor([float(s) if f > a else 0.0 for s, f, a in zip(sizes, free, add)], dtype=torch.float64)
        drawn = torch.bincount(torch.multinomial(probs, need, replacement=True, generator=generator),
                               minlength=len(sizes)).tolist()
        for i, d in enumerate(drawn):
            take = min(d, free[i] - add[i])
            add[i] += take
            need -= take
    return add


def place(sizes: list[int], counts: list[int], generator: torch.Generator,
          active: torch.Tensor | None = None) -> torch.Tensor:
    """A flat bool mask: `counts[l]` more positions of layer l, uniform among those not yet in `active`."""
    active = torch.zeros(sum(sizes), dtype=torch.bool) if active is None else active
    start = 0
    for s, c in zip(sizes, counts):
        if c:
            dormant = torch.nonzero(~active[start : start + s]).squeeze(1)
            active[start + dormant[torch.randperm(len(dormant), generator=generator)[:c]]] = True
        start += s
    return active


def allocate_budget(sizes: list[int], budget: int, spec: list[float | None], generator: torch.Generator, *,
                    rest: str = "uniform", floor: bool = False) -> torch.Tensor:
    """A flat bool mask with exactly `budget` True positions: per-layer counts from `spec` (profile_counts),
    then the rest drawn either uniformly over all still-dormant positions (rest="uniform", rsp's rule) or
    layer by layer, each new connection's layer in proportion to the layer's size (rest="layer-size", the
    reference's first sample_connectivity)."""
    n = sum(sizes)
    if not 0 <= budget <= n:
        raise ValueError(f"budget {budget} outside [0, {n}]")
    fixed = profile_counts(sizes, budget, spec, floor=floor)
    if rest == "layer-size":
        add = fill_by_layer_size(sizes, fixed, budget - sum(fixed), generator)
        return place(sizes, [f + a for f, a in zip(fixed, add)], generator)
    active = place(sizes, fixed, generator)
    left = budget - int(active.sum())
    if left:
        dormant = torch.nonzero(~active).squeeze(1)
        active[dormant[torch.randperm(len(dormant), generator=generator)[:left]]] = True
    return active


# --- the two methods ----------------------------------------------------------------------------


class SparseMethod:
    """Common interface the trainer drives: parameters to optimise elsewhere, a step, state for resume."""

    name: str
    layers: list[tuple[str, SparseMixin]]
    budget: int
    total: int

    def weight_params(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def decayed_params(self) -> list[torch.Tensor]:
        """What the trainer's decoupled weight decay shrinks (BCS decays theta itself: none)."""
        return self.weight_params()

    def self_updated_params(self) -> list[torch.Tensor]:
        """Parameters this method updates itself in `step` (BCS's theta, ANP's gates under Adam): the
        trainer's optimizer leaves them out."""
        return []

    def extra_loss(self) -> torch.Tensor | None:
        """A term added to the objective's loss before backward (ADMM's penalty, ANP's KL), or None."""
        return None

    def step(self, lr: float, decay_scale: float) -> None:
        """Called after backward. decay_scale: the schedule multiplier lr_t / lr_0 (SGDW)."""

    def zero_grad(self) -> None:
        pass

    def active_count(self) -> torch.Tensor:
        return sum(m.active_mask().sum() for _, m in self.layers)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        pass


class FixedMask(SparseMethod):
    """A random mask at the budget that never changes: w = weight * mask. The cost floor for BCS."""

    name = "fixed"

    def __init__(self, model: nn.Module, sparsity: float, generator: torch.Generator, model_name: str = "",
                 init: str = "budget"):
        """init: "budget" (the profile, the rest uniform over dormant positions) or "reference" (the profile,
        the rest layer by layer in proportion to layer size: BCS's mask after its first reference fill)."""
        dense = sparsifiable_layers(model)
        sizes = [m.weight.numel() for _, m in dense]
        self.total = sum(sizes)
        self.budget = round((1.0 - sparsity) * self.total)
        active = self._allocate([n for n, _ in dense], sizes, 1 - sparsity, model_name, init, generator)
        self._attach(dense, sizes, active)

    def _allocate(self, names, sizes, density, model_name, init, generator) -> torch.Tensor:
        if init not in INITS:
            raise ValueError(f"unknown sparse init {init!r}; choose one of {', '.join(INITS)}")
        spec = initial_densities(model_name, names, density)
        if init == "reference":
            return allocate_budget(sizes, self.budget, reference_spec(spec, density), generator, rest="layer-size",
                                   floor=True)
        return allocate_budget(sizes, self.budget, spec, generator)

    def _attach(self, dense, sizes, active) -> None:
        start = 0
        self.layers = []
        for (name, m), s in zip(dense, sizes):
            mask = active[start : start + s].view_as(m.weight).to(m.weight.device, m.weight.dtype)
            start += s
            layer = _convert(m, "mask")
            layer.register_buffer("mask", mask)
            self.layers.append((name, layer))

    @classmethod
    def from_pattern(cls, model: nn.Module) -> "FixedMask":
        """Freeze the model's current non-zero pattern as the mask (rsp structure --finetune): weights may
        change, the structure may not."""
        self = cls.__new__(cls)
        dense = sparsifiable_layers(model)
        self.total = sum(m.weight.numel() for _, m in dense)
        self.layers = []
        for name, m in dense:
            mask = (m.weight.detach() != 0).to(m.weight.dtype)
            layer = _convert(m, "mask")
            layer.register_buffer("mask", mask)
            self.layers.append((name, layer))
        self.budget = int(sum(m.mask.sum().item() for _, m in self.layers))
        return self

    @classmethod
    def from_masks(cls, model: nn.Module, masks: dict[str, torch.Tensor], name: str = "fixed") -> "FixedMask":
        """A mask per conv/linear layer (by module name) on a dense model; weights outside it are zeroed
        now, so the effective weight and the stored weight agree."""
        self = cls.__new__(cls)
        self.name = name
        dense = sparsifiable_layers(model)
        self.total = sum(m.weight.numel() for _, m in dense)
        self.layers = []
        for lname, m in dense:
            mask = masks[lname].to(m.weight.device, m.weight.dtype)
            with torch.no_grad():
                m.weight.mul_(mask)
            layer = _convert(m, "mask")
            layer.register_buffer("mask", mask)
            self.layers.append((lname, layer))
        self.budget = int(sum(m.mask.sum().item() for _, m in self.layers))
        return self

    def weight_params(self):
        return [m.weight for _, m in self.layers]

    def state_tensors(self):
        return {f"mask.{n}": m.mask.to(torch.int8) for n, m in self.layers}

    def load_state_tensors(self, state):
        for n, m in self.layers:
            m.mask.copy_(state[f"mask.{n}"].to(m.mask.dtype))



class RandomMask(FixedMask):
    """The `random` baseline: a static random mask with the same density in every layer (within one
    weight), exactly at the budget; no profile. Trained like `fixed`: w = weight * mask."""

    name = "random"

    def _allocate(self, names, sizes, density, model_name, init, generator) -> torch.Tensor:
        return place(sizes, uniform_counts(sizes, self.budget), generator)


class BayesianRewiring(SparseMethod):
    """Bayesian connectivity sampling (Özdenizci & Legenstein 2021; Deep Rewiring, Bellec et al. 2018).

    Each step, on active theta only:
        m     <- momentum * m + grad
        theta <- theta - lr * m - wd * decay_scale * theta               (SGDW: decay not scaled by lr)
                       - lr * alpha                                      (optional L1 prior)
                       + N(0, (lr * sigma)^2)  or  N(0, 2 * lr * T)      (noise; SGLD form when T is set)
    then theta <= 0 dies (theta = 0, momentum reset) and exactly as many dormant connections are
    reborn at theta = 1e-12, drawn uniformly among all positions still dormant. A layer's share of the
    rebirths is thus in proportion to its *dormant* count; the reference draws each rebirth's layer in
    proportion to its *size*, then a dormant position in it. The two agree up to the factor (1 - layer
    density): the same at the paper's 0.5 p layers, while the reference rebirths relatively more into
    its small 0.6-density layers (first convs, output layer; ~0.01 % of VGG-16's weights).
    regrow="layer-size" applies the reference's rule at every rewiring (a host-side step per rewiring).

    Initialisation (`init`): "budget" (rsp) starts exactly at K, the profile's per-layer counts
    (round(d * size)) plus the rest uniformly, active theta = |He normal|. "reference" (the paper's code)
    starts *under* K with int(d * size) active per layer of the profile (theta = |He normal| there, signs
    random everywhere); the first step's rewiring then fills the remaining slots at theta = 1e-12, each
    one's layer drawn in proportion to layer size (the reference's first sample_connectivity()).

    Since exactly K connections are active, their flat positions live in a fixed-size index tensor
    `slots` (K,): momentum, noise, death and rebirth all cost O(K) plus O(M) for M rebirth candidates,
    with static shapes, so nothing waits on the host. The dense theta (views for the layers' forward)
    is only gathered from and scattered to.
    """

    name = "bcs"

    def __init__(self, model: nn.Module, sparsity: float, generator: torch.Generator, *, model_name: str = "",
                 momentum: float = 0.9, weight_decay: float = 5e-4, sigma: float = 1e-6, alpha: float = 0.0,
                 temperature: float | None = None, rewire_every: int = 1, regrow: str = "random",
                 init: str = "budget"):
        regrow = canonical_regrow(regrow)
        if regrow not in REGROW:
            raise ValueError(f"unknown regrow rule {regrow!r}; choose one of {', '.join(REGROW)} "
                             f"(or the alias l2-weighted)")
        if init not in INITS:
            raise ValueError(f"unknown sparse init {init!r}; choose one of {', '.join(INITS)}")
        self.regrow, self.init = regrow, init
        dense = sparsifiable_layers(model)
        if not dense:
            raise ValueError("model has no conv or linear layer to sparsify")
        device = dense[0][1].weight.device
        dtype = dense[0][1].weight.dtype
        sizes = [m.weight.numel() for _, m in dense]
        self.total = n = sum(sizes)
        self.budget = round((1.0 - sparsity) * n)
        self.momentum, self.weight_decay, self.sigma, self.alpha = momentum, weight_decay, sigma, alpha
        self.temperature, self.rewire_every = temperature, max(1, int(rewire_every))
        self.generator = generator  # on `device`: rebirth sampling and noise

        # Initial connectivity and signs are drawn on the CPU once (cheap, reproducible), then moved.
        cpu_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=device)))
        spec = initial_densities(model_name, [name for name, _ in dense], 1 - sparsity)
        if init == "reference":
            if not 0 <= self.budget <= n:
                raise ValueError(f"budget {self.budget} outside [0, {n}]")
            spec = reference_spec(spec, 1 - sparsity)
            active = place(sizes, profile_counts(sizes, self.budget, spec, floor=True), cpu_gen)
        else:
            active = allocate_budget(sizes, self.budget, spec, cpu_gen)
        theta = torch.zeros(n + 1, dtype=dtype)  # one spare slot at [n]: writes that must go nowhere land there
        sign = torch.empty(n, dtype=dtype)
        start = 0
        for (_, m), s in zip(dense, sizes):
            fan_in = m.weight[0].numel()
            he = torch.randn(s, generator=cpu_gen) * math.sqrt(2.0 / fan_in)
            theta[start : start + s] = torch.where(active[start : start + s], he.abs(), torch.zeros(()))
            sign[start : start + s] = torch.randint(0, 2, (s,), generator=cpu_gen).mul(2).sub(1).to(dtype)
            start += s
        self.theta_buf = theta.to(device)
        self.sign = sign.to(device)
        self._grad_ext = torch.zeros(n + 1, dtype=dtype, device=device)  # [n]: the free slots' (always 0)
        self.grad = self._grad_ext[:n]
        # (K,) flat positions of the active connections; under the budget (reference init) the free slots
        # point at the spare position n (theta 0): dead slots that the first rewiring fills
        slots = torch.nonzero(active).squeeze(1)
        self.slots = torch.cat([slots, torch.full((self.budget - len(slots),), n, dtype=slots.dtype)]).to(device)
        self._sizes = sizes
        self.buf = torch.zeros(self.budget, dtype=dtype, device=device)  # momentum, per slot
        self.steps = 0
        # Rebirth candidates per step. With BatchNorm scaling gradients by 1/|w| and newborns at 1e-12 dying
        # half the time, ~10-15 % of the connections die per step early on; K/4 candidates cover that, a
        # second pass the rest.
        self.n_candidates = min(n, self.budget // 4 + 4096, 2**24 - 1)  # tags below must be exact in float32

        self.layers = []
        self._offsets = []
        start = 0
        for (name, m), s in zip(dense, sizes):
            shape = m.weight.shape
            layer = _convert(m, "bcs")
            del layer.weight
            layer.theta = nn.Parameter(self.theta_buf[start : start + s].view(shape))
            layer.register_buffer("sign", self.sign[start : start + s].view(shape))
            self._offsets.append((start, s))
            self.layers.append((name, layer))
            start += s
        self._bind_grads()
        self._layer_starts = torch.tensor([o for o, _ in self._offsets], device=device)
        self._layer_sizes = torch.tensor(sizes, dtype=torch.float, device=device)
        self._index_shapes = [_index_shape(m.theta.shape) for _, m in self.layers]

    @property
    def theta(self) -> torch.Tensor:
        return self.theta_buf[: self.total]

    def weight_params(self):
        return [m.theta for _, m in self.layers]

    def decayed_params(self):
        return []  # theta's decay is part of step()

    def self_updated_params(self):
        return self.weight_params()

    def _bind_grads(self):
        for (_, m), (start, s) in zip(self.layers, self._offsets):
            m.theta.grad = self.grad[start : start + s].view(m.theta.shape)

    def zero_grad(self):
        self.grad.zero_()
        self._bind_grads()

    def _collect_grads(self):
        """Autograd accumulates into the bound views; if something replaced a .grad, copy it back."""
        for (_, m), (start, s) in zip(self.layers, self._offsets):
            g = m.theta.grad
            if g is None:
                self.grad[start : start + s].zero_()
            elif g.data_ptr() != self.grad[start : start + s].data_ptr():
                self.grad[start : start + s].copy_(g.reshape(-1))

    def active_count(self) -> torch.Tensor:
        return (self.theta > 0).sum()

    @torch.no_grad()
    def step(self, lr: float, decay_scale: float = 1.0) -> None:
        self._collect_grads()
        slots, buf = self.slots, self.buf
        theta = self.theta_buf.index_select(0, slots)  # 0 in slots whose connection died and awaits rebirth (rewire_every > 1)
        live = theta > 0
        buf.mul_(self.momentum).add_(self._grad_ext.index_select(0, slots))
        noise_std = lr * self.sigma if self.temperature is None else math.sqrt(2.0 * lr * self.temperature)
        update = buf * lr + theta * (self.weight_decay * decay_scale)
        if self.alpha:
            update += lr * self.alpha
        if noise_std:
            update -= torch.randn(theta.shape, device=theta.device, dtype=theta.dtype, generator=self.generator) * noise_std
        theta = (theta - update * live).clamp_(min=0.0)  # crossed to <= 0: dies (theta = 0, w = 0)
        dead = theta == 0
        buf.masked_fill_(dead, 0.0)  # momentum of a dead connection is reset
        self.theta_buf.index_copy_(0, slots, theta)
        self.steps += 1
        if (self.init == "reference" and self.steps == 1) or (
                self.regrow == "layer-size" and self.steps % self.rewire_every == 0):
            self._fill_by_layer_size(dead)
        elif self.steps % self.rewire_every == 0:
            if self.regrow == "random":
                self._rebirth(dead)
            else:
                self._rebirth_near(dead)

    @torch.no_grad()
    def _fill_by_layer_size(self, dead: torch.Tensor) -> None:
        """The reference's sample_connectivity(): every dead or free slot is reborn at theta = 1e-12, its layer
        drawn in proportion to layer size, its position uniform among the layer's dormant ones. Host-side
        bookkeeping, O(N) per call: once per run for init="reference", every rewiring for regrow="layer-size"
        (the price of the reference's rule; the default rule stays on the device in O(K + M))."""
        n, theta_ext = self.total, self.theta_buf
        cpu_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator,
                                                                  device=self.generator.device)))
        live = (theta_ext[:n] > 0).cpu()
        counts, start = [], 0
        for s in self._sizes:
            counts.append(int(live[start : start + s].sum()))
            start += s
        dead_idx = torch.nonzero(dead).squeeze(1)
        add = fill_by_layer_size(self._sizes, counts, int(dead_idx.numel()), cpu_gen)
        new = torch.nonzero(place(self._sizes, add, cpu_gen, active=live.clone()) & ~live).squeeze(1)
        new = new[torch.randperm(len(new), generator=cpu_gen)].to(self.slots.device)
        theta_ext[new] = REBIRTH_THETA
        self.slots[dead_idx] = new

    @torch.no_grad()
    def _rebirth(self, dead: torch.Tensor | None = None) -> None:
        n, theta_ext, slots = self.total, self.theta_buf, self.slots
        if dead is None:
            dead = theta_ext.index_select(0, slots) == 0  # slots to refill
        dead_rank = torch.cumsum(dead, 0)  # 1-based rank of each dead slot
        needed = dead_rank[-1]
        # Pass 1: M uniform candidate positions in random order; keep the first `needed` distinct dormant ones.
        m = self.n_candidates
        cand = torch.randint(0, n, (m,), device=slots.device, generator=self.generator)
        ok = theta_ext.index_select(0, cand) == 0
        # Drop duplicate candidates in O(M), no sort: each writes a distinct negative tag into its (dormant,
        # hence zero) position with a deterministic min-reduction; the one whose tag survives owns it.
        tag = -torch.arange(1, m + 1, device=slots.device, dtype=theta_ext.dtype)
        theta_ext.scatter_reduce_(0, torch.where(ok, cand, n), tag, reduce="amin")
        ok &= theta_ext.index_select(0, cand) == tag
        theta_ext.index_fill_(0, torch.where(ok, cand, n), 0.0)  # clear the tags
        ok_rank = torch.cumsum(ok, 0)
        chosen = ok & (ok_rank <= needed)
        picks = torch.full((m + 1,), n, dtype=slots.dtype, device=slots.device)
        picks.index_copy_(0, torch.where(chosen, ok_rank - 1, m), cand)  # picks[r] = the r-th chosen candidate
        picks[m] = n
        fill = dead & (dead_rank <= chosen.sum())
        slots = torch.where(fill, picks.index_select(0, (dead_rank - 1).clamp(0, m)), slots)
        theta_ext.index_fill_(0, torch.where(fill, slots, n), REBIRTH_THETA)
        theta_ext[n] = 0.0
        short = dead & ~fill
        # Pass 2, only when pass 1 fell short (practically never): the next dormant positions after a
        # random offset. A host check is free on the CPU; on an accelerator the pass runs branch-free.
        if slots.device.type != "cpu" or bool(short.any()):
            slots = self._fill_shortfall(slots, short)
        self.slots = slots

    def _fill_shortfall(self, slots: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
        n, theta_ext, k = self.total, self.theta_buf, self.budget
        want = short.sum()
        dormant = theta_ext[:n] == 0
        rank = torch.cumsum(dormant, 0)
        offset = torch.randint(0, n, (1,), device=slots.device, generator=self.generator)
        base = torch.where(offset > 0, rank[(offset - 1).clamp(min=0)], torch.zeros_like(offset))
        pos_rank = torch.remainder(rank - 1 - base, rank[-1].clamp(min=1))
        take = dormant & (pos_rank < want)
        found = torch.nonzero_static(take, size=k, fill_value=n).squeeze(1)  # static shape: no host sync
        short_rank = torch.cumsum(short, 0)
        slots = torch.where(short, found[(short_rank - 1).clamp(0, k - 1)], slots)
        theta_ext.index_fill_(0, torch.where(short, slots, n), REBIRTH_THETA)
        theta_ext[n] = 0.0
        return slots

    @torch.no_grad()
    def _rebirth_near(self, dead: torch.Tensor) -> None:
        """Structured regrowth (Seidel, TU Graz): each rebirth at the nearest dormant position to a live seed.

        The dead count is spread over layers in proportion to their size (as in random rebirth), capped at
        each layer's dormant count (the overflow drawn again among layers with room, so the budget stays
        exact). In each layer, c seeds are taken among its live connections — `l2`: c at random;
        `l2-magnitude-seeded` (alias `l2-weighted`): the c of largest theta (= |w|), i.e. the magnitude
        weights which seeds are chosen, never the distance — and each seed rebirths a dormant position of
        minimum Euclidean distance in the layer's index space (out, in, kh, kw), exactly (`nearest_dormant`),
        ties at random, never two rebirths at one position. A layer with no live connection takes uniform
        seeds (a dormant seed is then its own nearest position). Per-layer counts are read on the host
        once per step (a few layers, not weights).
        """
        theta_ext, slots, gen = self.theta_buf, self.slots, self.generator
        dead_idx = torch.nonzero(dead).squeeze(1)
        if dead_idx.numel() == 0:
            return
        n_layers = len(self.layers)
        live_pos = torch.sort(slots[~dead]).values  # each layer's live connections: one slice
        edges = torch.cat([self._layer_starts, self._layer_starts.new_tensor([self.total])])
        ends = torch.searchsorted(live_pos, edges)
        room = self._layer_sizes.long() - (ends[1:] - ends[:-1])  # dormant positions per layer (live = theta > 0)
        layer_of_dead = torch.multinomial(self._layer_sizes, dead_idx.numel(), replacement=True, generator=gen)
        counts = torch.bincount(layer_of_dead, minlength=n_layers)
        while True:  # a layer cannot rebirth more than it has dormant: the overflow goes elsewhere
            over = (counts - room).clamp(min=0)
            excess = int(over.sum())
            if excess == 0:
                break
            counts -= over
            weight = self._layer_sizes * (counts < room)
            counts += torch.bincount(torch.multinomial(weight, excess, replacement=True, generator=gen),
                                     minlength=n_layers)
        counts, room, ends = counts.tolist(), room.tolist(), ends.tolist()
        born = []
        for li, c in enumerate(counts):
            if c == 0:
                continue
            start, size = self._offsets[li]
            live = live_pos[ends[li] : ends[li + 1]]
            if live.numel() == 0:  # nothing to grow next to: uniform seeds in the layer
                seeds = start + torch.randint(0, size, (c,), device=slots.device, generator=gen)
            elif self.regrow == "l2-magnitude-seeded":
                if c <= live.numel():
                    seeds = live[torch.topk(theta_ext[live], c, sorted=False).indices]
                else:  # more rebirths than live connections: every one seeds, the strongest again
                    order = torch.argsort(theta_ext[live], descending=True, stable=True)
                    seeds = live[order[torch.arange(c, device=slots.device) % live.numel()]]
            else:
                pick = torch.randperm(live.numel(), device=slots.device, generator=gen)[:c]
                if c > live.numel():
                    pick = torch.cat([pick, torch.randint(0, live.numel(), (c - live.numel(),), device=slots.device,
                                                          generator=gen)])
                seeds = live[pick]
            born.append(nearest_dormant(theta_ext, start, size, self._index_shapes[li], seeds - start, gen,
                                        n_dormant=room[li]))
        new = torch.cat(born)
        slots[dead_idx] = new  # theta there is already REBIRTH_THETA (set while searching)
        self.slots = slots

    def state_tensors(self):
        return {"bcs.theta": self.theta.clone(), "bcs.sign": self.sign.to(torch.int8), "bcs.slots": self.slots.clone(),
                "bcs.momentum": self.buf.clone(), "bcs.steps": torch.tensor([self.steps], dtype=torch.int64)}

    def load_state_tensors(self, state):
        self.theta.copy_(state["bcs.theta"])
        self.sign.copy_(state["bcs.sign"].to(self.sign.dtype))
        self.slots = state["bcs.slots"].to(self.slots.device).clone()
        self.buf.copy_(state["bcs.momentum"])
        self.steps = int(state["bcs.steps"][0])


# random: uniform over dormant positions (rsp, no host sync); layer-size: the reference's rule, each rebirth's
# layer in proportion to layer size, then uniform in it (host-side, once per rewiring); l2: nearest dormant
# position to random live seeds; l2-magnitude-seeded: the same, seeds = the live connections of largest
# |theta| (the magnitude weights the choice of seeds; distances are unweighted)
REGROW = ("random", "layer-size", "l2", "l2-magnitude-seeded")
REGROW_ALIASES = {"l2-weighted": "l2-magnitude-seeded"}  # the old name, still accepted


def canonical_regrow(rule):
    """A regrow rule's canonical name (aliases resolved); anything else is returned unchanged."""
    return REGROW_ALIASES.get(rule, rule) if isinstance(rule, str) else rule


def _index_shape(shape: torch.Size) -> tuple[int, int, int, int]:
    """A weight's index space as (out, in, kh, kw); linear layers are (out, in, 1, 1)."""
    return tuple(shape) if len(shape) == 4 else (shape[0], shape[1], 1, 1)


# Exact nearest-dormant search (see nearest_dormant). Bounds on memory and work per pass:
_PAIRS = 1 << 21  # (seed, candidate) pairs looked at in one pass: a few int64 tensors of this size
_BAND_MAX = 1 << 16  # offsets per distance band (a band is split while larger, down to one squared length)
_BAND_GROWTH = 1.3  # band [lo, hi) of squared lengths: hi ~ 1.3 lo
_RANK_CAP = 1024  # copies of one seed served in one pass (the rest wait for the next)
_BRUTE_MIN_BAND = 256  # from a band of more offsets on, compare it with the dormant count:
_BRUTE_RATIO = 1.0  # dormant <= ratio * band size: search the dormant list instead


def _isqrt(x: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(x)) of a non-negative int64 tensor, exact."""
    r = torch.sqrt(x.double()).long()
    r = r - (r * r > x).long()
    return r + ((r + 1) * (r + 1) <= x).long()


def _band(bounds: tuple[int, int, int, int], lo: int, hi: int, count_only: bool = False):
    """Integer offsets v with |v_i| <= bounds[i] and lo <= |v|^2 < hi, sorted by |v|^2 (CPU, int64).

    Enumerated without touching the rest of the box: a grid over three axes, and along the widest axis
    only the one or two runs of values that land in the band. count_only: just their number.
    """
    ax = max(range(4), key=lambda i: bounds[i])
    others = [i for i in range(4) if i != ax]
    rmax = math.isqrt(hi - 1)
    grid = torch.cartesian_prod(*[torch.arange(-min(bounds[i], rmax), min(bounds[i], rmax) + 1) for i in others])
    s = (grid**2).sum(1)
    keep = s < hi
    grid, s = grid[keep], s[keep]
    bh = _isqrt(hi - 1 - s).clamp(max=bounds[ax])  # |b| <= bh: s + b^2 < hi
    rest = lo - s
    bl = torch.where(rest > 0, _isqrt((rest - 1).clamp(min=0)) + 1, torch.zeros_like(rest))  # |b| >= bl: s + b^2 >= lo
    n = torch.where(bh < bl, 0, torch.where(bl == 0, 2 * bh + 1, 2 * (bh - bl + 1)))
    if count_only:
        return int(n.sum())
    rows = torch.repeat_interleave(torch.arange(len(grid)), n)
    k = torch.arange(len(rows)) - (torch.cumsum(n, 0) - n)[rows]
    blr, bhr = bl[rows], bh[rows]
    b = torch.where(blr == 0, k - bhr, (blr + k // 2) * (1 - 2 * (k % 2)))
    out = torch.empty((len(rows), 4), dtype=torch.long)
    out[:, others] = grid[rows]
    out[:, ax] = b
    d2 = s[rows] + b * b
    order = torch.argsort(d2, stable=True)
    return out[order], d2[order]


@functools.lru_cache(maxsize=4096)
def _band_edge(bounds: tuple[int, int, int, int], lo: int) -> tuple[int, int]:
    """The band that starts at squared length lo: (hi, number of offsets), at most _BAND_MAX unless one
    squared length alone has more."""
    hi = max(lo + 1, int(lo * _BAND_GROWTH), 2)
    m = _band(bounds, lo, hi, count_only=True)
    while m > _BAND_MAX and hi > lo + 1:
        hi = lo + max(1, (hi - lo) // 2)
        m = _band(bounds, lo, hi, count_only=True)
    return hi, m


@functools.lru_cache(maxsize=256)
def _band_cached(bounds, lo, hi, device):
    offs, d2 = _band(bounds, lo, hi)
    return offs.to(device), d2.to(device)


def _runs(pos: torch.Tensor):
    """Runs of equal values in sorted positions: (run of each entry, first entry of each run, rank of each
    entry in its run: 0 for the first, 1 for the second, ...)."""
    new = torch.ones_like(pos, dtype=torch.bool)
    new[1:] = pos[1:] != pos[:-1]
    first = torch.nonzero(new).squeeze(1)
    uid = torch.cumsum(new, 0) - 1
    return uid, first, torch.arange(len(pos), device=pos.device) - first[uid]


def _claim(target: torch.Tensor, ok: torch.Tensor, prio: torch.Tensor, span: int) -> torch.Tensor:
    """Indices of the winners: among the `ok` entries wanting one target, the one of lowest prio (< span)."""
    idx = torch.nonzero(ok).squeeze(1)
    key = target[idx] * span + prio[idx]
    key, order = torch.sort(key)
    t = key // span
    first = torch.ones_like(t, dtype=torch.bool)
    first[1:] = t[1:] != t[:-1]
    return idx[order[first]]


def nearest_dormant(theta_ext: torch.Tensor, start: int, size: int, shape: tuple[int, int, int, int],
                    seeds: torch.Tensor, generator: torch.Generator, *, n_dormant: int | None = None,
                    return_order: bool = False):
    """For each seed (a flat index inside one layer), a dormant position (theta == 0) of that layer at
    minimum Euclidean distance in the layer's index space (out, in, kh, kw), exact. Returns global flat
    positions, one per seed, all distinct; each is set to REBIRTH_THETA when taken, so a later seed sees it
    as live. With return_order, also a claim key per seed: each rebirth is nearest among the positions
    dormant before the call minus those taken with a smaller key.

    Algorithm (no N x N distances, no loop over seeds or weights; torch ops on any device):
    * Distance bands. Offsets are enumerated in bands of squared length [lo, hi) (hi ~ 1.3 lo, at most
      _BAND_MAX offsets, clipped to the layer's extent), each sorted by squared length with a fresh random
      order inside equal lengths. The pending seeds look at a whole band at once, in chunks of at most
      _PAIRS (seed, offset) pairs, and each takes the first dormant position in that order. A hit in band
      [lo, hi) is exact: every offset shorter than lo was seen occupied (or outside) in an earlier band,
      and positions only ever go from dormant to taken, so none of them has become free since.
    * Conflicts. Several seeds wanting one position: one wins (random priority), the others look at the
      band again, seeing what is left; a seed whose band has nothing dormant moves on to the next band.
      k identical seeds (a repeated seed) take the 1st, 2nd, ... k-th dormant position of their common
      order in one pass, lower rank winning any conflict, which is the same as taking them one by one.
    * Dense layers. When the next band has at least as many offsets as the layer has dormant positions,
      the remaining seeds switch to an exact search over the list of dormant positions (randomly ordered,
      chunks of at most _PAIRS (seed, position) distances), with the same conflict rule.
    Ties are broken at random (the random order inside equal lengths); a seed that is itself dormant
    (a layer without live connections) is its own nearest position.
    """
    device = seeds.device
    trash = theta_ext.numel() - 1
    shape = tuple(int(s) for s in shape)
    bounds = tuple(s - 1 for s in shape)
    strides = (shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1)
    strides_t = torch.tensor(strides, device=device)
    n = seeds.numel()
    result = torch.full((n,), -1, dtype=torch.long, device=device)
    claim_key = torch.full((n,), -1, dtype=torch.long, device=device)
    if n == 0:
        return (result, claim_key) if return_order else result
    pos, perm = torch.sort(seeds.long(), stable=True)  # equal seeds side by side (ranks); masks keep the order
    coords = torch.stack([(pos // strides[i]) % shape[i] for i in range(4)], 1)
    found = torch.full((n,), -1, dtype=torch.long, device=device)
    key_sorted = torch.full((n,), -1, dtype=torch.long, device=device)
    axes = [i for i in range(4) if bounds[i] > 0]
    max_d2 = sum(b * b for b in bounds)
    dormant = n_dormant
    if dormant is not None and dormant < n:
        raise RuntimeError(f"{n} rebirths but only {dormant} dormant positions in the layer")
    passes = 0

    def settle(chunk, target, ok, rank):
        nonlocal passes, dormant
        span = (_RANK_CAP + 1) * len(chunk)
        prio = rank.clamp(max=_RANK_CAP) * len(chunk) + torch.randperm(len(chunk), device=device, generator=generator)
        win = _claim(target, ok, prio, span)
        theta_ext[target[win]] = REBIRTH_THETA
        found[chunk[win]] = target[win]
        key_sorted[chunk[win]] = passes * (_RANK_CAP + 1) + rank[win]
        passes += 1
        if dormant is not None:
            dormant -= len(win)
        won = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        won[win] = True
        return won

    pending = torch.arange(n, device=device)
    lo, brute = 0, False
    while pending.numel():
        if lo > max_d2:
            raise RuntimeError("no dormant position left in the layer")
        hi, m = _band_edge(bounds, lo)
        if m == 0:
            lo = hi
            continue
        if m > _BRUTE_MIN_BAND:
            if dormant is None:
                dormant = int((theta_ext[start : start + size] == 0).sum())
            if dormant <= m * _BRUTE_RATIO:
                brute = True
                break
        offs, d2 = _band_cached(bounds, lo, hi, device) if m <= 4096 else (t.to(device) for t in _band(bounds, lo, hi))
        order = torch.argsort(d2.double() + torch.rand(m, device=device, dtype=torch.float64, generator=generator))
        offs = offs[order]
        delta = (offs * strides_t).sum(1)
        moved = []
        while pending.numel():
            waiting = []
            for chunk in pending.split(max(1, _PAIRS // m)):
                uid, first, rank = _runs(pos[chunk])  # equal seeds scan the band once
                u = chunk[first]
                c = coords[u]
                inside = None
                for i in axes:
                    v = c[:, i, None] + offs[None, :, i]
                    ok = (v >= 0) & (v <= bounds[i])
                    inside = ok if inside is None else inside & ok
                flat = (start + pos[u])[:, None] + delta[None]
                if inside is not None:
                    flat = torch.where(inside, flat, trash)
                free = theta_ext[flat] == 0
                if inside is not None:
                    free &= inside
                count = free.sum(1)[uid]
                k = min(int(rank.max()) + 1, _RANK_CAP, max(1, _PAIRS // len(u)))
                if k == 1:
                    j = torch.argmax(free.to(torch.uint8), 1)  # the first dormant one in the band's order
                    target = flat.gather(1, j[:, None]).squeeze(1)[uid]
                else:  # the copy of rank r takes the (r+1)-th dormant one
                    cum = torch.cumsum(free, 1)
                    want = torch.arange(1, k + 1, device=device).expand(len(u), k).contiguous()
                    j = torch.searchsorted(cum, want).clamp(max=m - 1)
                    target = flat.gather(1, j)[uid, rank.clamp(max=k - 1)]
                ok = (count > rank) & (rank < k)
                won = settle(chunk, target, ok, rank)
                moved.append(chunk[count == 0])
                waiting.append(chunk[(count > 0) & ~won])
            pending = torch.cat(waiting)
        pending = torch.sort(torch.cat(moved)).values  # back in seed order: equal seeds side by side
        lo = hi
    if brute:
        dpos = torch.nonzero(theta_ext[start : start + size] == 0).squeeze(1)
        dpos = dpos[torch.randperm(len(dpos), device=device, generator=generator)]  # random ties
        while pending.numel():
            if len(dpos) < 1:
                raise RuntimeError("no dormant position left in the layer")
            dco = torch.stack([(dpos // strides[i]) % shape[i] for i in range(4)], 1)
            waiting = []
            for chunk in pending.split(max(1, _PAIRS // len(dpos))):
                free = theta_ext[start + dpos] == 0
                n_free = int(free.sum())
                if n_free == 0:
                    raise RuntimeError("no dormant position left in the layer")
                uid, first, rank = _runs(pos[chunk])
                c = coords[chunk[first]]
                d2 = torch.zeros((len(first), len(dpos)), dtype=torch.long, device=device)
                for i in axes:
                    d2 += (c[:, i, None] - dco[None, :, i]) ** 2
                d2 = torch.where(free[None], d2, max_d2 + 1)
                k = min(int(rank.max()) + 1, n_free, _RANK_CAP)
                if k == 1:
                    j = torch.argmin(d2, 1)[uid]  # first minimum: random among ties (the list's order)
                else:
                    unique = d2 * len(dpos) + torch.arange(len(dpos), device=device)
                    js = torch.topk(unique, k, dim=1, largest=False, sorted=True).indices
                    j = js[uid, rank.clamp(max=k - 1)]
                won = settle(chunk, start + dpos[j], rank < k, rank)
                waiting.append(chunk[~won])
            pending = torch.cat(waiting)
            dpos = dpos[theta_ext[start + dpos] == 0]
    result[perm] = found
    claim_key[perm] = key_sorted
    return (result, claim_key) if return_order else result


def make_sparse(method: str, model: nn.Module, sparsity: float, generator: torch.Generator, *,
                model_name: str = "", **bcs_options) -> SparseMethod | None:
    """`dense` -> None; `fixed` -> FixedMask; `random` -> RandomMask; `bcs` -> BayesianRewiring."""
    if method == "dense":
        return None
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if method == "fixed":
        return FixedMask(model, sparsity, generator, model_name=model_name, init=bcs_options.get("init", "budget"))
    if method == "random":
        return RandomMask(model, sparsity, generator)
    if method == "bcs":
        return BayesianRewiring(model, sparsity, generator, model_name=model_name, **bcs_options)
    raise ValueError(f"unknown method {method!r}")


def layer_report(state: dict[str, torch.Tensor], layer_names: Iterable[str]) -> tuple[list[dict], float]:
    """Per-layer {name, shape, nonzero} and the measured sparsity, read from plain weights."""
    rows, zeros, total = [], 0, 0
    for name in layer_names:
        w = state[f"{name}.weight"]
        nz = int(torch.count_nonzero(w))
        rows.append({"name": f"{name}.weight", "shape": list(w.shape), "nonzero": nz, "numel": w.numel()})
        zeros += w.numel() - nz
        total += w.numel()
    return rows, (zeros / total if total else 0.0)
