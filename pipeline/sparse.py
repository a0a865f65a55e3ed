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
            return allocate_budget(sizes, self.budget, spec, generator, rest="layer-size", floor=True)
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
        if regrow not in REGROW:
            raise ValueError(f"unknown regrow rule {regrow!r}; choose one of {', '.join(REGROW)}")
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
        """Structured regrowth (Seidel 2022/23): rebirths go next to existing connections.

        The dead count is spread over layers in proportion to their size (as in random rebirth); in each
        layer, n seeds are drawn among its active connections (`l2`: at random; `l2-weighted`: the n of
        largest |theta|) and each seed rebirths the nearest dormant position by Euclidean distance in the
        layer's index space (out, in, kh, kw), ties broken at random, never two rebirths at one position.
        Per-layer counts are read on the host once per step (a few layers, not weights).
        """
        theta_ext, slots, gen = self.theta_buf, self.slots, self.generator
        dead_idx = torch.nonzero(dead).squeeze(1)
        if dead_idx.numel() == 0:
            return
        layer_of_dead = torch.multinomial(self._layer_sizes, dead_idx.numel(), replacement=True, generator=gen)
        counts = torch.bincount(layer_of_dead, minlength=len(self.layers)).tolist()
        live_pos = slots[~dead]
        live_layer = torch.searchsorted(self._layer_starts, live_pos, right=True) - 1
        born = []
        for li, c in enumerate(counts):
            if c == 0:
                continue
            start, size = self._offsets[li]
            live = live_pos[live_layer == li]
            if live.numel() == 0:  # nothing to grow next to: uniform seeds in the layer
                seeds = start + torch.randint(0, size, (c,), device=slots.device, generator=gen)
            elif self.regrow == "l2-weighted":
                order = torch.argsort(theta_ext[live], descending=True, stable=True)
                seeds = live[order[torch.arange(c, device=slots.device) % live.numel()]]
            else:
                pick = torch.randperm(live.numel(), device=slots.device, generator=gen)[:c]
                if c > live.numel():
                    pick = torch.cat([pick, torch.randint(0, live.numel(), (c - live.numel(),), device=slots.device,
                                                          generator=gen)])
                seeds = live[pick]
            born.append(nearest_dormant(theta_ext, start, size, self._index_shapes[li], seeds - start, gen))
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
# layer in proportion to layer size, then uniform in it (host-side, once per rewiring); l2, l2-weighted: structured
REGROW = ("random", "layer-size", "l2", "l2-weighted")


def _index_shape(shape: torch.Size) -> tuple[int, int, int, int]:
    """A weight's index space as (out, in, kh, kw); linear layers are (out, in, 1, 1)."""
    return tuple(shape) if len(shape) == 4 else (shape[0], shape[1], 1, 1)


_OFFSET_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def _shell_offsets(radius: int, device) -> torch.Tensor:
    """Integer offsets with max |component| == radius (the cube shell), with their squared length: (m, 5)."""
    key = (radius, str(device))
    if key not in _OFFSET_CACHE:
        r = torch.arange(-radius, radius + 1)
        grid = torch.cartesian_prod(r, r, r, r)
        grid = grid[grid.abs().amax(1) == radius]
        d2 = (grid**2).sum(1)
        _OFFSET_CACHE[key] = torch.cat([grid, d2[:, None]], 1).to(device)
    return _OFFSET_CACHE[key]


def nearest_dormant(theta_ext: torch.Tensor, start: int, size: int, shape: tuple[int, int, int, int],
                    seeds: torch.Tensor, generator: torch.Generator, radius: int = 2, rounds: int = 6) -> torch.Tensor:
    """For each seed (a flat index inside one layer), the nearest dormant position of that layer.

    Searches outward (no N x N distances): first the 80 offsets of the cube of radius 1, then the shell of
    radius 2, and so on, each sorted by Euclidean length with random tie-breaks. Every seed looks at a
    whole cube shell at once and takes the first dormant position; a position wanted by several seeds goes
    to one of them and the others look again. Chosen positions are set to the rebirth value at once, so no
    position is taken twice. (A radius-1 hit at squared length <= 3 is exact; at 4 it ties with the
    radius-2 axis offsets.) Seeds with nothing dormant within `radius` take a uniform dormant position of
    the layer. Returns global flat positions.
    """
    device = seeds.device
    trash = theta_ext.numel() - 1
    dims = torch.tensor(shape, device=device)
    strides = torch.tensor([shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1], device=device)
    coords = torch.stack([(seeds // strides[i]) % dims[i] for i in range(4)], 1)
    result = torch.full((seeds.numel(),), -1, dtype=torch.long, device=device)
    pending = torch.arange(seeds.numel(), device=device)
    for r in range(1, radius + 1):
        offs = _shell_offsets(r, device)
        # random tie-break inside equal lengths: squared lengths are integers, a jitter < 1 keeps the order
        jitter = torch.rand(len(offs), device=device, generator=generator)
        offs = offs[torch.argsort(offs[:, 4].float() + jitter)][:, :4]
        far = pending.new_empty(0)
        for _ in range(rounds):
            if pending.numel() == 0:
                break
            cand = coords[pending, None, :] + offs[None]  # (p, m, 4)
            inside = ((cand >= 0) & (cand < dims)).all(2)
            flat = torch.where(inside, start + (cand * strides).sum(2), trash)
            free = inside & (theta_ext[flat] == 0)
            has = free.any(1)
            target = flat[torch.arange(len(pending), device=device), torch.argmax(free.to(torch.uint8), 1)]
            # one winner per wanted position (a deterministic min over tags), as in random rebirth
            tag = -torch.arange(1, len(pending) + 1, device=device, dtype=theta_ext.dtype)
            theta_ext.scatter_reduce_(0, torch.where(has, target, trash), tag, reduce="amin")
            win = has & (theta_ext[target] == tag)
            theta_ext[torch.where(has, target, trash)] = 0.0
            theta_ext[torch.where(win, target, trash)] = REBIRTH_THETA
            theta_ext[trash] = 0.0
            result[pending[win]] = target[win]
            far = torch.cat([far, pending[~has]])
            pending = pending[has & ~win]
        pending = torch.cat([far, pending])
    for j in pending.tolist():
        result[j] = _uniform_dormant(theta_ext, start, size, generator)
    return result


def _uniform_dormant(theta_ext: torch.Tensor, start: int, size: int, generator: torch.Generator) -> int:
    layer = theta_ext[start : start + size]
    while True:
        cand = torch.randint(0, size, (256,), device=theta_ext.device, generator=generator)
        ok = torch.nonzero(layer[cand] == 0)
        if ok.numel():
            pos = start + int(cand[ok[0, 0]])
            theta_ext[pos] = REBIRTH_THETA
            return pos
        if not bool((layer == 0).any()):
            raise RuntimeError("layer has no dormant position left")


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
