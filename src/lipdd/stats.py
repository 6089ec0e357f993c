"""The stats stage: measure chosen checkpoints of a training run, pulled from MLflow by run id.

What to measure is selected first (the run, its checkpoints, the samples: `select_checkpoints`,
`sample_selection`), then each checkpoint is measured (`measure_samples`, `measure_network`, the
measures of lipdd.measures), then written (`Writer`: per-sample result files with their per-batch
means, summaries, MLflow metrics at step = epoch, a log). Under torchrun the ranks measure
contiguous blocks of batches and rank 0 writes what one process would. Listing a run's checkpoints,
joining the shard files of independent --skip jobs and exporting checkpoints are commands of
their own.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import config as configlib
from . import data as datalib
from . import distributed, files, names, runs, runtime, tracking
from .config import Config, ConfigError
from .measures import MEASURES, Network, per_sample
from .models import model_for


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


def seed_layout_dir(cfg: Config, run_cfg: Config) -> Path:
    """SAVE_DIR/NAME/MODEL/DATA/TRAINING_SETTING/seed-SEED, as the seed scripts wrote."""
    return (Path(cfg.save_dir) / cfg.name / run_cfg.model_name / run_cfg.data / run_cfg.training_setting
            / f"seed-{run_cfg.seed}")


def analysed_run(cfg: Config) -> tuple:
    """(client, run, the run's own Config, the output directory) of the run cfg names."""
    client = tracking.get_client(tracking.tracking_uri(cfg.tracking_uri), create=False)
    run = client.get_run(runs.trained(client, cfg))
    run_cfg = configlib.from_flat(run.data.params)
    return client, run, run_cfg, Path(cfg.stats.output_dir) if cfg.stats.output_dir else seed_layout_dir(cfg, run_cfg)


# --- measuring -------------------------------------------------------------------------------------

def measure_samples(model, loader: datalib.Loader, s: configlib.StatsConfig) -> dict[tuple, np.ndarray]:
    """{(measure, normalization or None): float64 values, one per sample of the loader's batches}
    of the selected per-sample measures, from one loaded checkpoint."""
    values: dict[tuple, list] = {}
    if not any(MEASURES[m].kind == "sample" for m in s.metric):
        return {}  # per-network measures only: no batch to go through
    bar = tqdm(loader, desc="batches", disable=not (distributed.is_rank0() and sys.stderr.isatty()))
    for x, y in bar:
        for key, v in per_sample(model, x, y, s.metric, s.normalization, s.target_logit_only, s.bigmem).items():
            values.setdefault(key, []).append(v.detach().double().cpu())
    return {k: torch.cat(v).numpy() for k, v in values.items()}


def measure_network(network: Network, selected: list[str]) -> dict[str, tuple[dict, dict]]:
    """{measure: (summary, details)} of the selected per-network measures."""
    return {name: MEASURES[name].fn(network) for name in selected if MEASURES[name].kind == "network"}


def gather_values(values: dict[tuple, np.ndarray]) -> dict[tuple, np.ndarray] | None:
    """On rank 0, every rank's values joined in sample order (ranks hold consecutive blocks of
    batches; a rank with no batch holds nothing); None on the others."""
    parts = distributed.gather(values)
    if parts is None:
        return None
    keys = dict.fromkeys(k for v in parts for k in v)
    return {k: np.concatenate([v[k] for v in parts if k in v]) for k in keys}


def summarize(values: np.ndarray, corrupted: np.ndarray) -> dict[str, float]:
    out = dict(mean=values.mean(), median=np.median(values), std=values.std())
    if corrupted.any():
        out["corrupted_mean"] = values[corrupted].mean()
    if (~corrupted).any():
        out["clean_mean"] = values[~corrupted].mean()
    return {k: float(v) for k, v in out.items()}


def compute_stats(cfg: Config) -> list[Path]:
    """Measure the run's chosen checkpoints as `cfg` says; returns the result files written.
    Under torchrun the ranks share the batches and rank 0 writes."""
    device = runtime.setup(cfg)
    with distributed.process_group(device):
        return _compute_stats(cfg, device)


def _compute_stats(cfg: Config, device: torch.device) -> list[Path]:
    s = cfg.stats
    client, run, run_cfg, out_dir = analysed_run(cfg)
    run_id = run.info.run_id
    available = tracking.list_checkpoints(client, run_id)
    chosen = select_checkpoints(cfg, available, int(run.data.tags.get("steps_per_epoch", 0)) or 1)
    from_start = [m for m in s.metric if "initial" in MEASURES[m].options]
    if from_start and (not available or available[0][0] != 0):
        raise ConfigError(f"stats.metric: {', '.join(from_start)} needs the initial network, and run {run_id} "
                          "has no checkpoint of epoch 0")
    prepared = distributed.in_turn(datalib.ensure_prepared, run_cfg, run.data.tags.get("dataset_hash"))
    if s.dataset_split not in prepared.splits:
        raise ConfigError(f"stats.dataset_split: {s.dataset_split!r} does not exist for this run; it has "
                          f"{sorted(prepared.splits)} (a 'val' split needs train_split and val_split)")
    split = prepared.splits[s.dataset_split]
    samples = split.take(sample_selection(cfg, len(split.labels)))
    loader = datalib.Loader.of(samples, prepared.meta, device, s.batch_size, shard="blocks")
    model = model_for(run_cfg, prepared.meta).to(device).eval()
    initial = cache(lambda: tracking.load_checkpoint(client, run_id, available[0][1], device)["model"])
    channels_first = prepared.meta["image_shape"][2:] + prepared.meta["image_shape"][:2]
    network = Network(model, initial, tuple(channels_first))
    write = distributed.rank0_only(Writer, cfg, client, run_id, run_cfg, samples, prepared.meta, out_dir)
    with write:
        for epoch, artifact in chosen:
            started = time.time()
            state = tracking.load_checkpoint(client, run_id, artifact, device)
            model.load_state_dict(state["model"])
            values = gather_values(measure_samples(model, loader, s))
            measured = measure_network(network, s.metric) if distributed.is_rank0() else None
            write.checkpoint(epoch, state["global_step"], values, measured, time.time() - started)
    return write.files() or []


class Writer:
    """Rank 0's part of `lipdd stats`: result files, summaries, MLflow metrics and the log."""

    def __init__(self, cfg: Config, client, run_id: str, run_cfg: Config, samples: datalib.Split, meta: dict,
                 out_dir: Path):
        s = cfg.stats
        self.cfg, self.client, self.run_id, self.samples, self.out_dir = cfg, client, run_id, samples, out_dir
        self.first_batch = s.skip // s.batch_size
        self.metadata = dict(run_id=run_id, model=run_cfg.model_name, dataset=run_cfg.data, split=s.dataset_split,
                             label_noise=run_cfg.label_noise, augmentation=run_cfg.augmentation, seed=run_cfg.seed,
                             label_seed=run_cfg.label_seed, data_split_seed=run_cfg.data_split_seed,
                             mc_sample_seed=s.mc_sample_seed, num_samples=len(samples.labels), skip=s.skip,
                             batch_size=s.batch_size, target_logit_only=s.target_logit_only,
                             dataset_hash=meta["content_hash"])
        # The pipeline's summary describes the pipeline's run; any other run's goes beside its results.
        self.summary_dir = Path(cfg.results_dir) / "stats" if run_id == runs.pipeline_run_id(cfg) else out_dir
        self.written, self.history, self.last = [], [], {}

    def __enter__(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # a log beside the results, as the seed kept one
        self.log = open(self.out_dir / f"stats-{self.first_batch}.log", "a")
        self.logger = tracking.MetricLogger(self.client, self.run_id)
        return self

    def __exit__(self, kind, *exc):
        self.log.close()
        if kind is None and self.history:
            files.write_json(self.summary_dir / "metrics.json",
                             {"run_id": self.run_id, "epoch": self.history[-1]["epoch"], **self.last})
            files.write_csv(self.summary_dir / "history.csv", self.history)

    def checkpoint(self, epoch: int, step: int, values: dict[tuple, np.ndarray], network: dict, seconds: float):
        s, split = self.cfg.stats, self.cfg.stats.dataset_split
        self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} run {self.run_id} epoch {epoch}: "
                       f"{len(self.samples.labels)} {split} samples from position {s.skip}, {seconds:.1f}s\n")
        row, batch_rows = {"epoch": epoch}, []
        starts = range(0, len(self.samples.labels), s.batch_size)
        for (measure, norm), sample_values in values.items():
            name = names.stat(measure, norm, s.target_logit_only)
            summary = summarize(sample_values, self.samples.corrupted)
            self.log_summary(epoch, {names.summary_key(split, name, k): summary[k]
                                     for k in names.LOGGED_SUMMARIES if k in summary})
            row.update({f"{name}_{k}": v for k, v in summary.items()})
            self.last[name] = summary
            batch_means = [float(sample_values[i:i + s.batch_size].mean()) for i in starts]
            batch_rows += [{"statistic": name, "batch": self.first_batch + b, "mean": m}
                           for b, m in enumerate(batch_means)]
            path = self.out_dir / names.result_file(name, split, epoch, self.first_batch, s.outname)
            self.write(path, {"stats": sample_values.tolist(), "batch_means": batch_means,
                              "sample_ids": self.samples.index.tolist(), "targets": self.samples.labels.tolist(),
                              "ground_truths": self.samples.clean_labels.tolist(),
                              "metadata": self.meta(epoch, step, measure, norm)}, f"mean {summary['mean']:.6g}")
        for measure, (summary, details) in network.items():
            self.log_summary(epoch, summary)
            row.update(summary)
            self.last[measure] = summary
            self.write(self.out_dir / names.network_result_file(measure, epoch),
                       {"summary": summary, **details, "metadata": self.meta(epoch, step, measure, None)}, summary)
        self.logger.flush()
        if batch_rows:  # the per-batch means of every statistic, as one table per checkpoint
            with tempfile.TemporaryDirectory() as tmp:
                artifact = Path(names.batch_means_artifact(split, epoch, self.first_batch))
                local = files.write_csv(Path(tmp) / artifact.name, batch_rows)
                self.client.log_artifact(self.run_id, str(local), str(artifact.parent))
        self.history.append(row)
        self.log.flush()

    def files(self) -> list[Path]:
        return self.written

    def log_summary(self, epoch: int, summary: dict[str, float]) -> None:
        # A recomputation (dvc repro -f, a re-run by hand) logs nothing the run already holds.
        first = next(iter(summary))
        if not self.logger.holds(first, epoch, summary[first]):
            self.logger.log_dict(summary, step=epoch)

    def meta(self, epoch: int, step: int, measure: str, normalization: str | None) -> dict:
        return {**self.metadata, "checkpoint_epoch": epoch, "checkpoint_step": step, "metric": measure,
                "normalization": normalization}

    def write(self, path: Path, content: dict, note) -> None:
        files.write_json(path, content)
        self.written.append(path)
        self.log.write(f"  {path.name}: {note}\n")


def list_checkpoints(cfg: Config) -> None:
    """The seed's `--checkpoint` with no value: the run's checkpoints, by ordinal."""
    client, run, _, _ = analysed_run(cfg)
    for i, (epoch, path) in enumerate(tracking.list_checkpoints(client, run.info.run_id)):
        print(f"{i}\tepoch {epoch}\t{path}")


def export_checkpoints(cfg: Config) -> Path:
    """Every checkpoint of the run in one checkpoints.zip, in the seed layout."""
    client, run, run_cfg, _ = analysed_run(cfg)
    path = seed_layout_dir(cfg, run_cfg) / "checkpoints.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run.info.run_id, "checkpoints", tmp))
        # Zip beside the target, then rename: a killed export never leaves a truncated archive.
        partial = shutil.make_archive(str(path.parent / f".checkpoints.{os.getpid()}"), "zip", local.parent,
                                      local.name)
    os.replace(partial, path)
    return path


def merge(cfg: Config) -> list[Path]:
    """`lipdd stats --merge`: join the shard files in the run's output directory."""
    return merge_shards(analysed_run(cfg)[3])


# Fields of a result file with one entry per sample (or per batch), in sample order.
PER_SAMPLE = ("stats", "batch_means", "sample_ids", "targets", "ground_truths")


def merge_shards(out_dir: Path) -> list[Path]:
    """Join every set of shard files OUT_NAME-BATCH_ID.json in `out_dir` (runs with --skip,
    e.g. one job per GPU) into the file one run over all their samples writes:
    OUT_NAME-<first BATCH_ID>.json, per-sample (and per-batch) lists concatenated, num_samples and skip
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
        merged = {k: [x for r, _ in shards for x in r[k]] for k in PER_SAMPLE if all(k in r for r, _ in shards)}
        merged["metadata"] = {**first, "num_samples": last["skip"] + last["num_samples"] - first["skip"]}
        path = files.write_json(out_dir / f"{outname}-{first['skip'] // first['batch_size']}.json", merged)
        for _, p in shards:
            if p != path:
                p.unlink()
        written.append(path)
    return written
