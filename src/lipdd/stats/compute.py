"""The stats stage: measure chosen checkpoints of a training run, pulled from MLflow by run id.

What to measure is selected first (the run, its checkpoints, the samples: `select_checkpoints`,
`sample_selection`), then each checkpoint is measured (`measure_samples`, `measure_network`,
`measure_probes`: the measures of lipdd.measures, on the split and on the probe sets of
lipdd.measures.probes), then written (`Writer`: per-sample result files with their per-batch means,
summaries, MLflow metrics at step = epoch, a log). Under torchrun the ranks measure contiguous
blocks of batches, deal out the per-network measures, and rank 0 measures the probe sets and
writes what one process would. Listing a run's checkpoints, and joining
the shard files of independent --skip jobs are commands of their own.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import config as configlib
from .. import data as datalib
from .. import distributed, runs, runtime, tracking
from ..config import Config
from ..errors import ConfigError
from ..measures import MEASURES, PROBES, Network, Points, ProbeSet, per_sample
from ..models import model_for
from .shards import merge_shards
from .writer import Writer

log = logging.getLogger(__name__)


def select_checkpoints(cfg: Config, available: list[tuple[int, str]], steps_per_epoch: int):
    """[(key, epoch, artifact)] of the checkpoints --checkpoint names, keyed as upstream keys them:
    by ordinal (0 = initial network); with --checkpoint-by-step by global step, or by
    step // --nsteps-per-epoch when that is given. No --checkpoint: every checkpoint, by ordinal."""
    s = cfg.stats
    if not s.checkpoint_by_step:
        keyed = [(i, e, a) for i, (e, a) in enumerate(available)]
    else:
        keyed = [(e * steps_per_epoch // (s.nsteps_per_epoch or 1), e, a) for e, a in available]
    if s.checkpoint is None:
        return keyed
    by_key = {k: (k, e, a) for k, e, a in keyed}
    for k in s.checkpoint:
        if k not in by_key:
            kind = (
                "ordinal" if not s.checkpoint_by_step else "epoch" if s.nsteps_per_epoch else "step"
            )
            raise ConfigError(
                f"stats.checkpoint: {kind} {k} is no checkpoint of this run; it has {kind}s "
                f"{[k for k, _, _ in keyed]}"
            )
    return [by_key[k] for k in s.checkpoint]


def sample_selection(cfg: Config, n_split: int) -> np.ndarray:
    """Positions in the split, as upstream's sampler takes them: in order, from position skip on,
    num_samples of them (default: the rest of the split)."""
    s = cfg.stats
    start = s.skip or 0
    n = n_split - start if s.num_samples is None else s.num_samples
    if n <= 0 or start + n > n_split:
        raise ConfigError(
            f"stats.num_samples: {s.num_samples or n} samples from position {start} are more than "
            f"the {n_split} samples of split {s.dataset_split!r}"
        )
    return np.arange(start, start + n)


def training_subset(prepared: datalib.Prepared, device, n: int, seed: int) -> Points:
    """n training points drawn without replacement with numpy.random.default_rng(seed), in split
    order, normalised: the same points at every checkpoint."""
    train = prepared.splits["train"]
    chosen = np.sort(
        np.random.default_rng(seed).choice(
            len(train.labels), min(n, len(train.labels)), replace=False
        )
    )
    part = train.take(chosen)
    x, y = next(iter(datalib.Loader.of(part, prepared.meta, device, len(chosen))))
    meta = prepared.meta
    return Points(
        x, y, part.index, part.corrupted, list(meta["mean"]), list(meta["std"]), meta["num_classes"]
    )


# --- measuring ------------------------------------------------------------------------------------


def interactive() -> bool:
    """Progress bars only for a person watching: rank 0, on a terminal."""
    return distributed.is_rank0() and sys.stderr.isatty()


def measure_batches(model, batches, s: configlib.StatsConfig) -> dict[tuple, np.ndarray]:
    """{(measure, normalization or None): float64 values, one per sample of the batches (x, y)}
    of the selected per-sample measures."""
    values: dict[tuple, list] = {}
    for x, y in batches:
        for key, v in per_sample(
            model, x, y, s.metric, s.normalization, s.target_logit_only, s.bigmem
        ).items():
            values.setdefault(key, []).append(v.detach().double().cpu())
    return {k: torch.cat(v).numpy() for k, v in values.items()}


def measure_samples(
    model, loader: datalib.Loader, s: configlib.StatsConfig
) -> dict[tuple, np.ndarray]:
    """measure_batches over the loader's batches, from one loaded checkpoint."""
    if not any(MEASURES[m].kind == "sample" for m in s.metric):
        return {}  # per-network measures only: no batch to go through
    return measure_batches(
        model, tqdm(loader, desc="batches", leave=False, disable=not interactive()), s
    )


def measure_points(
    model, x: torch.Tensor, targets: torch.Tensor, s: configlib.StatsConfig
) -> dict[tuple, np.ndarray]:
    """measure_batches over points already on the device, in batches of stats.batch_size."""
    b = s.batch_size
    return measure_batches(
        model, ((x[i : i + b], targets[i : i + b]) for i in range(0, len(targets), b)), s
    )


def measure_probes(
    model, points: Points, s: configlib.StatsConfig
) -> dict[str, tuple[ProbeSet, dict]]:
    """{probe: (its points, {(measure, normalization or None): values at each point})}."""
    return {
        name: (probe, measure_points(model, probe.x, probe.targets, s))
        for name in s.probes
        for probe in (PROBES[name](points, s, model),)
    }


def measure_network(network: Network, selected: list[str]) -> dict[str, tuple[dict, dict]] | None:
    """{measure: (summary, details)} of the selected per-network measures, on rank 0 (None on the
    others); under torchrun each measure is taken by one rank, in turn."""
    chosen = [name for name in selected if MEASURES[name].kind == "network"]
    return distributed.shared(lambda name: MEASURES[name].fn(network), chosen)


def gather_values(values: dict[tuple, np.ndarray]) -> dict[tuple, np.ndarray] | None:
    """On rank 0, every rank's values joined in sample order (ranks hold consecutive blocks of
    batches; a rank with no batch holds nothing); None on the others."""
    parts = distributed.gather(values)
    if parts is None:
        return None
    keys = dict.fromkeys(k for v in parts for k in v)
    return {k: np.concatenate([v[k] for v in parts if k in v]) for k in keys}


def compute_stats(cfg: Config) -> list[Path]:
    """Measure the run's chosen checkpoints as `cfg` says; returns the result files written.
    Under torchrun the ranks share the batches and rank 0 writes."""
    device = runtime.setup(cfg)
    with distributed.process_group(device):
        return _compute_stats(cfg, device)


def _compute_stats(cfg: Config, device: torch.device) -> list[Path]:
    s = cfg.stats
    client, run, run_cfg, out_dir = runs.analysed_run(cfg)
    run_id = run.info.run_id
    refuse_foreign_results(out_dir, run_id)
    available = tracking.list_checkpoints(client, run_id)
    chosen = select_checkpoints(cfg, available, int(run.data.tags.get("steps_per_epoch", 0)) or 1)
    from_start = [m for m in s.metric if "initial" in MEASURES[m].options]
    if from_start and (not available or available[0][0] != 0):
        raise ConfigError(
            f"stats.metric: {', '.join(from_start)} needs the initial network, and run {run_id} "
            "has no checkpoint of epoch 0"
        )
    if s.probes and not any(MEASURES[m].kind == "sample" for m in s.metric):
        raise ConfigError(
            f"stats.probes: {', '.join(s.probes)} are measured with the per-sample measures, and "
            f"stats.metric ({', '.join(s.metric)}) has none"
        )
    prepared = distributed.in_turn(
        datalib.ensure_prepared, run_cfg, run.data.tags.get("dataset_hash")
    )
    if s.dataset_split not in prepared.splits:
        raise ConfigError(
            f"stats.dataset_split: {s.dataset_split!r} does not exist for this run; it has "
            f"{sorted(prepared.splits)} (a 'val' split needs train_split and val_split)"
        )
    split = prepared.splits[s.dataset_split]
    samples = split.take(sample_selection(cfg, len(split.labels)))
    loader = datalib.Loader.of(samples, prepared.meta, device, s.batch_size, shard="blocks")
    model = model_for(run_cfg, prepared.meta).to(device).eval()
    initial = cache(
        lambda: tracking.load_checkpoint(client, run_id, available[0][1], device)["model"]
    )
    channels_first = prepared.meta["image_shape"][2:] + prepared.meta["image_shape"][:2]
    curvature_points = cache(
        lambda: training_subset(prepared, device, s.curvature_samples, s.curvature_seed)
    )
    network = Network(
        model,
        initial,
        tuple(channels_first),
        lambda: (curvature_points().x, curvature_points().targets),
        s,
    )
    probe_points = cache(lambda: training_subset(prepared, device, s.probe_samples, s.probe_seed))
    write = distributed.rank0_only(
        Writer, cfg, client, run_id, run_cfg, samples, prepared.meta, out_dir
    )
    with write:
        for key, epoch, artifact in tqdm(
            chosen,
            desc=f"run {run_id[:8]} checkpoints",
            unit="checkpoint",
            disable=not interactive(),
        ):
            started = time.time()
            state = tracking.load_checkpoint(client, run_id, artifact, device)
            load_weights(model, state["model"], run_id, artifact)
            values = gather_values(measure_samples(model, loader, s))
            # A --skip shard past the first measures its samples only: the per-network measures
            # and the probe sets do not depend on them, and every shard would repeat them.
            whole = not s.skip
            measured = measure_network(network, s.metric) if whole else {}
            probed = (
                measure_probes(model, probe_points(), s) if whole and distributed.is_rank0() else {}
            )
            write.checkpoint(
                key, epoch, state["global_step"], values, measured, probed, time.time() - started
            )
    return write.files() or []


def refuse_foreign_results(out_dir: Path, run_id: str) -> None:
    """One directory, one run's results. The upstream layout names a run's directory by the
    parameters upstream's scripts name runs by, so runs that differ only in others (a learning rate,
    epochs) share one, and one's files would overwrite the other's."""
    for path in sorted(out_dir.glob("*.json")):
        try:
            found = json.loads(path.read_text())
            other = found.get("metadata", found).get("run_id")
        except (OSError, ValueError, AttributeError):
            continue
        if other and other != run_id:
            raise ConfigError(
                f"stats.output_dir: {out_dir} holds {path.name} of run {other}, and this is run "
                f"{run_id}; pass --output-dir DIR to keep both runs' results"
            )


def load_weights(model, state_dict: dict, run_id: str, artifact: str) -> None:
    """Load a checkpoint's weights, or say in one line why they do not fit the model."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = next(iter(state_dict), "")
        raise ConfigError(
            f"checkpoint {artifact} of run {run_id} does not fit the network lipdd builds for it "
            f"(first parameter {first!r}; networks saved before lipdd took upstream's parameter "
            f"names cannot be read: retrain the run): {str(e).splitlines()[0]}"
        ) from None


def list_checkpoints(cfg: Config) -> None:
    """Upstream's `--checkpoint` with no value: the run's checkpoints, by ordinal, with the global
    step upstream lists them by."""
    client, run, _, _ = runs.analysed_run(cfg)
    steps = int(run.data.tags.get("steps_per_epoch", 0))
    for i, (epoch, path) in enumerate(tracking.list_checkpoints(client, run.info.run_id)):
        print(f"{i}\tstep {epoch * steps}\tepoch {epoch}\t{path}")


def merge(cfg: Config) -> list[Path]:
    """`lipdd stats --merge`: join the shard files in the run's output directory."""
    return merge_shards(runs.analysed_run(cfg)[3])
