"""Statistics of trained networks on their data points, pulled from MLflow by run id.

For each chosen checkpoint, the samples of one split (order drawn with mc_sample_seed,
the first `skip` left out) go through `jacobian.sample_stats` in batches; each (statistic,
checkpoint) gets one result file per shard and MLflow gets per-batch means
(step = batch index) and per-checkpoint summaries (step = epoch) on the training run.
Under torchrun the ranks split the batches and rank 0 writes what one process would;
shard files of independent --skip runs are joined by `lipdd stats --merge`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import config as configlib
from . import data as datalib
from . import distributed, files, tracking
from .config import PLACE_PARAMS, Config, ConfigError
from .jacobian import JACOBIAN_METRICS, sample_stats
from .train import make_model, resolve_device, retain_freed_memory

# Params that identify a training run the seed's way (compute_stats.py's flags).
IDENTIFYING = ("data", "model", "width", "label_noise", "augmentation", "seed", "train_split", "val_split",
               "data_split_seed", "label_seed")


def stat_name(metric: str, normalization: str, target_logit_only: bool) -> str:
    if metric not in JACOBIAN_METRICS:
        return metric
    return f"{metric}_{normalization}" + ("_target" if target_logit_only else "")


def resolve_run(cfg: Config, client) -> str:
    """--run-id; else results/train/run.json when its run matches the identifying params;
    else the latest finished run in the experiment whose identifying params match."""
    if cfg.stats.run_id:
        try:
            client.get_run(cfg.stats.run_id)
        except Exception:
            raise ConfigError(f"stats.run_id: {cfg.stats.run_id!r} is not a run in the store "
                              f"{client.tracking_uri}") from None
        return cfg.stats.run_id
    wanted = {k: str(v) for k, v in cfg.flat().items() if k in IDENTIFYING}
    run_file = Path(cfg.results_dir) / "train" / "run.json"
    if run_file.exists():
        run_id = json.loads(run_file.read_text())["run_id"]
        try:
            params = client.get_run(run_id).data.params
        except Exception:
            params = {}
        if all(params.get(k) == v for k, v in wanted.items()):
            return run_id
    exp = client.get_experiment_by_name(cfg.name)
    query = " and ".join(f"params.{k} = '{v}'" for k, v in wanted.items())
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], f"{query} and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])
    if not runs:
        raise ConfigError(f"stats.run_id: no finished run in experiment {cfg.name!r} has "
                          f"{', '.join(f'{k}={v}' for k, v in wanted.items())}; pass --run-id")
    # Re-runs of one configuration are interchangeable (the latest wins); runs that differ in
    # anything else (learning rate, epochs, ...) are a choice only the user can make.
    what = lambda r: {k: v for k, v in r.data.params.items() if k not in PLACE_PARAMS}
    differing = [r for r in runs if what(r) != what(runs[0])]
    if differing:
        listing = "; ".join(f"{r.info.run_id} ({r.info.run_name})" for r in runs[:10])
        raise ConfigError(f"stats.run_id: {len(runs)} finished runs match and differ in other parameters: "
                          f"{listing}; pass --run-id")
    return runs[0].info.run_id


def select_checkpoints(cfg: Config, available: list[tuple[int, str]], steps_per_epoch: int):
    s = cfg.stats
    if s.checkpoint is None:
        return available
    if s.checkpoint_by_step:
        per_epoch = s.nsteps_per_epoch or steps_per_epoch
        by_epoch = dict(available)
        wanted = []
        for step in s.checkpoint:
            if step % per_epoch or step // per_epoch not in by_epoch:
                raise ConfigError(f"stats.checkpoint: step {step} is no checkpoint of this run; it has steps "
                                  f"{[e * per_epoch for e, _ in available]}")
            wanted.append((step // per_epoch, by_epoch[step // per_epoch]))
        return wanted
    for i in s.checkpoint:
        if i >= len(available):
            raise ConfigError(f"stats.checkpoint: ordinal {i} is out of range; the run has {len(available)} "
                              f"checkpoints (ordinals 0..{len(available) - 1})")
    return [available[i] for i in s.checkpoint]


def sample_selection(cfg: Config, n_split: int) -> np.ndarray:
    """Positions in the split: a permutation drawn with mc_sample_seed, cut to num_samples,
    the first `skip` left out."""
    s = cfg.stats
    n = n_split if s.num_samples is None else s.num_samples
    if n > n_split:
        raise ConfigError(f"stats.num_samples: {n} is more than the {n_split} samples of split "
                          f"{s.dataset_split!r}")
    if s.skip >= n:
        raise ConfigError(f"stats.skip: {s.skip} leaves no samples of the {n} selected")
    return np.random.default_rng(s.mc_sample_seed).permutation(n_split)[s.skip:n]


def summarize(values: np.ndarray, corrupted: np.ndarray) -> dict[str, float]:
    out = dict(mean=values.mean(), median=np.median(values), std=values.std())
    if corrupted.any():
        out["corrupted_mean"] = values[corrupted].mean()
    if (~corrupted).any():
        out["clean_mean"] = values[~corrupted].mean()
    return {k: float(v) for k, v in out.items()}


def seed_layout_dir(cfg: Config, run_cfg: Config) -> Path:
    """SAVE_DIR/NAME/MODEL/DATA/TRAINING_SETTING/seed-SEED, as the seed scripts wrote."""
    return (Path(cfg.save_dir) / cfg.name / run_cfg.model_name / run_cfg.data / run_cfg.training_setting
            / f"seed-{run_cfg.seed}")


def export_checkpoints(cfg: Config) -> Path:
    """Every checkpoint of the run in one checkpoints.zip, in the seed layout."""
    client = tracking.get_client(tracking.tracking_uri(cfg.tracking_uri), create=False)
    run_id = resolve_run(cfg, client)
    run_cfg = configlib.from_flat(client.get_run(run_id).data.params)
    path = seed_layout_dir(cfg, run_cfg) / "checkpoints.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, "checkpoints", tmp))
        # Zip beside the target, then rename: a killed export never leaves a truncated archive.
        partial = shutil.make_archive(str(path.parent / f".checkpoints.{os.getpid()}"), "zip", local.parent,
                                      local.name)
    os.replace(partial, path)
    return path


def checkpoint_values(model, images, labels, mean, std, s) -> tuple[dict, dict]:
    """Per-sample values (float64 numpy) and per-batch means of every statistic, keyed by
    (metric, normalization), for one loaded checkpoint."""
    values, batch_means = {}, {}
    batches = range(0, len(images), s.batch_size)
    for i in tqdm(batches, desc="batches", disable=not (distributed.is_rank0() and sys.stderr.isatty())):
        x = datalib.normalize(images[i:i + s.batch_size], mean, std)
        result = sample_stats(model, x, labels[i:i + s.batch_size], s.metric, s.normalization,
                              s.target_logit_only, s.bigmem)
        for key, v in result.items():
            values.setdefault(key, []).append(v.detach().double().cpu())
    for key, chunks in values.items():
        batch_means[key] = [c.mean().item() for c in chunks]
        values[key] = torch.cat(chunks).numpy()
    return values, batch_means


def gather_values(values: dict, batch_means: dict) -> tuple[dict, dict] | None:
    """On rank 0, every rank's values and batch means joined in sample order (ranks hold
    consecutive blocks of batches; a rank with no batch holds nothing); None on the others."""
    parts = distributed.gather((values, batch_means))
    if parts is None:
        return None
    keys = dict.fromkeys(k for v, _ in parts for k in v)
    return ({k: np.concatenate([v[k] for v, _ in parts if k in v]) for k in keys},
            {k: [m for _, b in parts for m in b.get(k, [])] for k in keys})


def pipeline_run_id(cfg: Config) -> str | None:
    run_file = Path(cfg.results_dir) / "train" / "run.json"
    return json.loads(run_file.read_text())["run_id"] if run_file.exists() else None


def compute_stats(cfg: Config) -> list[Path]:
    """Run the stats stage as `cfg` says (or merge shard files, with stats.merge); returns the
    result files written. Under torchrun the ranks share the batches and rank 0 writes."""
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.workers)
    if device.type == "cpu":
        retain_freed_memory()
    with distributed.process_group(device):
        return _compute_stats(cfg, device)


def _compute_stats(cfg: Config, device: torch.device) -> list[Path]:
    s = cfg.stats
    client = tracking.get_client(tracking.tracking_uri(cfg.tracking_uri), create=False)
    run_id = resolve_run(cfg, client)
    run = client.get_run(run_id)
    run_cfg = configlib.from_flat(run.data.params)
    out_dir = Path(s.output_dir) if s.output_dir else seed_layout_dir(cfg, run_cfg)
    if s.merge:
        return merge_shards(out_dir)
    available = tracking.list_checkpoints(client, run_id)
    rank0 = distributed.is_rank0()
    if s.checkpoint == []:  # the seed: no checkpoint given -> list them
        for i, (epoch, path) in enumerate(available if rank0 else []):
            print(f"{i}\tepoch {epoch}\t{path}")
        return []
    chosen = select_checkpoints(cfg, available, int(run.data.tags.get("steps_per_epoch", 0)) or 1)

    prepared = distributed.in_turn(datalib.ensure_prepared, run_cfg, run.data.tags.get("dataset_hash"))
    if s.dataset_split not in prepared.splits:
        raise ConfigError(f"stats.dataset_split: {s.dataset_split!r} does not exist for this run; it has "
                          f"{sorted(prepared.splits)} (a 'val' split needs train_split and val_split)")
    split = prepared.splits[s.dataset_split]
    positions = sample_selection(cfg, len(split.labels))
    # Each rank computes a block of whole batches, so every value and batch mean is the one a
    # single process computes; rank 0 joins the blocks in order.
    batches = distributed.part(-(-len(positions) // s.batch_size))
    mine = torch.as_tensor(positions[batches.start * s.batch_size:batches.stop * s.batch_size], device=device)
    images, labels = (t[mine] for t in datalib.to_device(split, device)[:2])
    mean, std = (torch.tensor(prepared.meta[k], device=device) for k in ("mean", "std"))
    corrupted = split.corrupted[positions]
    first_batch = s.skip // s.batch_size
    # The pipeline's summary describes the pipeline's run; any other run's goes beside its results.
    summary_dir = Path(cfg.results_dir) / "stats" if run_id == pipeline_run_id(cfg) else out_dir
    logger = tracking.MetricLogger(client, run_id)
    metadata = dict(run_id=run_id, model=run_cfg.model_name, dataset=run_cfg.data, split=s.dataset_split,
                    label_noise=run_cfg.label_noise, augmentation=run_cfg.augmentation, seed=run_cfg.seed,
                    label_seed=run_cfg.label_seed, data_split_seed=run_cfg.data_split_seed,
                    mc_sample_seed=s.mc_sample_seed, num_samples=len(positions), skip=s.skip,
                    batch_size=s.batch_size, target_logit_only=s.target_logit_only,
                    dataset_hash=prepared.meta["content_hash"])
    samples = dict(sample_ids=split.index[positions].tolist(), targets=split.labels[positions].tolist(),
                   ground_truths=split.clean_labels[positions].tolist())
    written, summary_rows, last_summary = [], [], {}

    model = make_model(run_cfg, prepared.meta).to(device).eval()
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    # a log beside the results, as the seed kept one; rank 0 alone writes files
    with open(out_dir / f"stats-{first_batch}.log", "a") if rank0 else contextlib.nullcontext() as log:
        for epoch, artifact in chosen:
            started = time.time()
            state = tracking.load_checkpoint(client, run_id, artifact, device)
            model.load_state_dict(state["model"])
            gathered = gather_values(*checkpoint_values(model, images, labels, mean, std, s))
            if not rank0:  # the others go on to the next checkpoint while rank 0 writes this one
                continue
            values, batch_means = gathered
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} run {run_id} epoch {epoch}: {len(positions)} "
                      f"{s.dataset_split} samples from position {s.skip}, {time.time() - started:.1f}s\n")
            row = {"epoch": epoch}
            for (metric, norm), per_sample in values.items():
                name = stat_name(metric, norm, s.target_logit_only)
                summary = summarize(per_sample, corrupted)
                prefix = f"{s.dataset_split}_{name}"
                # A recomputation (dvc repro -f, a re-run by hand) logs nothing the run already holds.
                if not logger.holds(f"{prefix}_mean", epoch, summary["mean"]):
                    logger.log_dict({f"{prefix}_{k}": v for k, v in summary.items()}, step=epoch)
                    for b, value in enumerate(batch_means[metric, norm]):
                        logger.log(f"{prefix}_batch_mean_epoch{epoch:04d}", value, first_batch + b)
                row.update({f"{name}_{k}": v for k, v in summary.items()})
                last_summary[name] = summary
                path = out_dir / f"{s.outname or f'{name}_{s.dataset_split}_epoch{epoch:04d}'}-{first_batch}.json"
                files.write_json(path, {"stats": per_sample.tolist(), **samples, "metadata": {
                    **metadata, "checkpoint_epoch": epoch, "checkpoint_step": state["global_step"], "metric": metric,
                    "normalization": norm if metric in JACOBIAN_METRICS else None}})
                written.append(path)
                log.write(f"  {path.name}: mean {summary['mean']:.6g}\n")
            summary_rows.append(row)
            logger.flush()
            log.flush()
    if not rank0:
        return []
    files.write_json(summary_dir / "metrics.json", {"run_id": run_id, "epoch": chosen[-1][0], **last_summary})
    files.write_csv(summary_dir / "history.csv", summary_rows)
    return written


# Fields of a result file with one entry per sample, in sample order.
PER_SAMPLE = ("stats", "sample_ids", "targets", "ground_truths")


def merge_shards(out_dir: Path) -> list[Path]:
    """Join every set of shard files OUT_NAME-BATCH_ID.json in `out_dir` (runs with --skip,
    e.g. one job per GPU) into the file one run over all their samples writes:
    OUT_NAME-<first BATCH_ID>.json, per-sample lists concatenated, num_samples and skip
    updated. The merged shards are removed; an OUT_NAME with one file is left as it is.
    Returns the merged files."""
    sets: dict[str, list[Path]] = {}
    for path in sorted(out_dir.glob("*-*.json")):
        outname, _, batch_id = path.stem.rpartition("-")
        if batch_id.isdigit():
            sets.setdefault(outname, []).append(path)
    if not sets:
        raise ConfigError(f"stats.merge: no result files OUT_NAME-BATCH_ID.json in {out_dir}")
    written = []
    for outname, paths in sets.items():
        shards = sorted(((json.loads(p.read_text()), p) for p in paths), key=lambda r: r[0]["metadata"]["skip"])
        if len(shards) == 1:
            continue
        first, last = shards[0][0]["metadata"], shards[-1][0]["metadata"]
        for (a, pa), (b, pb) in zip(shards, shards[1:]):
            ma, mb = a["metadata"], b["metadata"]
            differ = sorted(k for k in ma.keys() | mb.keys()
                            if k not in ("num_samples", "skip") and ma.get(k) != mb.get(k))
            if differ:
                k = differ[0]
                raise ConfigError(f"stats.merge: {pa.name} and {pb.name} differ in {k} ({ma.get(k)!r} vs "
                                  f"{mb.get(k)!r}); they are not shards of one result")
            end = ma["skip"] + ma["num_samples"]
            if end != mb["skip"]:
                raise ConfigError(f"stats.merge: {pa.name} holds samples {ma['skip']}..{end - 1} but {pb.name} starts "
                                  f"at {mb['skip']}; shards must be contiguous and must not overlap (each job: "
                                  "--skip=START --num-samples=END of its own range)")
        merged = {k: [x for r, _ in shards for x in r[k]] for k in PER_SAMPLE}
        merged["metadata"] = {**first, "num_samples": last["skip"] + last["num_samples"] - first["skip"]}
        path = files.write_json(out_dir / f"{outname}-{first['skip'] // first['batch_size']}.json", merged)
        for _, p in shards:
            if p != path:
                p.unlink()
        written.append(path)
    return written
