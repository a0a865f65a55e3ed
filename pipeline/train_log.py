"""How rsp train reports a finished epoch: a live bar on a terminal (rich) or one line per epoch, and
TensorBoard scalars under the run folder's tensorboard/ when tensorboard is installed."""

from __future__ import annotations

from pathlib import Path


def epoch_line(r: dict, epochs: int) -> str:
    rob = f" robust {r['val_robust_acc']:.3f}" if r.get("val_robust_acc") is not None else ""
    if r.get("collapsed"):
        rob += f" (collapsed: {r['val_top_class_share']:.0%} one class)"
    sel = " *" if r.get("selected") else ""
    where = f"epoch {r['epoch'] + 1}/{epochs} (stopped at step {r['step']})" if r.get("partial") else f"epoch {r['epoch']}/{epochs}"
    return (f"{where}  loss {r['train_loss']:.4f}  val clean {r['val_clean_acc']:.3f}{rob}"
            f"  sparsity {r['sparsity']:.4f}  {r['images_per_s']:.0f} img/s{sel}")


class EpochLog:
    """Used as a context (the live bar lives inside it): bar(epoch) while the epoch trains, done(record) after."""

    def __init__(self, folder: Path, epochs: int, *, live: bool, log=print):
        self.folder, self.epochs, self.log = folder, epochs, log
        self.live = _LiveBar(epochs) if live else None
        self._tb = None  # the SummaryWriter, opened at the first record

    def __enter__(self) -> EpochLog:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        return self.live.__exit__(*exc) if self.live else None

    def bar(self, epoch: int):
        """update(batches done, batches in the epoch, mean loss) for the live bar, or None off a terminal."""
        return self.live.bar(epoch) if self.live else None

    def done(self, record: dict) -> None:
        self._tensorboard(record)
        if self.live:
            self.live.done(record)
        else:
            self.log(epoch_line(record, self.epochs))

    def _tensorboard(self, record: dict) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            return
        if self._tb is None:
            self._tb = SummaryWriter(str(self.folder / "tensorboard"))
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, record["epoch"])
        self._tb.flush()


class _LiveBar:
    """Live progress on a terminal (rich): epoch bar with loss, accuracy, sparsity, images/s and ETA."""

    def __init__(self, epochs: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.epochs = epochs
        self.p = Progress(TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                          TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)

    def __enter__(self):
        self.p.__enter__()
        return self

    def __exit__(self, *exc):
        return self.p.__exit__(*exc)

    def bar(self, epoch: int):
        task = self.p.add_task("", total=None, epoch=epoch + 1, epochs=self.epochs, info="")

        def update(i, total, loss):
            self.p.update(task, completed=i, total=total, info=f"loss {loss:.4f}")

        self._task = task
        return update

    def done(self, record: dict):
        self.p.update(self._task, info=epoch_line(record, self.epochs).split("  ", 1)[1])
