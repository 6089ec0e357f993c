"""Training: one network, one MLflow run, read top to bottom in `train`.

Epoch 0 is the initial network; training epochs are 1..epochs. The learning rate is a pure
function of the epoch, so a checkpoint needs no scheduler object to resume exactly.

Under torchrun the network trains with DistributedDataParallel: `batch_size` is the global
batch, and the loader gives each rank its part of every batch of one seeded order, so the
batches are the ones a single process trains on. Rank 0 alone talks to MLflow (`Recorder`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from mlflow.entities import RunTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import data as datalib
from . import distributed, files, names, runs, runtime, tracking
from .config import Config
from .errors import ConfigError, TrainingDiverged
from .models import model_for

log = logging.getLogger(__name__)


def train(cfg: Config) -> str:
    """Train one network as `cfg` says (or continue run `cfg.resume_from`); returns the run id."""
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise ConfigError(
            f"batch_size: {cfg.batch_size} does not divide over world size {world}; the batch "
            f"size is global, each of the {world} processes takes batch_size / {world}"
        )
    device = runtime.setup(cfg)
    if (
        cfg.compile
        and device.type == "cpu"
        and not any(map(shutil.which, (os.environ.get("CXX", "g++"), "c++")))
    ):
        raise ConfigError(
            "compile: torch.compile on the CPU needs a C++ compiler (g++ or c++ on PATH, or "
            "$CXX); install one or train with compile: false"
        )
    # SIGUSR1 is a scheduler's warning before a preemption or a time limit (SLURM's
    # --signal=USR1@60): the training checkpoints at the end of its epoch and stops, its run
    # KILLED, for the same command to continue it (lipdd sweep requeues the job).
    warned = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *_: warned.set())
    try:
        with distributed.process_group(device):
            return _train(cfg, device, warned)
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL if previous is None else previous)


def _train(cfg: Config, device: torch.device, warned: threading.Event) -> str:
    client = tracking.get_client(tracking.tracking_uri(cfg.tracking_uri))
    cfg = distributed.on_rank0(runs.with_label_seed, client, cfg)
    prepared = distributed.in_turn(datalib.ensure_prepared, cfg)
    # Channels-last weights and batches where it is safe: convolutions run without layout reorders.
    channels_last = runtime.channels_last(device)
    loader = datalib.Loader.of(
        prepared.splits["train"],
        prepared.meta,
        device,
        cfg.batch_size,
        seed=cfg.seed,
        augment=cfg.augmentation,
        shard="batch",
        channels_last=channels_last,
    )
    torch.manual_seed(cfg.seed)
    model = model_for(cfg, prepared.meta).to(
        device, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    # `net` trains (under torchrun, DDP averages its gradients over the ranks); `model`, the same
    # parameters, is what gets evaluated, regularised and saved.
    net = (
        model
        if distributed.world_size() == 1
        else DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    )
    if cfg.compile:
        net = torch.compile(net)
    optimizer = make_optimizer(cfg, model)

    run_id, checkpoint = distributed.on_rank0(
        runs.open_training, client, cfg, prepared.meta["content_hash"], len(loader)
    )
    epoch, step = (
        load_state(client, run_id, checkpoint, model, optimizer, loader) if checkpoint else (0, 0)
    )
    record = distributed.rank0_only(
        Recorder, client, run_id, cfg, model, optimizer, loader, prepared, epoch
    )
    save_at = checkpoint_epochs(cfg.save_checkpoint, cfg.epochs)
    with record, distributed.failing_together():
        if epoch == 0:
            record.evaluate(0)
            if 0 in save_at:
                record.checkpoint(0, 0)
        for epoch in range(epoch + 1, cfg.epochs + 1):
            lr = learning_rate(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = train_epoch(cfg, net, model, optimizer, loader).tolist()
            record.losses(losses, step + 1, epoch)
            bad = [(s, v) for s, v in enumerate(losses, step + 1) if not math.isfinite(v)]
            if bad:  # every rank sees the same losses: all stop here
                s, value = bad[0]
                record.diverged()
                raise TrainingDiverged(
                    f"training diverged: loss {value} at epoch {epoch}, step {s}; lower the "
                    f"learning rate (the last good checkpoint stays in run {run_id})"
                )
            step += len(losses)
            stop = False
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                stop = distributed.broadcast(
                    record.evaluate(epoch, lr)
                )  # rank 0 evaluated; all stop together
            # An early stop is the final epoch, saved unless an explicit list was asked for.
            saved = epoch in save_at or (stop and len(cfg.save_checkpoint) == 1)
            if saved:
                record.checkpoint(epoch, step)
            if stop:
                break
            if epoch < cfg.epochs and distributed.broadcast(warned.is_set()):
                if not saved:
                    record.checkpoint(epoch, step)
                record.flush()
                raise KeyboardInterrupt(f"SIGUSR1: checkpointed at epoch {epoch}, stopping")
        record.finish(epoch)
    return run_id


def train_epoch(cfg: Config, net, model, optimizer, loader: datalib.Loader) -> torch.Tensor:
    """One pass over the training set in the loader's next seeded order. Returns every global
    batch's mean loss, still on the device: reading them is the epoch's one host sync (and under
    torchrun its one all-reduce), and every rank gets the same values."""
    world, loss_sums = distributed.world_size(), []
    sizes = loader.sizes()
    device = loader.images.device
    runtime.matmul_precision(cfg.precision)
    for (x, y), n in zip(loader, sizes):
        # Autocast covers the forward pass only; backward runs each op in its forward's dtype.
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss_sum = F.cross_entropy(net(x), y, reduction="sum")
        loss_sums.append(loss_sum.detach())
        # DDP averages the ranks' gradients: world * (this rank's sum) / (global batch size)
        # makes that average the gradient of the global batch's mean loss, even when the
        # last batch splits unevenly.
        loss = loss_sum * world / n + regularization(cfg, model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    runtime.matmul_precision("fp32")  # evaluation and checkpoints' measures: IEEE fp32
    return distributed.all_sum(torch.stack(loss_sums)) / torch.tensor(sizes, device=device)


@torch.inference_mode()
def evaluate(model, loader: datalib.Loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss and correctness on the loader's batches, the model in eval mode."""
    model.eval()
    losses, correct = [], []
    for x, y in loader:
        logits = model(x)
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        correct.append((logits.argmax(1) == y).float())
    model.train()
    return torch.cat(losses), torch.cat(correct)


def evaluation(model, loaders: dict[str, datalib.Loader]) -> dict[str, float]:
    """Loss/accuracy on every split against the labels trained on, plus the accuracy on the
    corrupted training samples against their noisy labels: how much noise was memorised."""
    out = {}
    for split, loader in loaders.items():
        loss, correct = evaluate(model, loader)
        out[names.evaluation(split, "loss")] = loss.mean().item()
        out[names.evaluation(split, "accuracy")] = accuracy = correct.mean().item()
        out[names.evaluation(split, "error")] = 1 - accuracy
        corrupted = loader.labels != loader.clean_labels
        if split == "train" and corrupted.any():
            out["train_corrupted_accuracy"] = correct[corrupted].mean().item()
            out["train_clean_accuracy"] = correct[~corrupted].mean().item()
    return out


class Recorder:
    """Rank 0's part of a training: its MLflow run (ended FINISHED, KILLED or FAILED on leaving),
    the metrics and checkpoints (through a sender process), evaluations and results/train/. Other
    ranks hold a distributed.rank0_only stand-in that does nothing."""

    EVAL_BATCH = 1024

    def __init__(
        self,
        client,
        run_id: str,
        cfg: Config,
        model,
        optimizer,
        loader: datalib.Loader,
        prepared: datalib.Prepared,
        start_epoch: int,
    ):
        self.client, self.run_id, self.cfg, self.prepared = client, run_id, cfg, prepared
        self.model, self.optimizer, self.loader, self.start_epoch = (
            model,
            optimizer,
            loader,
            start_epoch,
        )

    def __enter__(self):
        with contextlib.ExitStack() as stack:  # kept only once all of it is entered
            stack.enter_context(runs.ending(self.client, self.run_id))
            if self.start_epoch:
                runs.reopen(self.client, self.run_id)
                print(f"resuming run {self.run_id} from epoch {self.start_epoch}", file=sys.stderr)
            device = self.loader.images.device  # this process's; a resumed run's latest
            tags = runtime.device_tags(device, self.cfg.device)
            # The report weighs a difference in test error by how many samples measured it.
            tags["test_size"] = str(self.prepared.meta["splits"]["test"])
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            # Every split un-augmented and in order; training's shares the training loader's
            # tensors.
            meta, cl = self.prepared.meta, self.loader.channels_last
            self.eval_loaders = {
                split: dataclasses.replace(
                    self.loader, batch_size=self.EVAL_BATCH, seed=None, augment=False, shard=None
                )
                if split == "train"
                else datalib.Loader.of(data, meta, device, self.EVAL_BATCH, channels_last=cl)
                for split, data in self.prepared.splits.items()
            }
            self.bar = stack.enter_context(
                tqdm(
                    total=self.cfg.epochs,
                    initial=self.start_epoch,
                    desc=self.cfg.run_name(),
                    disable=not sys.stderr.isatty(),
                )
            )
            if self.cfg.system_metrics:  # MLflow's own monitor: a thread sampling every 10 s
                if (
                    self.cfg.log_level is None
                ):  # it says INFO on start, stop and "no GPU" at every run
                    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
                monitor = SystemMetricsMonitor(
                    self.run_id,
                    resume_logging=self.start_epoch > 0,
                    tracking_uri=self.client.tracking_uri,
                )
                monitor.start()
                stack.callback(monitor.finish)
            # Left first: what it holds is in the run before the run ends. A resumed run re-computes
            # bit-identical values for steps it had logged: it sends only new ones.
            self.logger = stack.enter_context(
                tracking.BackgroundLogger(
                    self.client,
                    self.run_id,
                    skip_logged=self.start_epoch > 0,
                    outage_limit=self.cfg.tracking_outage_limit,
                )
            )
            self.stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)

    def losses(self, losses: list[float], first_step: int, epoch: int) -> None:
        """Logs each batch's loss, up to the first non-finite one, and the epoch's mean loss."""
        for s, value in enumerate(losses, first_step):
            if not math.isfinite(value):
                return
            if s % self.cfg.loss_checkpoint == 0:
                self.logger.log(names.BATCH_LOSS, value, s)
        self.logger.log(names.EPOCH_LOSS, sum(losses) / len(losses), epoch)
        self.bar.update()

    def evaluate(self, epoch: int, lr: float | None = None) -> bool:
        """Logs the evaluation of every split; whether it stops the training early."""
        row = evaluation(self.model, self.eval_loaders)
        log.info(
            "run %s epoch %d: %s",
            self.run_id,
            epoch,
            " ".join(f"{k}={v:.4g}" for k, v in row.items()),
        )
        self.logger.log_dict(row if lr is None else {names.LR: lr, **row}, step=epoch)
        self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_accuracy']:.3f}")
        return early_exit(self.cfg, row)

    def checkpoint(self, epoch: int, step: int) -> None:
        state = dict(
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            epoch=epoch,
            global_step=step,
            rng={k: g.get_state() for k, g in self.loader.generators.items()},
            config=self.cfg.flat(),
        )
        self.logger.log_checkpoint(state, epoch)  # uploaded after every step logged before it

    def flush(self) -> None:
        self.logger.flush()

    def diverged(self) -> None:
        self.logger.flush()  # the good steps before it stay in the run
        self.client.set_tag(self.run_id, "diverged", "true")

    def finish(self, epoch: int) -> None:
        self.logger.flush()
        self.client.log_batch(self.run_id, tags=[RunTag("epochs_trained", str(epoch))])
        write_outputs(self.client, self.run_id, self.cfg)


def load_state(client, run_id: str, artifact: str, model, optimizer, loader) -> tuple[int, int]:
    """Model, optimizer and the loader's generators as the checkpoint left them; returns (epoch,
    global step)."""
    state = tracking.load_checkpoint(client, run_id, artifact)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for name, g in loader.generators.items():
        g.set_state(state["rng"][name])
    return state["epoch"], state["global_step"]


def write_outputs(client, run_id: str, cfg: Config) -> None:
    """results/train/: run.json, the final evaluation (metrics.json) and every evaluation
    (history.csv), read back from the run so a resumed training reports its whole history."""
    run = client.get_run(run_id)
    rows: dict[int, dict] = {}
    for key in sorted(filter(names.is_evaluation, run.data.metrics)):
        for m in client.get_metric_history(run_id, key):
            rows.setdefault(m.step, {"epoch": m.step})[key] = m.value
    history = [rows[e] for e in sorted(rows)]
    out = Path(cfg.results_dir) / "train"
    files.write_json(out / "metrics.json", {k: v for k, v in history[-1].items() if k != names.LR})
    files.write_csv(out / "history.csv", history)
    files.write_json(
        out / "run.json",
        {
            "run_id": run_id,
            "tracking_uri": client.tracking_uri,
            "experiment_name": cfg.name,
            "experiment_id": run.info.experiment_id,
        },
    )


def learning_rate(cfg: Config, epoch: int) -> float:
    """Learning rate of training epoch `epoch` (1-based): linear warmup over the first
    lr_warmup_epochs epochs from lr_warmup_initial, then step decay every lr_step epochs."""
    i, warm = epoch - 1, cfg.lr_warmup_epochs
    if i < warm:
        return cfg.lr_warmup_initial + (cfg.learning_rate - cfg.lr_warmup_initial) * i / warm
    decays = (i - warm) // cfg.lr_step if cfg.lr_step else 0
    return cfg.learning_rate * cfg.lr_decay_rate**decays


def checkpoint_epochs(save_checkpoint: list[int], epochs: int) -> set[int]:
    """0 -> initial and final; [N] -> every N epochs plus initial and final; a list -> exactly
    it."""
    if len(save_checkpoint) > 1:
        return set(save_checkpoint)
    period = save_checkpoint[0]
    return {0, epochs} | (set(range(period, epochs + 1, period)) if period else set())


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg.learning_rate,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def regularization(cfg: Config, model: torch.nn.Module) -> torch.Tensor | float:
    penalty = 0.0
    if cfg.l1_regularization:
        penalty = penalty + cfg.l1_regularization * sum(p.abs().sum() for p in model.parameters())
    if cfg.l2_regularization:
        penalty = penalty + cfg.l2_regularization * sum(p.pow(2).sum() for p in model.parameters())
    return penalty


def early_exit(cfg: Config, row: dict) -> bool:
    return bool(
        (cfg.early_exit_accuracy and row["train_accuracy"] >= cfg.stop_by_accuracy_threshold)
        or (cfg.early_exit_loss and row["train_loss"] <= cfg.stop_by_loss_threshold)
    )
