"""rsp train: end-to-end sparse training with a robust objective.

The run folder it writes is the contract every later stage reads (see artifacts.py):
  config.yaml              the resolved configuration
  model.safetensors        plain weights of the model selected on the validation split (zeros where dormant)
  train_state.safetensors  everything --resume needs: theta, signs, masks, momenta, RNG states, best weights
  metrics.jsonl            one line per finished epoch, appended once that epoch's checkpoint is on disk
  metrics.superseded.jsonl lines --resume took out of metrics.jsonl (a --max-steps stop's evaluation), kept
  manifest.json            stage "train", status, model, data, objective, method, sparsity, layers, metrics, files

Every write is one generation of files (see run_folder.py), so --resume continues bit for bit after a crash
anywhere. The pieces, each on its own:
  engine.py          the train step, one epoch of steps, the selection and collapse rules, BatchNorm recalibration
  distributed.py     the ranks of a torchrun run: device, gradient averaging, rank 0 deciding for all
  run_folder.py      the run folder: taking it, committing generations, the checkpoint, metrics.jsonl
  train_log.py       the epoch bar or line, TensorBoard
  train_manifest.py  manifest.json
Here: the Trainer that drives them (the method's phases, the epoch loop, evaluation, the sealing test run).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from .artifacts import MODEL_FILE, ArtifactError, tensors_bytes
from .attacks import PGDConfig, evaluate
from .config import ConfigError, TrainConfig, dump_yaml
from .data import DeviceBatches, Splits, load_dataset, load_extra_data
from .distributed import Dist, pick_device
# TrainStep, the selection and collapse rules and BatchNorm recalibration live in engine (shared with rsp
# structure's fine-tune); tests and bench/train_step.py import them from here too
from .engine import (BN_RECALIBRATION_IMAGES, COLLAPSE_RULE, Selection, TrainStep, beats_best,  # noqa: F401
                     is_collapsed, recalibrate_batchnorm, run_epoch)
from .methods import Phase, PhaseContext, budget_of, create_method, split_steps
from .models import create_model
from .objectives import Objective
from .run_folder import CONFIG_FILE, METRICS_FILE, STATE_FILE, RunFolder  # noqa: F401  (the run's files, re-exported)
from .sparse import dense_state_dict, layer_report, sparsifiable_layers, to_dense
from .train_log import EpochLog
from .train_manifest import train_manifest


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. divergence); the last good checkpoint stays intact."""


def lr_at(cfg: TrainConfig, phase: Phase, progress: float) -> float:
    """The learning rate at `progress` in [0, 1) of a phase. step: lr * gamma^(milestones passed), the
    milestones being fractions of the phase; cosine: half a cosine from lr to 0; constant."""
    lr = cfg.lr if phase.lr is None else phase.lr
    if phase.schedule == "cosine":
        return 0.5 * lr * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    if phase.schedule == "constant":
        return lr
    passed = sum(progress >= m for m in cfg.lr_milestones)
    return lr * cfg.lr_gamma**passed


def _gen_state(gens: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    return {f"rng.{k}": g.get_state() for k, g in gens.items()}


def _content_sha256(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' bytes in order, streamed: no copy of a 500 K-image set (1.5 GB) to hash it."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(memoryview(t.contiguous().numpy()).cast("B"))
    return h.hexdigest()


class Trainer:
    """One rsp train run: its data, model, method phases and position, driven epoch by epoch through the
    engine; rank 0 checkpoints each epoch into the run folder and seals it with the test figures (finish)."""

    def __init__(self, cfg: TrainConfig, output: str | Path, *, resume: bool = False, progress: bool | None = None,
                 log=print):
        self.cfg, self.out, self.log = cfg, Path(output), log
        self.device = pick_device(cfg.device)
        self.dist = Dist.init(self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.dist.main
        self.folder = RunFolder(self.out, log)  # rank 0 holds it from here until fit() ends (or close())
        try:
            self._open(resume)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let go of the output folder; its files stay as the last commit left them."""
        self.folder.release()

    def _open(self, resume: bool) -> None:
        cfg = self.cfg
        opening = self._open_output(resume)

        self.splits: Splits = load_dataset(cfg.dataset, cfg.data_dir, val_fraction=cfg.val_fraction,
                                           split_seed=cfg.split_seed).to(self.device)
        self.info = self.splits.info
        self.extra = self.extra_record = None
        if cfg.objective == "rst":
            ex, ey = load_extra_data(cfg.extra_data, self.info)
            # what was mixed in, by content: the path as typed says nothing once the file is moved or replaced
            self.extra_record = {"path": cfg.extra_data, "n_images": int(len(ex)),
                                 "sha256": _content_sha256(ex, ey),
                                 "hashed": "the decoded uint8 NCHW images, then the int64 labels"}
            self.extra = (ex.to(self.device), ey.to(self.device))
        self._check_batches()
        self.model_name = cfg.model or self.info.default_model
        use_cuda = self.device.type == "cuda"
        self.bf16 = use_cuda if cfg.bf16 is None else (cfg.bf16 and use_cuda)
        self.channels_last = use_cuda if cfg.channels_last is None else cfg.channels_last

        torch.manual_seed(cfg.seed)
        kwargs = {"num_classes": self.info.num_classes, "in_channels": self.info.in_channels,
                  "mean": list(self.info.mean), "std": list(self.info.std), **cfg.model_kwargs}
        self.model = create_model(self.model_name, **kwargs).to(self.device)
        self.model_kwargs = dict(getattr(self.model, "rsp_config", kwargs))
        self.layer_names = [n for n, _ in sparsifiable_layers(self.model)]
        if self.channels_last and cfg.method == "dense":
            self.model = self.model.to(memory_format=torch.channels_last)  # sparse weights are views: keep them
        self.budget, self.total_weights = budget_of(self.model, cfg.sparsity)
        if cfg.method == "dense":
            self.budget = self.total_weights

        # Separate streams of randomness, all checkpointed: data order/augmentation, attacks, rewiring.
        self.gens = {k: torch.Generator(self.device).manual_seed(cfg.seed * 1000 + i + (100 * self.dist.rank if k == "attack" else 0))
                     for i, k in enumerate(("data", "attack", "sparse"))}
        # The method's phases share --epochs (in optimizer steps); --max-steps caps each phase.
        self.method = create_method(cfg.method, **cfg.method_options)
        self.vs_lambda = cfg.vs_lambda if cfg.vs_lambda is not None else getattr(self.method, "default_vs_lambda", 0.0)
        self.objective = Objective(cfg.objective, PGDConfig(cfg.eps, cfg.attack_step_size, cfg.attack_steps), cfg.beta,
                                   vs_lambda=self.vs_lambda)
        self.phases = self.method.phases(cfg)
        self.steps_per_epoch = max(1, len(self.splits.train_y) // (cfg.batch_size // 2 if self.extra is not None
                                                                   else cfg.batch_size))
        self.phase_steps = split_steps(self.phases, cfg.epochs * self.steps_per_epoch)  # the plan: lr schedules
        # where each phase stops: --max-steps cuts a phase short without changing its schedule (smoke runs)
        self.phase_limits = [n if cfg.max_steps is None else min(n, cfg.max_steps) for n in self.phase_steps]
        self.phase = 0
        self.phase_step = 0  # optimizer steps done in the current phase

        self.epoch = 0  # completed data epochs
        self.step = 0
        self.epoch_step = 0  # batches done in the current data epoch (non-zero after a phase or --max-steps stop)
        self.data_epoch_state = self.gens["data"].get_state()
        self.selection = Selection({"score": -1.0, "epoch": -1, "val_clean_acc": None, "val_robust_acc": None,
                                    "collapsed": True})
        self.time_s = 0.0
        resuming = opening == "resume"
        self.already_complete = False
        if resuming:
            self._load_position()
            # a sealed run whose plan is done: --resume has nothing to do and must not touch a file
            self.already_complete = self.folder.status == "complete" and self._plan_done()
            if self.already_complete:
                self.log(f"{self.out} is complete (epoch {self.epoch}, step {self.step}): nothing to resume, "
                         f"its files are unchanged")
                return
        self._enter_phase(self.phase, resuming=resuming)
        if resuming:
            self._load_state()
            if self.dist.main:
                self.folder.repair_metrics(self.epoch, self.checkpoint_record)
        elif self.dist.main:
            self._commit({CONFIG_FILE: dump_yaml(cfg).encode()})  # from here on the folder is a (running) run

    def _check_batches(self) -> None:
        """An epoch must hold at least one batch: else no step is ever taken and the epochs never end."""
        cfg = self.cfg
        n_train = len(self.splits.train_y)
        where = f"the training split of {cfg.dataset} holds {n_train} images (after the validation split)"
        if self.extra is None:
            if cfg.batch_size > n_train:
                raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the training data: {where}; "
                                  f"use --batch-size {n_train} or less")
            labelled = cfg.batch_size
        else:  # RST: half of each batch labelled, half from --extra-data
            labelled, extra = cfg.batch_size // 2, cfg.batch_size - cfg.batch_size // 2
            if labelled < 1:
                raise ConfigError("--objective rst needs --batch-size 2 or more (half labelled, half extra data)")
            if labelled > n_train:
                raise ConfigError(f"--batch-size {cfg.batch_size} takes {labelled} labelled images a batch, but {where}; "
                                  f"use --batch-size {2 * n_train} or less")
            if extra > len(self.extra[1]):
                raise ConfigError(f"--batch-size {cfg.batch_size} takes {extra} extra images a batch, but --extra-data "
                                  f"holds {len(self.extra[1])}")
        if cfg.batch_size < self.dist.world:
            raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the {self.dist.world} processes sharing "
                              "each batch")

    def _plan_done(self) -> bool:
        return self.phase + 1 >= len(self.phases) and self.phase_step >= self.phase_limits[self.phase]

    def _enter_phase(self, index: int, resuming: bool) -> None:
        """Let the method transform the model for phase `index` and build a fresh optimizer step for it."""
        cfg = self.cfg
        if index > 0:
            to_dense(self.model)
        ctx = PhaseContext(cfg=cfg, model_name=self.model_name, generator=self.gens["sparse"], device=self.device,
                           resuming=resuming, steps=self.phase_steps[index], log=self.log,
                           n_train=len(self.splits.train_y))
        try:
            self.sparse = self.method.enter(index, self.model, ctx)
        except ValueError as exc:  # a recipe that does not fit this model (e.g. ratios for unknown layers)
            raise ConfigError(f"--method {cfg.method}: {exc}") from None
        self.model.to(self.device)
        if index > 0 and not resuming:
            # the method may just have pruned, rewound or projected the weights: fresh BatchNorm statistics
            # (a fixed slice of the training images, no randomness, so a resumed run repeats it exactly)
            recalibrate_batchnorm(self.model, self.splits.train_x[:BN_RECALIBRATION_IMAGES],
                                  batch_size=self.cfg.eval_batch_size, prepare=self._prepare)
        phase = self.phases[index]
        # lr: the phase's base, so decoupled decay follows the phase's own schedule multiplier
        self.train_step = TrainStep(self.model, self.sparse, self.objective, lr=cfg.lr if phase.lr is None else phase.lr,
                                    momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, decay_scope=cfg.decay_scope, bf16=self.bf16,
                                    forward_model=torch.compile(self.model) if cfg.compile else None,
                                    allreduce=(lambda: self.dist.average_gradients(self.model)) if self.dist.world > 1 else None)
        self.opt, self.sgd_params = self.train_step.opt, self.train_step.sgd_params
        if len(self.phases) > 1 and not resuming:
            self.log(f"phase {index + 1}/{len(self.phases)} {self.phases[index].name}: {self.phase_steps[index]} steps")

    # --- the run folder (RunFolder writes it) ----------------------------------------------------

    def _open_output(self, resume: bool) -> str:
        """Take the output folder: "new" (start a run) or "resume" (RunFolder.take). Rank 0 decides for every rank."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--output {self.out} exists and is not a folder")
        opening = error = None
        try:
            if self.dist.main:
                opening = self.folder.take(resume, self.cfg)
        except (ConfigError, ArtifactError) as exc:
            error = exc
        # the same decision (or the same error) on every rank
        opening, message, self.folder.status = self.dist.from_main(
            [opening, None if error is None else str(error), self.folder.status], self.device)
        if message is not None and error is None:
            raise ArtifactError(message)
        if error is not None:
            raise error
        return opening

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.sparse:
            state.update(self.sparse.state_tensors())
        for i, p in enumerate(self.sgd_params):
            buf = self.opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                state[f"opt.{i}"] = buf
        state.update({f"method.{k}": v for k, v in self.method.state_tensors().items()})
        state.update(_gen_state(self.gens))
        state["rng.data_epoch_start"] = self.data_epoch_state
        if self.selection.state is not None:
            state.update({f"best.{k}": v for k, v in self.selection.state.items()})
        return state

    def _save_checkpoint(self, record: dict | None) -> None:
        meta = {"epoch": str(self.epoch), "step": str(self.step), "epoch_step": str(self.epoch_step),
                "best": json.dumps(self.selection.best), "phase": str(self.phase), "phase_step": str(self.phase_step),
                "time_s": repr(self.time_s), "record": json.dumps(record) if record else ""}
        self.folder.save_checkpoint(self._state_tensors(), meta, self.selection.state, record,
                                    lambda: train_manifest(self, None))

    def _commit(self, blobs: dict[str, bytes], final: dict | None = None) -> dict:
        return self.folder.commit(blobs, lambda: train_manifest(self, final))

    def _load_position(self) -> None:
        """Before the phase is built: which phase the checkpoint is in, and the method's own state."""
        meta = self.folder.checkpoint_meta()
        self.phase, self.phase_step = int(meta.get("phase", 0)), int(meta.get("phase_step", meta["step"]))
        self.epoch, self.step = int(meta["epoch"]), int(meta["step"])
        state = self.folder.checkpoint_tensors(self.device)
        self.method.load_state_tensors({k[7:]: v for k, v in state.items() if k.startswith("method.")})

    def _load_state(self) -> None:
        meta = self.folder.checkpoint_meta()
        state = self.folder.checkpoint_tensors(self.device)
        model_state = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state, strict=True)  # copies into the views: flat buffers stay bound
        if self.sparse:
            self.sparse.load_state_tensors(state)
        for i, p in enumerate(self.sgd_params):
            if f"opt.{i}" in state:
                self.opt.state[p]["momentum_buffer"] = state[f"opt.{i}"].clone()
        for k, g in self.gens.items():
            g.set_state(state[f"rng.{k}"].cpu())
        best = {k[5:]: v for k, v in state.items() if k.startswith("best.")}
        self.selection.state = best or None
        self.epoch, self.step, self.epoch_step = int(meta["epoch"]), int(meta["step"]), int(meta.get("epoch_step", 0))
        self.data_epoch_state = state["rng.data_epoch_start"].cpu()
        self.selection.best = json.loads(meta["best"])
        self.time_s = float(meta.get("time_s", "0"))
        self.checkpoint_record = json.loads(meta["record"]) if meta.get("record") else None
        self.log(f"resuming {self.out} at epoch {self.epoch} (step {self.step})")

    # --- training ----------------------------------------------------------------------------

    def _batches(self):
        cfg = self.cfg
        bs = cfg.batch_size // 2 if self.extra is not None else cfg.batch_size
        main = DeviceBatches(self.splits.train_x, self.splits.train_y, bs, generator=self.gens["data"], shuffle=True,
                             augment_with=self.info, drop_last=True)
        if self.extra is None:
            yield from main
            return
        # RST: every batch is half labelled data, half pseudo-labelled extra data.
        ex = DeviceBatches(self.extra[0], self.extra[1], cfg.batch_size - bs, generator=self.gens["data"], shuffle=True,
                           augment_with=self.info, drop_last=True)
        extra_iter = iter(ex)
        for xb, yb in main:
            try:
                xe, ye = next(extra_iter)
            except StopIteration:
                extra_iter = iter(ex)
                xe, ye = next(extra_iter)
            yield torch.cat([xb, xe]), torch.cat([yb, ye])

    def _prepare(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_epoch(self, bar=None, limit: int | None = None) -> dict:
        """Train to the end of the current data epoch, or for `limit` steps (the end of the phase)."""
        cfg = self.cfg
        phase, phase_total, phase_step = self.phases[self.phase], self.phase_steps[self.phase], self.phase_step
        data_gen = self.gens["data"]
        if self.epoch_step == 0:
            self.data_epoch_state = data_gen.get_state()
        else:  # resuming inside an epoch: redraw its order and augmentations, skip the batches already done
            data_gen.set_state(self.data_epoch_state)
        stats = run_epoch(self.train_step, self._batches(), lambda k: lr_at(cfg, phase, (phase_step + k) / phase_total),
                          self.gens["attack"], device=self.device, skip=self.epoch_step, limit=limit,
                          prepare=self._prepare, shard=(self.dist.rank, self.dist.world),
                          progress=None if bar is None else lambda i, loss: bar(i, self.steps_per_epoch, loss))
        self.step += stats.steps
        self.phase_step += stats.steps
        self.epoch_step = stats.next_batch
        if stats.diverged:
            kept = (f"the last good checkpoint in {self.out} is intact" if self.folder.has_checkpoint()
                    else "no checkpoint was written yet")  # a first-epoch divergence has none to point to
            raise TrainingError(f"loss diverged (non-finite) in epoch {self.epoch + 1}; {kept}: lower --lr or check the data")
        if self.epoch_step >= self.steps_per_epoch:
            self.epoch_step = 0  # the epoch is complete
        return {"train_loss": stats.train_loss, "train_acc": stats.train_acc,
                "images_per_s": stats.seen * self.dist.world / max(stats.seconds, 1e-9), "epoch_time_s": stats.seconds,
                "lr": stats.lr}

    def _eval_attack(self, steps: int) -> PGDConfig | None:
        if not self.objective.robust and steps == 0:
            return None
        return PGDConfig(self.cfg.eps, self.cfg.attack_step_size, steps) if steps else None

    def _eval(self, x, y, steps: int, seed: int) -> dict:
        gen = torch.Generator(self.device).manual_seed(seed)  # own stream: evaluation never shifts training RNG
        with self.train_step.autocast():
            return evaluate(self.model, x, y, self._eval_attack(steps), batch_size=self.cfg.eval_batch_size, generator=gen)

    def sparsity_now(self) -> tuple[float, int]:
        if self.sparse is None or self.sparse.name != "bcs":  # count the effective weights' non-zeros
            state = dense_state_dict(self.model)
            _, s = layer_report(state, self.layer_names)
            return s, sum(int(torch.count_nonzero(state[f"{n}.weight"])) for n in self.layer_names)
        active = int(self.sparse.active_count())
        return 1.0 - active / self.sparse.total, active

    def fit(self) -> dict:
        try:
            if self.already_complete:
                return dict(self.folder.manifest) if self.dist.main else {}
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> dict:
        cfg = self.cfg
        with EpochLog(self.out, cfg.epochs, live=self.progress, log=self.log) as epoch_log:
            while True:
                if self.phase_step >= self.phase_limits[self.phase]:
                    if self.phase + 1 >= len(self.phases):
                        break
                    self.phase, self.phase_step = self.phase + 1, 0
                    self._enter_phase(self.phase, resuming=False)
                t_epoch = time.perf_counter()
                bar = epoch_log.bar(self.epoch)
                steps_before = self.step
                rec = self.train_epoch(bar, limit=self.phase_limits[self.phase] - self.phase_step)
                if self.step == steps_before:  # would loop forever (_check_batches should have refused the run)
                    raise TrainingError(f"epoch {self.epoch + 1} made no optimizer step: no full batch of "
                                        f"{cfg.batch_size} images")
                partial = self.epoch_step > 0  # stopped inside the data epoch (end of a phase, --max-steps)
                if not partial:
                    self.epoch += 1
                phase = self.phases[self.phase]
                record = None
                if self.dist.main:
                    val = self._eval(self.splits.val_x, self.splits.val_y, cfg.eval_attack_steps if self.objective.robust else 0,
                                     seed=cfg.seed + 7919 * self.epoch + self.epoch_step) if len(self.splits.val_y) else {"clean_acc": 0.0}
                    score, collapsed = Selection.judge(val, self.splits.val_y, self.objective.robust)
                    sparsity, active = self.sparsity_now()
                    # only weights at the budget may be selected (a dense pre-training epoch never is)
                    # without a validation split (--val-fraction 0) there is no score to select on: the latest epoch
                    selected = phase.at_budget and active <= self.budget and (
                        not len(self.splits.val_y) or self.selection.beats(score, collapsed))
                    if selected:
                        self.selection.keep(self.model, score, collapsed, epoch=self.epoch, val_clean_acc=val["clean_acc"],
                                            val_robust_acc=val.get("robust_acc"))
                    self.time_s += time.perf_counter() - t_epoch
                    record = {"epoch": self.epoch, "step": self.step, "partial": partial, **rec, "val_clean_acc": val["clean_acc"],
                              "val_robust_acc": val.get("robust_acc"), "sparsity": sparsity, "active": active,
                              "budget": self.budget if cfg.method != "dense" else None,
                              "val_top_class_share": val.get("top_class_share"), "collapsed": collapsed, "selected": selected,
                              "time_s": self.time_s}
                    record.update(phase=phase.name, phase_step=self.phase_step)
                    self._save_checkpoint(record)
                    epoch_log.done(record)
                self.dist.barrier()
        if not self.dist.main:
            return {}
        return self.finish()

    def finish(self) -> dict:
        """Evaluate the model selected on the validation split on the test set, once, and seal the folder."""
        cfg = self.cfg
        if self.selection.state is None:
            raise TrainingError("no epoch finished: nothing to save")
        nonzero = sum(int(torch.count_nonzero(self.selection.state[f"{n}.weight"])) for n in self.layer_names)
        if cfg.method != "dense" and nonzero > self.budget:  # a method bug, never a user error
            raise TrainingError(f"method {cfg.method} selected a model with {nonzero} non-zero weights, over the "
                                f"budget of {self.budget}")
        eval_model = create_model(self.model_name, **self.model_kwargs).to(self.device)
        eval_model.load_state_dict(self.selection.state)
        self.model, live = eval_model, self.model  # evaluate the selected plain weights, exactly as saved
        try:
            test = self._eval(self.splits.test_x, self.splits.test_y, cfg.test_attack_steps if self.objective.robust else 0,
                              seed=cfg.seed + 104729)
        finally:
            self.model = live
        metrics = {"clean_acc": test["clean_acc"], "robust_acc": test.get("robust_acc"), "epoch": self.selection.best["epoch"],
                   "split": "test", "n_test": test["n"], "attack": test.get("attack"),
                   "val_clean_acc": self.selection.best["val_clean_acc"], "val_robust_acc": self.selection.best["val_robust_acc"],
                   "selected_on": "val" if len(self.splits.val_y) else "last",
                   "selected_collapsed": bool(self.selection.best.get("collapsed", False))}
        if metrics["selected_collapsed"]:
            self.log("warning: every epoch at the budget is a collapsed classifier (most validation images in one "
                     "class); the folder holds the best of them and its manifest says so")
        # the sealed weights are the selected ones, written from them (whatever an earlier crash left on disk)
        return self._commit({MODEL_FILE: tensors_bytes(self.selection.state)}, final=metrics)


def run(cfg: TrainConfig, output: str | Path, *, resume: bool = False, progress: bool | None = None, log=print) -> dict:
    trainer = Trainer(cfg, output, resume=resume, progress=progress, log=log)
    return trainer.fit()
