"""Training: device-resident data, batched augmentation, one MLflow run per training.

Epoch 0 is the initial network; training epochs are 1..epochs. The learning rate is a pure
function of the epoch, so a checkpoint needs no scheduler object to resume exactly.

Under torchrun the network trains with DistributedDataParallel: `batch_size` is the global
batch, every rank draws the same seeded order and takes its slice of each global batch, so
the batches are the ones a single process trains on; rank 0 alone talks to MLflow.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from mlflow.entities import RunTag
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import data as datalib
from . import distributed, files, tracking
from .config import PLACE_PARAMS, Config, ConfigError, TrainingDiverged
from .models import build_model


# Channels-last weights and batches: convolutions run without layout reorders (oneDNN on CPU,
# cuDNN on GPU); cnn5 width 4 trains 1.4x faster on 2 CPU cores (benchmarks/bench_train.py).
CL = torch.channels_last


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present. An explicit CUDA device on a machine without one runs on
    the CPU with a warning, so a GPU cluster's command also runs on a laptop, visibly slower.
    Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if name == "auto" or (name.startswith("cuda") and not torch.cuda.is_available()):
        if name != "auto":
            print(f"warning: device {name!r} requested but CUDA is not available; running on the CPU",
                  file=sys.stderr)
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_rank())
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device: {name!r} does not exist; this machine has {torch.cuda.device_count()} "
                          "CUDA devices")
    return torch.device(name)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters in glibc's <malloc.h>


def retain_freed_memory() -> None:
    """Has glibc's malloc keep freed memory for the process's next allocations. By default it
    maps every large block (a batch's activations, their gradients) afresh and unmaps it when
    freed, so each CPU training step page-faults all of them in again: that made cnn5 width 4
    steps 1.3-1.7x slower and resnet18 width 64 steps 5-8% slower on 2 cores (measured with
    benchmarks/bench_train.py). The price: the process keeps its peak memory. A no-op without glibc."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 1 << 30)  # blocks below 1 GiB come from the heap,
        mallopt(M_TRIM_THRESHOLD, 1 << 30)  # which keeps up to 1 GiB free at its top


def learning_rate(cfg: Config, epoch: int) -> float:
    """Learning rate of training epoch `epoch` (1-based): linear warmup over the first
    lr_warmup_epochs epochs from lr_warmup_initial, then step decay every lr_step epochs."""
    i, warm = epoch - 1, cfg.lr_warmup_epochs
    if i < warm:
        return cfg.lr_warmup_initial + (cfg.learning_rate - cfg.lr_warmup_initial) * i / warm
    decays = (i - warm) // cfg.lr_step if cfg.lr_step else 0
    return cfg.learning_rate * cfg.lr_decay_rate ** decays


def checkpoint_epochs(save_checkpoint: list[int], epochs: int) -> set[int]:
    """0 -> initial and final; [N] -> every N epochs plus initial and final; a list -> exactly it."""
    if len(save_checkpoint) > 1:
        return set(save_checkpoint)
    period = save_checkpoint[0]
    return {0, epochs} | (set(range(period, epochs + 1, period)) if period else set())


def make_model(cfg: Config, meta: dict) -> torch.nn.Module:
    return build_model(cfg.model, cfg.width, in_channels=meta["image_shape"][2],
                       num_classes=meta["num_classes"], batch_norm="batch_norm" in cfg.model_additions,
                       weight_init=cfg.weight_init)


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


@torch.inference_mode()
def evaluate(model, images, labels, mean, std, batch_size=1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss and correctness on un-augmented, normalised images."""
    model.eval()
    losses, correct = [], []
    for i in range(0, len(images), batch_size):
        logits = model(datalib.normalize(images[i:i + batch_size], mean, std).contiguous(memory_format=CL))
        y = labels[i:i + batch_size]
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        correct.append((logits.argmax(1) == y).float())
    model.train()
    return torch.cat(losses), torch.cat(correct)


# Evaluation metrics are SPLIT_*{loss,accuracy,error}; stats metrics end in their summary name.
EVAL_SUFFIXES = ("_loss", "_accuracy", "_error")


def evaluation(model, splits, mean, std) -> dict[str, float]:
    """Loss/accuracy on every split against the labels trained on, plus the accuracy on the
    corrupted training samples against their noisy labels: how much noise was memorised."""
    out = {}
    for name, (x, y, y_clean) in splits.items():
        loss, correct = evaluate(model, x, y, mean, std)
        out[f"{name}_loss"] = loss.mean().item()
        out[f"{name}_accuracy"] = correct.mean().item()
        out[f"{name}_error"] = 1 - out[f"{name}_accuracy"]
        corrupted = y != y_clean
        if name == "train" and corrupted.any():
            out["train_corrupted_accuracy"] = correct[corrupted].mean().item()
            out["train_clean_accuracy"] = correct[~corrupted].mean().item()
    return out


def save_checkpoint(client, run_id, model, optimizer, epoch, step, generators, cfg) -> None:
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch, global_step=step,
                 rng={k: g.get_state() for k, g in generators.items()}, config=cfg.flat())
    tracking.log_checkpoint(client, run_id, state, epoch)


def start_run(client, cfg: Config, meta: dict, steps_per_epoch: int) -> str:
    exp_id = tracking.experiment_id(client, cfg.name)
    tags = {"dvc_exp_name": os.environ.get("DVC_EXP_NAME"), "git_commit": tracking.git_commit(),
            "dataset_hash": meta["content_hash"], "steps_per_epoch": steps_per_epoch, **tracking.owner_tags()}
    run = client.create_run(exp_id, run_name=cfg.run_name(),
                            tags={k: str(v) for k, v in tags.items() if v is not None})
    tracking.log_params(client, run.info.run_id, cfg.flat())
    return run.info.run_id


def same_training(params: dict[str, str], cfg: Config) -> str | None:
    """The first parameter in which a run's params differ from cfg's, if any."""
    for key, value in cfg.flat().items():
        if key not in PLACE_PARAMS and params.get(key) != str(value):
            return key
    return None


def interrupted_run(client, cfg: Config) -> str | None:
    """The latest run of this exact training that was interrupted (KILLED, FAILED but not
    diverged, or RUNNING with its process gone) and holds a checkpoint: started again with
    the same parameters, a training continues it rather than starting over."""
    exp = client.get_experiment_by_name(cfg.name)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"params.model = '{cfg.model}' and params.width = "
                              f"'{cfg.width}' and attributes.status != 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    for run in runs:
        if (same_training(run.data.params, cfg) is None and "diverged" not in run.data.tags
                and not (run.info.status == "RUNNING" and tracking.process_alive(run))
                and tracking.list_checkpoints(client, run.info.run_id)):
            return run.info.run_id
    return None


def resume_checkpoint(client, run_id: str, cfg: Config, meta: dict) -> str:
    """The last checkpoint of run `run_id`, which must have been trained with cfg's parameters
    on the very data prepared now."""
    try:
        run = client.get_run(run_id)
    except Exception:
        raise ConfigError(f"resume_from: {run_id!r} is not a run in the store {client.tracking_uri}") from None
    key = same_training(run.data.params, cfg)
    if key is not None:
        raise ConfigError(f"resume_from: run {run_id} has {key}={run.data.params.get(key)!r} but this "
                          f"training asks for {str(getattr(cfg, key))!r}; resume with the run's parameters")
    if run.data.tags.get("dataset_hash", meta["content_hash"]) != meta["content_hash"]:
        raise ConfigError(f"resume_from: run {run_id} was trained on data with hash "
                          f"{run.data.tags['dataset_hash'][:12]}, the prepared data now has "
                          f"{meta['content_hash'][:12]}; the source files or the preparing code changed")
    checkpoints = tracking.list_checkpoints(client, run_id)
    if not checkpoints:
        raise ConfigError(f"resume_from: run {run_id} has no checkpoint to resume from")
    return checkpoints[-1][1]


def open_run(client, cfg: Config, meta: dict, steps_per_epoch: int) -> tuple[str, str | None]:
    """(run id, checkpoint to continue from): run `resume_from`, else the interrupted run of
    this training, else a new run, which has no checkpoint yet."""
    run_id = cfg.resume_from or interrupted_run(client, cfg)
    if run_id:
        return run_id, resume_checkpoint(client, run_id, cfg, meta)
    return start_run(client, cfg, meta, steps_per_epoch), None


def load_state(client, run_id: str, artifact: str, model, optimizer, generators) -> tuple[int, int]:
    """Model, optimizer and generators as the checkpoint left them; returns (epoch, global step)."""
    state = tracking.load_checkpoint(client, run_id, artifact)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for name, g in generators.items():
        g.set_state(state["rng"][name])
    return state["epoch"], state["global_step"]


def train(cfg: Config) -> str:
    """Train one network as `cfg` says (or continue run `cfg.resume_from`); returns the run id."""
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size: {cfg.batch_size} does not divide over world size {world}; the batch "
                          f"size is global, each of the {world} processes takes batch_size / {world}")
    device = resolve_device(cfg.device)
    if cfg.compile and device.type == "cpu" and not any(map(shutil.which, (os.environ.get("CXX", "g++"), "c++"))):
        raise ConfigError("compile: torch.compile on the CPU needs a C++ compiler (g++ or c++ on PATH, or $CXX); "
                          "install one or train with compile: false")
    torch.set_num_threads(cfg.workers)
    if device.type == "cpu":
        retain_freed_memory()
    with distributed.process_group(device):
        return _train(cfg, device)


def _train(cfg: Config, device: torch.device) -> str:
    world, rank0 = distributed.world_size(), distributed.is_rank0()
    prepared = distributed.in_turn(datalib.ensure_prepared, cfg)
    meta = prepared.meta
    splits = {name: datalib.to_device(split, device) for name, split in prepared.splits.items()}
    x_train, y_train, _ = splits["train"]
    mean, std = (torch.tensor(meta[k], device=device) for k in ("mean", "std"))
    n_train = len(x_train)
    steps_per_epoch = -(-n_train // cfg.batch_size)

    torch.manual_seed(cfg.seed)
    model = make_model(cfg, meta).to(device, memory_format=CL)
    # `net` trains (under torchrun, DDP averages its gradients over the ranks); `model`, the same
    # parameters, is what gets evaluated, regularised and saved.
    net = model if world == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    optimizer = make_optimizer(cfg, model)
    # Every rank draws the same batch order and augmentation: the same streams as one process.
    generators = {"batches": torch.Generator().manual_seed(cfg.seed),
                  "augment": torch.Generator(device).manual_seed(cfg.seed + 1)}
    save_at = checkpoint_epochs(cfg.save_checkpoint, cfg.epochs)

    uri = tracking.tracking_uri(cfg.tracking_uri)
    client = tracking.get_client(uri)
    run_id, checkpoint = distributed.on_rank0(open_run, client, cfg, meta, steps_per_epoch)
    start_epoch, step = 0, 0
    if checkpoint:
        start_epoch, step = load_state(client, run_id, checkpoint, model, optimizer, generators)
        if rank0:
            client.update_run(run_id, "RUNNING")
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tracking.owner_tags().items()])
            print(f"resuming run {run_id} from epoch {start_epoch}", file=sys.stderr)
    # Rank 0 owns the run: it logs, saves checkpoints and ends the run FINISHED or FAILED. The
    # other ranks only train; every decision to stop reaches them through a collective.
    # A resumed run re-computes bit-identical values for steps it had logged: send only new ones.
    # The logger is left first: what it holds is in the run before the run ends.
    with (tracking.terminating(client, run_id) if rank0 else contextlib.nullcontext(),
          distributed.failing_together(),
          tracking.BackgroundMetricLogger(client, run_id, skip_logged=start_epoch > 0) if rank0
          else contextlib.nullcontext() as logger):
        epoch = start_epoch
        if epoch == 0 and rank0:
            logger.log_dict(evaluation(model, splits, mean, std), step=0)
            if 0 in save_at:
                save_checkpoint(client, run_id, model, optimizer, 0, 0, generators, cfg)
        bar = tqdm(range(start_epoch + 1, cfg.epochs + 1), desc=cfg.run_name(),
                   disable=not (rank0 and sys.stderr.isatty()))
        for epoch in bar:
            lr = learning_rate(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = train_epoch(cfg, net, model, optimizer, x_train, y_train, mean, std, generators).tolist()
            first_step, step = step + 1, step + len(losses)
            for s, value in enumerate(losses, first_step):
                if not math.isfinite(value):
                    if rank0:
                        logger.flush()  # the good steps before it stay in the run
                        client.set_tag(run_id, "diverged", "true")
                    raise TrainingDiverged(f"training diverged: loss {value} at epoch {epoch}, step {s}; "
                                           "lower the learning rate (the last good checkpoint stays in run "
                                           f"{run_id})")
                if rank0 and s % cfg.loss_checkpoint == 0:
                    logger.log("batch_loss", value, s)
            stop = False
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                if rank0:
                    row = {"lr": lr, **evaluation(model, splits, mean, std)}
                    logger.log_dict(row, step=epoch)
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_accuracy']:.3f}")
                    stop = early_exit(cfg, row)
                stop = distributed.broadcast(stop)  # rank 0 evaluated; all ranks stop together
            # An early stop is the final epoch, saved unless an explicit list was asked for.
            if rank0 and (epoch in save_at or (stop and len(cfg.save_checkpoint) == 1)):
                logger.flush()  # a run resumed from this checkpoint holds every step before it
                save_checkpoint(client, run_id, model, optimizer, epoch, step, generators, cfg)
            if stop:
                break
        if rank0:
            logger.flush()
            client.log_batch(run_id, tags=[RunTag("epochs_trained", str(epoch))])
            write_outputs(client, run_id, cfg, uri)
    return run_id


def train_epoch(cfg: Config, net, model, optimizer, x_train, y_train, mean, std, generators) -> torch.Tensor:
    """One pass over the training set in a fresh seeded order. Returns every global batch's mean
    loss, still on the device: reading them is the epoch's one host sync (and under torchrun its
    one all-reduce), and every rank gets the same values, so every rank sees a divergence."""
    world, n_train = distributed.world_size(), len(x_train)
    loss_sums, sizes = [], []
    order = torch.randperm(n_train, generator=generators["batches"]).to(x_train.device)
    for i in range(0, n_train, cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        x, y = x_train[idx], y_train[idx]
        if cfg.augmentation:  # the whole global batch, so the draws are the single process's
            x = datalib.random_crop_flip(x, generators["augment"])
        mine = distributed.part(len(idx))
        batch = datalib.normalize(x[mine], mean, std).contiguous(memory_format=CL)
        loss_sum = F.cross_entropy(net(batch), y[mine], reduction="sum")
        loss_sums.append(loss_sum.detach())
        sizes.append(len(idx))
        # DDP averages the ranks' gradients: world * (this rank's sum) / (global batch size)
        # makes that average the gradient of the global batch's mean loss, even when the
        # last batch splits unevenly.
        loss = loss_sum * world / len(idx) + regularization(cfg, model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return distributed.all_sum(torch.stack(loss_sums)) / torch.tensor(sizes, device=x_train.device)


def write_outputs(client, run_id: str, cfg: Config, uri: str) -> None:
    """results/train/: run.json, the final evaluation (metrics.json) and every evaluation
    (history.csv), read back from the run so a resumed training reports its whole history."""
    run = client.get_run(run_id)
    keys = sorted(k for k in run.data.metrics
                  if k == "lr" or (k.split("_")[0] in ("train", "val", "test") and k.endswith(EVAL_SUFFIXES)))
    rows: dict[int, dict] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            rows.setdefault(m.step, {"epoch": m.step})[key] = m.value
    history = [rows[e] for e in sorted(rows)]
    out = Path(cfg.results_dir) / "train"
    files.write_json(out / "metrics.json", {k: v for k, v in history[-1].items() if k != "lr"})
    files.write_csv(out / "history.csv", history)
    files.write_json(out / "run.json", {"run_id": run_id, "tracking_uri": uri, "experiment_name": cfg.name,
                                        "experiment_id": run.info.experiment_id})


def regularization(cfg: Config, model: torch.nn.Module) -> torch.Tensor | float:
    penalty = 0.0
    if cfg.l1_regularization:
        penalty = penalty + cfg.l1_regularization * sum(p.abs().sum() for p in model.parameters())
    if cfg.l2_regularization:
        penalty = penalty + cfg.l2_regularization * sum(p.pow(2).sum() for p in model.parameters())
    return penalty


def early_exit(cfg: Config, row: dict) -> bool:
    return bool((cfg.early_exit_accuracy and row["train_accuracy"] >= cfg.stop_by_accuracy_threshold)
                or (cfg.early_exit_loss and row["train_loss"] <= cfg.stop_by_loss_threshold))
