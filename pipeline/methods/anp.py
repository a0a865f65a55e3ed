"""`anp-vs` (Madaan, Shin, Hwang, "Adversarial Neural Pruning with Latent Vulnerability Suppression", ICML 2020).

Code: github.com/divyam3897/ANP_VS (TensorFlow; src/model/bbdropout.py, src/experiments/run.py). Every output
unit (conv channel, hidden linear unit) gets a beta-Bernoulli dropout mask (BBDropout, Lee et al. 2018):

    keep probability  pi ~ Kumaraswamy(a, b)             a = softplus(max(a_uc, -10)), b = softplus(clip(b_uc, -10, 50))
                      pi = (1 - u^(1/b))^(1/a), u ~ U(0, 1)   (one pi per unit per step, as their sample_pi)
    training          z = sigmoid((logit(v) + logit(pi)) / 0.1), v ~ U(0, 1)   relaxed Bernoulli, one z per example
    evaluation        z = E[pi] = b B(1 + 1/a, b), set to 0 where E[pi] <= 1e-3  (pruned units)
    prior             pi ~ Beta(alpha, 1), alpha = 1e-4 (their alpha, the alpha/K of the beta-Bernoulli process)
    KL(q || p)        (1 - alpha/a)(-gamma - digamma(b) - 1/b) + log(a b / alpha) - (b - 1)/b   per unit

The KL is Nalisnick & Smyth's Kumaraswamy-Beta expression, whose infinite series vanishes for a Beta(alpha, 1)
prior, so it is exact here (gamma: Euler's constant). Their loss adds beta_weight * sum(KL) / N_train to the
per-example mean loss (README: beta_weight 2 on CIFAR-10, 1 on CIFAR-100, 4 on MNIST; flag default 1) and
lambda * vulnerability (lambda 1e-4 on CIFAR, 1e-3 on MNIST; flag default 1e-4), the latter being rsp's
`--vs-lambda` (objectives.py) for every method. Initial a_uc: 2.0 for their VGG's conv gates (E[pi] = 0.68),
-1.0 elsewhere (E[pi] = 0.24); b_uc = 0.5413 (b = 1).

The latent features z and their vulnerability live at the end of this module: `vulnerability_loss` (the
--vs-lambda term) and `latent_vulnerability` (rsp verify's measure).

rsp runs the masks through the `gate` parametrisation of rsp.sparse, w = weight * mask * g[out], on every
conv/linear layer except the last one (the classifier: its outputs are the logits, which their code never
gates), with two deliberate details:

* One mask per example, as theirs: every gated conv here feeds a BatchNorm, and train-mode BatchNorm divides
  out any per-channel scale shared by the batch, so one z per batch (folded into the weight) would give the
  gates almost no data gradient (only through BatchNorm's eps). While sampling, gate() is 1 and the layer's
  forward (rsp.sparse, `example_gates`) multiplies each example's output (bias excluded) by its own z.
  `per_example=False` folds one z per batch into the weight.
* A sample is drawn only when it can train something: train mode with autograd on. Under torch.no_grad
  (to_dense, dense_state_dict, frozen_weights) and in eval mode, gate() is the thresholded expectation, so
  folding or saving never bakes a random draw into the weights, whatever mode the model is in.

Optimisation follows their two optimizers: the masks get their own Adam (lr 1e-2 times the phase's schedule
factor; their lr1 = 1e-2 with the weights' staircase), the weights the trainer's SGD. The gate tensors are
Parameters of the gate modules (state_dict, resume; the trainer averages their gradients over ranks), listed
in `self_updated_params`, so the trainer's SGD leaves them to `step`, which applies Adam. Plain SGD on KL / N_train (about 2e-5 per unit at CIFAR size) would move a gate by ~1 over a 200-epoch
CIFAR run and prune nothing; Adam's normalised steps are what makes their masks sparse. `gate_optimizer="sgd"`
leaves the gates to the trainer's optimizer instead. Differences that remain: the gates here see the whole
objective (theirs: adversarial CE + KL only), and the weights get SGD with decoupled decay (theirs: Adam).

Phases: `anp` (gates + robust objective; the weights are not at the budget) -> `finetune`: units with
E[pi] <= 1e-3 are pruned (their weight rows zeroed), the gates are folded into the weights at their
expectation (to_dense), and where more than the budget K of weights remain, rsp finishes with global
magnitude pruning to K; the survivors are fine-tuned robustly under that fixed mask. By default a first phase
of dense robust pre-training comes before (their code warm-starts ANP from a trained base model); a two-entry
split drops it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attacks import as_float_images, attack_mode
from ..sparse import FixedMask, SparseMethod, SparseMixin, _convert, global_magnitude_masks, sparsifiable_layers
from . import Method, Phase, budget_of, register

EULER = 0.577215664901532
ALPHA = 1e-4  # prior Beta(alpha, 1)
THRESHOLD = 1e-3  # a unit is pruned when E[pi] <= this (their thres; kept while E[pi] > thres)
TEMPERATURE = 0.1  # relaxed Bernoulli (their ber_concrete(1e-1, ...))
A_UC_INIT_CONV = 2.0  # their VGG's conv gates
A_UC_INIT_LINEAR = -1.0  # their BBDropout default (LeNet, VGG's dense gates)
B_UC_INIT = 0.5413  # softplus(0.5413) = 1.0
GATE_LR = 1e-2  # their init_lr for the mask parameters (Adam)
KL_WEIGHT = {"cifar10": 2.0, "cifar100": 1.0, "mnist": 4.0}  # their README's --beta_weight; else the flag's 1.0
VS_LAMBDA = 1e-4  # their --lambda_weight default and CIFAR runs (objectives.py applies it as --vs-lambda)
_U_EPS = 1e-6  # uniform draws kept inside (0, 1): float32 cannot hold their 1 - 1e-10
_LOG_EPS = 1e-20  # their log(x) = log(x + 1e-20)


# --- the distributions -------------------------------------------------------------------------------


def softplus_params(a_uc: torch.Tensor, b_uc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the Kumaraswamy posterior from the unconstrained parameters, clipped as their BBDropout."""
    return F.softplus(a_uc.clamp(min=-10.0)), F.softplus(b_uc.clamp(-10.0, 50.0))


def kumaraswamy_sample(a: torch.Tensor, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """pi = (1 - u^(1/b))^(1/a) for u in (0, 1): the inverse CDF, differentiable in a and b.
    1 - u^(1/b) = -expm1(log(u) / b) stays exact and > 0 where u^(1/b) is close to 1."""
    return torch.exp(torch.log(-torch.expm1(torch.log(u) / b)) / a)


def kumaraswamy_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """E[pi] = b B(1 + 1/a, b), in float64 (lgamma of 1/a ~ 2e4 at the clip would lose digits in float32)."""
    a64, b64 = a.double(), b.double()
    out = b64 * torch.exp(torch.lgamma(1 + 1 / a64) + torch.lgamma(b64) - torch.lgamma(1 + 1 / a64 + b64))
    return out.to(a.dtype)


def kl_kumaraswamy_beta(a: torch.Tensor, b: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """KL(Kumaraswamy(a, b) || Beta(alpha, 1)) per unit (exact: the series term has a factor beta - 1 = 0)."""
    return ((1 - alpha / a) * (-EULER - torch.digamma(b) - 1 / b) + torch.log(a * b / alpha) - (b - 1) / b)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p + _LOG_EPS) - torch.log(1 - p + _LOG_EPS)


def relaxed_bernoulli(pi: torch.Tensor, v: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Concrete / relaxed Bernoulli draw in [0, 1] with keep probability pi: sigmoid((logit v + logit pi) / t)."""
    return torch.sigmoid((_logit(v) + _logit(pi)) / temperature)


# --- the gate module ---------------------------------------------------------------------------------


class BetaBernoulliGate(nn.Module):
    """Beta-Bernoulli dropout mask of `n` output units (module docstring). Called with no arguments it
    returns the per-unit multiplier that rsp.sparse folds into the weight: while sampling (train mode,
    autograd on) one relaxed-Bernoulli draw per unit, or ones when `per_example` (the layer's forward then
    applies `example_masks(batch)`); otherwise E[pi], zero where E[pi] <= threshold."""

    def __init__(self, n: int, a_uc_init: float = A_UC_INIT_LINEAR, b_uc_init: float = B_UC_INIT, *,
                 alpha: float = ALPHA, threshold: float = THRESHOLD, temperature: float = TEMPERATURE,
                 per_example: bool = True, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.n, self.alpha, self.threshold, self.temperature = n, alpha, threshold, temperature
        self.per_example = per_example
        self.generator = generator  # the run's checkpointed stream; not module state
        self.a_uc = nn.Parameter(torch.full((n,), float(a_uc_init), device=device, dtype=dtype))
        self.b_uc = nn.Parameter(torch.full((n,), float(b_uc_init), device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"{self.n}, alpha={self.alpha:g}, threshold={self.threshold:g}, per_example={self.per_example}"

    @property
    def sampling(self) -> bool:
        # a draw only where it can train something; folds and saves (no_grad) see the expectation
        return self.training and torch.is_grad_enabled()

    def ab(self) -> tuple[torch.Tensor, torch.Tensor]:
        return softplus_params(self.a_uc, self.b_uc)

    def keep_probability(self) -> torch.Tensor:
        """E[pi] per unit (differentiable)."""
        return kumaraswamy_mean(*self.ab())

    def active(self) -> torch.Tensor:
        """Units that survive: E[pi] > threshold."""
        return self.keep_probability().detach() > self.threshold

    def expected(self) -> torch.Tensor:
        """The evaluation mask: E[pi], zero at pruned units."""
        e = self.keep_probability()
        return e * (e > self.threshold).to(e.dtype)

    def kl(self) -> torch.Tensor:
        a, b = self.ab()
        return kl_kumaraswamy_beta(a, b, self.alpha).sum()

    def _uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        g = self.generator
        return torch.rand(shape, device=self.a_uc.device, dtype=self.a_uc.dtype,
                          generator=g).clamp_(_U_EPS, 1 - _U_EPS)

    def sample_pi(self) -> torch.Tensor:
        a, b = self.ab()
        return kumaraswamy_sample(a, b, self._uniform((self.n,)))

    def sample(self, batch: int | None = None) -> torch.Tensor:
        """Relaxed-Bernoulli masks: (batch, n) sharing one pi draw (their mask()), or (n,) for batch None."""
        pi = self.sample_pi()
        return relaxed_bernoulli(pi, self._uniform((self.n,) if batch is None else (batch, self.n)), self.temperature)

    def forward(self) -> torch.Tensor:
        if not self.sampling:
            return self.expected()
        if self.per_example:
            return torch.ones_like(self.a_uc)
        return self.sample()

    def example_masks(self, batch: int) -> torch.Tensor | None:
        """(batch, n) masks, one per example, while sampling per example; else None (gate() is folded)."""
        return self.sample(batch) if self.per_example and self.sampling else None


def _units(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


# --- the sparse method of the anp phase ------------------------------------------------------------


class BetaBernoulliGates(SparseMethod):
    """The `anp` phase: a BetaBernoulliGate on every conv/linear layer but the last (the classifier).

    extra_loss() = kl_scale * sum of the gates' KL (kl_scale = kl_weight / N_train). weight_params() and
    decayed_params(): all conv/linear weights (classifier included); the gate parameters are never decayed.
    With gate_optimizer "adam" the gates' gradients are diverted from the trainer's optimizer (module
    docstring) and `step` applies Adam at gate_lr * decay_scale; its moments are in state_tensors().
    The masks start at ones: the unit pruning of the next phase zeroes rows.
    """

    name = "anp-vs"

    def __init__(self, model: nn.Module, sparsity: float, *, kl_scale: float, generator: torch.Generator | None = None,
                 gate_optimizer: str = "adam", gate_lr: float = GATE_LR, per_example: bool = True,
                 a_uc_init_conv: float = A_UC_INIT_CONV, a_uc_init_linear: float = A_UC_INIT_LINEAR,
                 b_uc_init: float = B_UC_INIT, alpha: float = ALPHA, threshold: float = THRESHOLD,
                 temperature: float = TEMPERATURE):
        if gate_optimizer not in ("adam", "sgd"):
            raise ValueError(f"gate_optimizer must be adam or sgd, got {gate_optimizer!r}")
        dense = sparsifiable_layers(model)
        for lname, m in dense:
            if isinstance(m, SparseMixin):
                raise TypeError(f"{lname} is already sparse: fold the model with rsp.sparse.to_dense first")
        if len(dense) < 2:
            raise ValueError("anp-vs needs at least one conv/linear layer before the classifier")
        self.total = sum(m.weight.numel() for _, m in dense)
        self.budget = round((1.0 - sparsity) * self.total)
        self.kl_scale, self.gate_optimizer, self.gate_lr = float(kl_scale), gate_optimizer, float(gate_lr)
        self.threshold = threshold
        self.classifier = dense[-1]  # (name, layer): its outputs are the class logits, never gated
        self.layers = []
        for lname, m in dense[:-1]:
            init = a_uc_init_conv if isinstance(m, nn.Conv2d) else a_uc_init_linear
            gate = BetaBernoulliGate(_units(m), init, b_uc_init, alpha=alpha, threshold=threshold,
                                     temperature=temperature, per_example=per_example, generator=generator,
                                     device=m.weight.device, dtype=m.weight.dtype)
            layer = _convert(m, "gate")
            layer.register_buffer("mask", torch.ones_like(m.weight))
            layer.gate = gate
            self.layers.append((lname, layer))
        self.gates = {n: m.gate for n, m in self.layers}  # kept past to_dense, which drops them from the layers
        self._params = [(f"{n}.{k}", p) for n, g in self.gates.items() for k, p in (("a_uc", g.a_uc), ("b_uc", g.b_uc))]
        self.opt = None
        if gate_optimizer == "adam":
            # their TF AdamOptimizer defaults (beta1 0.9, beta2 0.999, eps 1e-8)
            self.opt = torch.optim.Adam([p for _, p in self._params], lr=self.gate_lr, betas=(0.9, 0.999), eps=1e-8)

    def self_updated_params(self):
        return self.gate_params() if self.opt is not None else []

    def weight_params(self):
        return [m.weight for _, m in self.layers] + [self.classifier[1].weight]

    def gate_params(self) -> list[nn.Parameter]:
        return [p for _, p in self._params]

    def kl(self) -> torch.Tensor:
        return sum(g.kl() for g in self.gates.values())

    def extra_loss(self):
        return self.kl() * self.kl_scale

    def zero_grad(self) -> None:
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)

    def step(self, lr: float, decay_scale: float = 1.0) -> None:
        """Adam on the gates (their gradients are averaged over ranks by the trainer with all others)."""
        if self.opt is None:
            return
        for group in self.opt.param_groups:
            group["lr"] = self.gate_lr * decay_scale
        self.opt.step()

    def active_count(self) -> torch.Tensor:
        """Weights of surviving units (at the current expectation) plus the classifier's."""
        out = torch.zeros((), dtype=torch.long, device=self.classifier[1].weight.device)
        for n, m in self.layers:
            rows = (self.gates[n].active() & (m.mask.reshape(m.mask.shape[0], -1) != 0).any(1))
            out = out + rows.sum() * (m.weight[0].numel())
        return out + self.classifier[1].weight.numel()

    def keep_probabilities(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {n: g.keep_probability().detach().float().cpu() for n, g in self.gates.items()}

    def release(self) -> None:
        """The phase is over (to_dense already dropped the gates from the layers): nothing left to undo."""

    def state_tensors(self):
        if self.opt is None:
            return {}
        out = {}
        for name, p in self._params:
            st = self.opt.state.get(p)
            if st:
                out[f"anp.adam.{name}.exp_avg"] = st["exp_avg"]
                out[f"anp.adam.{name}.exp_avg_sq"] = st["exp_avg_sq"]
                out[f"anp.adam.{name}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).cpu()
        return out

    def load_state_tensors(self, state):
        if self.opt is None:
            return
        for name, p in self._params:
            key = f"anp.adam.{name}"
            if f"{key}.step" in state:
                self.opt.state[p] = {"step": state[f"{key}.step"].reshape(()).float().cpu().clone(),
                                     "exp_avg": state[f"{key}.exp_avg"].to(p.device, p.dtype).clone(),
                                     "exp_avg_sq": state[f"{key}.exp_avg_sq"].to(p.device, p.dtype).clone()}


# --- the method --------------------------------------------------------------------------------------


@register("anp-vs", "beta-Bernoulli unit masks + vulnerability suppression, then magnitude to the budget")
class ANPVS(Method):
    """ANP-VS: (optional dense pre-training) -> beta-Bernoulli unit masks, robust objective -> unit pruning at
    E[pi] <= 1e-3, gates folded, global magnitude pruning to the budget where needed, robust fine-tune.

    `split`: (pretrain, anp, finetune) or (anp, finetune) relative lengths; the default (0.4, 0.4, 0.2) warm-starts
    the gates from a dense robust model, as their code does (from scratch, the per-example gates' noise kept a
    VGG-16 at chance for a 139-step ANP phase on CIFAR-10 in the methods table). `kl_weight`: None takes their
    README's beta_weight for the data set (KL_WEIGHT, else 1.0). `n_train`: the KL's N (None: the trainer's
    ctx.n_train). The `--vs-lambda` default for this method is VS_LAMBDA = 1e-4 (`default_vs_lambda`).
    """

    name = "anp-vs"
    default_vs_lambda = VS_LAMBDA

    def __init__(self, split: Sequence[float] = (0.4, 0.4, 0.2), kl_weight: float | None = None,
                 gate_optimizer: str = "adam", gate_lr: float = GATE_LR, per_example: bool = True,
                 alpha: float = ALPHA, threshold: float = THRESHOLD, temperature: float = TEMPERATURE,
                 a_uc_init_conv: float = A_UC_INIT_CONV, a_uc_init_linear: float = A_UC_INIT_LINEAR,
                 b_uc_init: float = B_UC_INIT, anp_lr: float | None = None, anp_schedule: str = "step",
                 finetune_lr_factor: float = 0.1, finetune_schedule: str = "cosine", n_train: int | None = None):
        split = [float(s) for s in split]
        if len(split) not in (2, 3) or min(split) < 0 or split[-2] <= 0 or split[-1] <= 0:
            raise ValueError(f"split must be (anp, finetune) or (pretrain, anp, finetune) lengths, anp and finetune "
                             f"> 0, got {split}")
        if gate_optimizer not in ("adam", "sgd"):
            raise ValueError(f"gate_optimizer must be adam or sgd, got {gate_optimizer!r}")
        for what, v in (("gate_lr", gate_lr), ("alpha", alpha), ("threshold", threshold), ("temperature", temperature),
                        ("finetune_lr_factor", finetune_lr_factor)):
            if not v > 0:
                raise ValueError(f"{what} must be > 0, got {v}")
        if kl_weight is not None and kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        for what, s in (("anp_schedule", anp_schedule), ("finetune_schedule", finetune_schedule)):
            if s not in ("step", "cosine", "constant"):
                raise ValueError(f"{what} must be step, cosine or constant, got {s!r}")
        self.split = split
        self.names = (["pretrain"] if len(split) == 3 else []) + ["anp", "finetune"]
        self.kl_weight_option, self.kl_weight = kl_weight, kl_weight
        self.gate_options = dict(gate_optimizer=gate_optimizer, gate_lr=gate_lr, per_example=per_example, alpha=alpha,
                                 threshold=threshold, temperature=temperature, a_uc_init_conv=a_uc_init_conv,
                                 a_uc_init_linear=a_uc_init_linear, b_uc_init=b_uc_init)
        self.threshold = threshold
        self.anp_lr, self.anp_schedule = anp_lr, anp_schedule
        self.finetune_lr_factor, self.finetune_schedule = finetune_lr_factor, finetune_schedule
        self.n_train_option, self.n_train = n_train, n_train
        self._anp: BetaBernoulliGates | None = None  # the gates of the phase just trained (for the unit pruning)
        self._record: dict[str, torch.Tensor] = {}  # unit pruning outcome: method state, so resume keeps it

    def phases(self, cfg):
        if self.kl_weight_option is None:
            self.kl_weight = KL_WEIGHT.get(getattr(cfg, "dataset", ""), 1.0)
        f = [s / sum(self.split) for s in self.split]
        out = [Phase("anp", f[-2], lr=self.anp_lr, schedule=self.anp_schedule, at_budget=False),
               Phase("finetune", f[-1], lr=cfg.lr * self.finetune_lr_factor, schedule=self.finetune_schedule)]
        return ([Phase("pretrain", f[0], at_budget=False)] if len(f) == 3 else []) + out

    def _n_train(self, ctx) -> int:
        n = self.n_train_option or getattr(ctx, "n_train", 0)
        if not n:  # an older trainer: estimate N from this phase's steps (exact unless --max-steps capped it)
            cfg = ctx.cfg
            frac = self.split[-2] / sum(self.split)
            n = max(1, round(ctx.steps / max(frac * cfg.epochs, 1e-9)) * cfg.batch_size)
            ctx.log(f"anp-vs: the training set size is unknown; KL / N with N ~ {n} (steps x batch / epochs)")
        return int(n)

    def enter(self, index, model, ctx):
        phase = self.names[index]
        if phase == "pretrain":
            return None
        if phase == "anp":
            if self.kl_weight is None:
                self.kl_weight = KL_WEIGHT.get(getattr(ctx.cfg, "dataset", ""), 1.0)
            self.n_train = self._n_train(ctx)
            self._record = {"n_train": torch.tensor([self.n_train], dtype=torch.int64)}  # for a resumed manifest
            self._anp = BetaBernoulliGates(model, ctx.cfg.sparsity, kl_scale=self.kl_weight / self.n_train,
                                           generator=ctx.generator, **self.gate_options)
            return self._anp
        return self._finish(model, ctx)

    def _finish(self, model: nn.Module, ctx) -> FixedMask:
        layers = sparsifiable_layers(model)
        keep, total = budget_of(model, ctx.cfg.sparsity)
        if ctx.resuming:  # the checkpoint holds the mask, the weights and (method state) the record
            self._drop_anp()
            return FixedMask.from_masks(model, {n: torch.ones_like(m.weight) for n, m in layers}, name="anp-vs")
        record = {k: v for k, v in self._record.items() if k == "n_train"}
        if self._anp is not None:
            probs = self._anp.keep_probabilities()
            self._drop_anp()
            with torch.no_grad():
                for n, m in layers:
                    if n in probs:  # the unit rule (to_dense already folded E[pi] * 1[E[pi] > thres]): exact zeros
                        pruned = (probs[n] <= self.threshold).to(m.weight.device)
                        m.weight[pruned] = 0
                        record[f"keep_probability.{n}"] = probs[n]
        else:
            ctx.log("anp-vs: no gate phase in this process; the fine-tune keeps the current non-zeros (to the budget)")
        nonzero_units = sum(int(torch.count_nonzero(m.weight)) for _, m in layers)
        magnitude = nonzero_units > keep
        if magnitude:  # their pruning left more than the budget: rsp finishes with global magnitude pruning
            masks = global_magnitude_masks(model, keep)
        else:
            masks = {n: (m.weight.detach() != 0).to(m.weight.dtype) for n, m in layers}
        sparse = FixedMask.from_masks(model, masks, name="anp-vs")
        record["counts"] = torch.tensor([total, nonzero_units, keep, sparse.budget, int(magnitude)], dtype=torch.int64)
        self._record = record
        return sparse

    def _drop_anp(self) -> None:
        if self._anp is not None:
            self._anp.release()
        self._anp = None

    def state_tensors(self):
        return {k: v.clone() for k, v in self._record.items()}

    def load_state_tensors(self, state):
        self._record = {k: v.clone() for k, v in state.items()
                        if k in ("counts", "n_train") or k.startswith("keep_probability.")}
        if "n_train" in self._record and self.n_train is None:
            self.n_train = int(self._record["n_train"][0])

    def unit_report(self) -> dict | None:
        """Unit and weight sparsity of the pruning (None before the fine-tune phase has been entered)."""
        if "counts" not in self._record:
            return None
        total, nonzero_units, keep, final, magnitude = (int(v) for v in self._record["counts"])
        per_layer, pruned, units = {}, 0, 0
        for key, probs in self._record.items():
            if key.startswith("keep_probability."):
                p = int((probs <= self.threshold).sum())
                per_layer[key[len("keep_probability."):]] = {"units": probs.numel(), "pruned": p,
                                                             "unit_sparsity": p / max(1, probs.numel())}
                pruned, units = pruned + p, units + probs.numel()
        return {"unit_sparsity": pruned / units if units else None, "units_pruned": pruned, "units_gated": units,
                "unit_sparsity_per_layer": per_layer,
                "weight_sparsity_after_unit_pruning": 1 - nonzero_units / total,
                "weight_sparsity_final": 1 - final / total, "budget": keep, "nonzero_final": final,
                "finished_with_global_magnitude": bool(magnitude)}

    def config(self):
        f = [s / sum(self.split) for s in self.split]
        o = self.gate_options
        out = {"phases": dict(zip(self.names, f)), "split": self.split,
               "anp": {"lr": "--lr" if self.anp_lr is None else self.anp_lr, "schedule": self.anp_schedule},
               "finetune": {"lr_factor": self.finetune_lr_factor, "schedule": self.finetune_schedule},
               "gates": "beta-Bernoulli dropout per output unit of every conv/linear layer but the classifier",
               "posterior": "Kumaraswamy(a, b), a = softplus(a_uc), b = softplus(b_uc)",
               "prior": f"Beta({o['alpha']:g}, 1)", "alpha": o["alpha"], "threshold": o["threshold"],
               "temperature": o["temperature"], "per_example_masks": o["per_example"],
               "a_uc_init": {"conv": o["a_uc_init_conv"], "linear": o["a_uc_init_linear"]}, "b_uc_init": o["b_uc_init"],
               "kl": "kl_weight * sum KL(Kumaraswamy || Beta(alpha, 1)) / n_train, added per step",
               "kl_weight": self.kl_weight, "n_train": self.n_train,
               "gate_optimizer": o["gate_optimizer"],
               "gate_lr": o["gate_lr"] if o["gate_optimizer"] == "adam" else "the trainer's lr",
               "vs_lambda_default": self.default_vs_lambda,
               "pruning": "units with E[pi] <= threshold; gates folded at E[pi]; global magnitude to the budget "
                          "where more weights remain; robust fine-tune under the fixed mask"}
        report = self.unit_report()
        if report is not None:
            out.update(report)
        return out


# --- latent vulnerability: how far an attack moves the features z (Madaan et al. 2020) -------------------------


def feature_sites(model: nn.Module, sites: str = "auto") -> tuple[list[tuple[str, nn.Module]], str]:
    """The latent features z of ANP-VS: outputs of the model's nn.ReLU modules (sites='relu', or 'auto' when
    it has any), else of its conv/linear layers (sites='layers')."""
    if sites not in ("auto", "relu", "layers"):
        raise ValueError(f"sites must be auto, relu or layers, not {sites!r}")
    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    if sites == "relu" or (sites == "auto" and relus):
        chosen, used = relus, "relu"
    else:
        chosen, used = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))], "layers"
    if not chosen:
        raise ValueError(f"the model has no {'nn.ReLU' if used == 'relu' else 'conv/linear'} modules to hook")
    return chosen, used


@contextlib.contextmanager
def capture_features(model: nn.Module, sites: str = "auto", detach: bool = True) -> Iterator[list]:
    """Collect (site name, output) of every feature site during the forward passes run inside the block, in
    call order (a module called twice gives two entries, "name" and "name#1"). The list is yielded; clear it
    between passes. detach=False keeps the graph (the VS training loss)."""
    chosen, _ = feature_sites(model, sites)
    captured: list[tuple[str, torch.Tensor]] = []

    def make_hook(name):
        def hook(_m, _inp, out):
            calls = sum(1 for k, _ in captured if k.split("#")[0] == name)
            captured.append((f"{name}#{calls}" if calls else name, out.detach().float() if detach else out.float()))
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in chosen]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def vulnerability_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """The ANP-VS vulnerability suppression term, differentiable: mean over feature sites of
    mean |z(x) - z(x_adv)|, in the model's current mode (train mode in training)."""
    with capture_features(model, detach=False) as z:
        model(x)
        clean = list(z)
        z.clear()
        model(x_adv)
        terms = [(zc - za).abs().mean() for (_, zc), (_, za) in zip(clean, z)]
    return torch.stack(terms).mean()


def latent_vulnerability(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, *, batch_size: int = 256,
                         sites: str = "auto") -> dict:
    """ANP-VS latent-feature vulnerability (Madaan et al. 2020): mean over layers of mean |z(x) - z(x_adv)|.

    z are the outputs of the model's nn.ReLU modules (the activations of its conv/linear layers; a module
    called twice counts as two layers) with sites='relu' or 'auto'; with sites='layers', or 'auto' on a model
    without nn.ReLU modules, the conv/linear outputs themselves. Per layer the mean runs over examples and
    features; the result is the plain mean over layers. Eval mode, no gradients.
    """
    x, x_adv = as_float_images(x), as_float_images(x_adv)
    _, used = feature_sites(model, sites)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with capture_features(model, sites) as captured, attack_mode(model), torch.no_grad():
        for s in range(0, len(x), batch_size):
            captured.clear()
            model(x[s:s + batch_size])
            clean_z = list(captured)
            captured.clear()
            model(x_adv[s:s + batch_size])
            for (key, zc), (_, za) in zip(clean_z, captured):
                sums[key] = sums.get(key, 0.0) + (zc - za).abs().sum().item()
                counts[key] = counts.get(key, 0) + zc.numel()
    layers = {k: sums[k] / max(1, counts[k]) for k in sums}
    return {"vulnerability": sum(layers.values()) / max(1, len(layers)), "layers": layers, "sites": used}
