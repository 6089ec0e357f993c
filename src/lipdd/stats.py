"""The stats stage: measure chosen checkpoints of a training run, pulled from MLflow by run id.

What to measure is selected first (the run, its checkpoints, the samples: `select_checkpoints`,
`sample_selection`), then each checkpoint is measured (`measure_samples`, `measure_network`,
`measure_probes`: the measures of lipdd.measures, on the split and on the probe sets of
lipdd.probes), then written (`Writer`: per-sample result files with their per-batch
means, summaries, MLflow metrics at step = epoch, a log). Under torchrun the ranks measure
contiguous blocks of batches and rank 0 writes what one process would. Listing a run's checkpoints,
and joining the shard files of independent --skip jobs are commands of their own.
"""

from __future__ import annotations

import json
import logging
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
from . import distributed, files, names, runs, runtime, seedlayout, tracking
from .config import Config, ConfigError
from .measures import MEASURES, Network, per_sample
from .models import model_for
from .probes import PROBES, Points, ProbeSet

log = logging.getLogger(__name__)


def select_checkpoints(cfg: Config, available: list[tuple[int, str]], steps_per_epoch: int):
    """[(key, epoch, artifact)] of the checkpoints --checkpoint names, keyed as the seed keys them:
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
    """Positions in the split, as the seed's sampler takes them: in order, from position skip on,
    num_samples of them (default: the rest of the split)."""
    s = cfg.stats
    start = s.skip or 0
    n = n_split - start if s.num_samples is None else s.num_samples
    if n <= 0 or start + n > n_split:
        raise ConfigError(
            f"stats.num_samples: {s.num_samples or n} samples from position {start} are more than the "
            f"{n_split} samples of split {s.dataset_split!r}"
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


def analysed_run(cfg: Config) -> tuple:
    """(client, run, the run's own Config, the output directory) of the run cfg names."""
    client = tracking.get_client(tracking.tracking_uri(cfg.tracking_uri), create=False)
    run = client.get_run(runs.trained(client, cfg))
    run_cfg = configlib.from_flat(run.data.params)
    return (
        client,
        run,
        run_cfg,
        Path(cfg.stats.output_dir) if cfg.stats.output_dir else seedlayout.run_dir(cfg, run_cfg),
    )


# --- measuring -------------------------------------------------------------------------------------


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


def measure_network(network: Network, selected: list[str]) -> dict[str, tuple[dict, dict]]:
    """{measure: (summary, details)} of the selected per-network measures."""
    return {
        name: MEASURES[name].fn(network) for name in selected if MEASURES[name].kind == "network"
    }


def gather_values(values: dict[tuple, np.ndarray]) -> dict[tuple, np.ndarray] | None:
    """On rank 0, every rank's values joined in sample order (ranks hold consecutive blocks of
    batches; a rank with no batch holds nothing); None on the others."""
    parts = distributed.gather(values)
    if parts is None:
        return None
    keys = dict.fromkeys(k for v in parts for k in v)
    return {k: np.concatenate([v[k] for v in parts if k in v]) for k in keys}


def summarize(
    values: np.ndarray, groups: dict[str, np.ndarray], others: dict[str, np.ndarray] | None = None
) -> dict:
    """mean, median, std, max, 99th percentile; the mean of each group (a mask) that has values;
    the mean of each other reduction of the same values."""
    out = dict(
        mean=values.mean(),
        median=np.median(values),
        std=values.std(),
        max=values.max(),
        p99=np.percentile(values, 99),
    )
    out.update({f"{g}_mean": values[mask].mean() for g, mask in groups.items() if mask.any()})
    out.update({f"{r}_mean": v.mean() for r, v in (others or {}).items()})
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
            measured = measure_network(network, s.metric) if distributed.is_rank0() else None
            probed = measure_probes(model, probe_points(), s) if distributed.is_rank0() else None
            write.checkpoint(
                key, epoch, state["global_step"], values, measured, probed, time.time() - started
            )
    return write.files() or []


def refuse_foreign_results(out_dir: Path, run_id: str) -> None:
    """One directory, one run's results. The seed layout names a run's directory by the parameters
    the seed's scripts name runs by, so runs that differ only in others (a learning rate, epochs)
    share one, and one's files would overwrite the other's."""
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


class Writer:
    """Rank 0's part of `lipdd stats`: result files, summaries, MLflow metrics and the log."""

    def __init__(
        self,
        cfg: Config,
        client,
        run_id: str,
        run_cfg: Config,
        samples: datalib.Split,
        meta: dict,
        out_dir: Path,
    ):
        s = cfg.stats
        self.cfg, self.client, self.run_id, self.samples, self.out_dir = (
            cfg,
            client,
            run_id,
            samples,
            out_dir,
        )
        self.first_batch = (s.skip or 0) // s.batch_size
        self.uid = (
            None if s.skip is None else self.first_batch
        )  # the seed names shards only when --skip is given
        self.random_dataset = run_cfg.random_dataset
        # The seed's metadata keys, then lipdd's own.
        self.metadata = {
            "model": run_cfg.model_name,
            "dataset": run_cfg.data,
            "split": s.dataset_split,
            "seed": run_cfg.seed,
            "label-noise": run_cfg.label_noise,
            "augmentation": run_cfg.augmentation,
            "nsamples": len(samples.labels),
            "label-noise-seed": run_cfg.label_seed,
            "data-split-seed": run_cfg.data_split_seed,
            "mc-sample-seed": s.mc_sample_seed,
            "sampling-strategy": "none",
            "run_id": run_id,
            "skip": s.skip or 0,
            "batch_size": s.batch_size,
            "target_logit_only": s.target_logit_only,
            "dataset_hash": meta["content_hash"],
        }
        # The pipeline's summary describes the pipeline's run; any other run's goes beside its results.
        self.summary_dir = (
            Path(cfg.results_dir) / "stats" if run_id == runs.pipeline_run_id(cfg) else out_dir
        )
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
            files.write_json(
                self.summary_dir / "metrics.json",
                {"run_id": self.run_id, "epoch": self.history[-1]["epoch"], **self.last},
            )
            files.write_csv(self.summary_dir / "history.csv", self.history)

    def checkpoint(
        self,
        key: int,
        epoch: int,
        step: int,
        values: dict[tuple, np.ndarray],
        network: dict,
        probed: dict,
        seconds: float,
    ):
        s, split = self.cfg.stats, self.cfg.stats.dataset_split
        line = (
            f"run {self.run_id} checkpoint {key} (epoch {epoch}): {len(self.samples.labels)} {split} samples "
            f"from position {s.skip or 0}, {seconds:.1f}s"
        )
        log.info(line)
        self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        row, batch_rows = {"epoch": epoch}, []
        starts = range(0, len(self.samples.labels), s.batch_size)
        for (measure, norm), sample_values in values.items():
            name = names.stat(measure, norm, s.target_logit_only)
            corrupted = self.samples.corrupted
            summary = summarize(sample_values, {"clean": ~corrupted, "corrupted": corrupted})
            self.log_summary(
                epoch,
                {
                    names.summary_key(split, name, k): summary[k]
                    for k in names.logged_summaries(measure)
                    if k in summary
                },
            )
            row.update({f"{name}_{k}": v for k, v in summary.items()})
            self.last[name] = summary
            batch_means = [float(sample_values[i : i + s.batch_size].mean()) for i in starts]
            batch_rows += [
                {"statistic": name, "batch": self.first_batch + b, "mean": m}
                for b, m in enumerate(batch_means)
            ]
            path = self.out_dir / names.result_file(
                measure,
                norm,
                s.target_logit_only,
                split,
                key,
                self.uid,
                s.outname,
                self.random_dataset,
            )
            # the seed nests each sample's value in a list of its own
            self.write(
                path,
                {
                    "stats": sample_values[:, None].tolist(),
                    "batch_means": batch_means,
                    "sample_ids": self.samples.index.tolist(),
                    "targets": self.samples.labels.tolist(),
                    "ground_truths": self.samples.clean_labels.tolist(),
                    "metadata": self.meta(key, epoch, step, measure, norm),
                },
                f"mean {summary['mean']:.6g}",
            )
        if (
            "lipschitz_upper_bound" in network and not s.target_logit_only
        ):  # how far apart the two bounds are
            bound = network["lipschitz_upper_bound"][0]
            for norm in ("none", "softmax"):
                if (names.OPNORM, norm) in values:
                    ratio = names.bound_ratio(norm)
                    bound[ratio] = bound[ratio.removesuffix("_over_max")] / float(
                        values[names.OPNORM, norm].max()
                    )
        for measure, (summary, details) in network.items():
            self.log_summary(epoch, summary)
            row.update(summary)
            self.last[measure] = summary
            path = self.out_dir / names.result_file(
                measure, None, False, None, key, None, s.outname, self.random_dataset
            )
            self.write(
                path,
                {
                    "summary": summary,
                    **details,
                    "metadata": self.meta(key, epoch, step, measure, None),
                },
                summary,
            )
        for probe, (points, probe_values) in probed.items():
            for (measure, norm), point_values in probe_values.items():
                name = names.stat(measure, norm, s.target_logit_only)
                (_, first), *others = (
                    points.reduce(point_values) if points.reduce else {"": point_values}
                ).items()
                summary = summarize(first, points.groups, dict(others))
                logged = {
                    names.probe_key(probe, name, k): summary[k]
                    for k in names.logged_probe_summaries(measure)
                    if k in summary
                }
                if logged:
                    self.log_summary(epoch, logged)
                row.update({names.probe_key(probe, name, k): v for k, v in summary.items()})
                self.last[f"probe_{probe}_{name}"] = summary
                path = self.out_dir / names.result_file(
                    measure,
                    norm,
                    s.target_logit_only,
                    split,
                    key,
                    None,
                    s.outname,
                    self.random_dataset,
                    probe,
                )
                meta = {
                    **self.meta(key, epoch, step, measure, norm),
                    "sampling-strategy": probe,
                    "nsamples": len(points.targets),
                }
                self.write(
                    path,
                    {
                        "summary": summary,
                        "stats": point_values[:, None].tolist(),
                        **(
                            {
                                "per_training_point": first.tolist(),
                                **{f"per_training_point_{r}": v.tolist() for r, v in others},
                            }
                            if points.reduce
                            else {}
                        ),
                        "targets": points.targets.tolist(),
                        "provenance": points.provenance,
                        "metadata": meta,
                    },
                    f"mean {summary['mean']:.6g}",
                )
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

    def meta(
        self, key: int, epoch: int, step: int, measure: str, normalization: str | None
    ) -> dict:
        return {
            **self.metadata,
            "checkpoint": key,
            "metric": measure,
            "normalization": None if normalization == "none" else normalization,
            "checkpoint_epoch": epoch,
            "checkpoint_step": step,
        }

    def write(self, path: Path, content: dict, note) -> None:
        files.write_json(path, content)
        self.written.append(path)
        self.log.write(f"  {path.name}: {note}\n")


def load_weights(model, state_dict: dict, run_id: str, artifact: str) -> None:
    """Load a checkpoint's weights, or say in one line why they do not fit the model."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first = next(iter(state_dict), "")
        raise ConfigError(
            f"checkpoint {artifact} of run {run_id} does not fit the network lipdd builds for it "
            f"(first parameter {first!r}; networks saved before lipdd took the seed's parameter names "
            f"cannot be read: retrain the run): {str(e).splitlines()[0]}"
        ) from None


def list_checkpoints(cfg: Config) -> None:
    """The seed's `--checkpoint` with no value: the run's checkpoints, by ordinal, with the global
    step the seed lists them by."""
    client, run, _, _ = analysed_run(cfg)
    steps = int(run.data.tags.get("steps_per_epoch", 0))
    for i, (epoch, path) in enumerate(tracking.list_checkpoints(client, run.info.run_id)):
        print(f"{i}\tstep {epoch * steps}\tepoch {epoch}\t{path}")


def merge(cfg: Config) -> list[Path]:
    """`lipdd stats --merge`: join the shard files in the run's output directory."""
    return merge_shards(analysed_run(cfg)[3])


# Fields of a result file with one entry per sample (or per batch), in sample order.
PER_SAMPLE = ("stats", "batch_means", "sample_ids", "targets", "ground_truths")


def merge_shards(out_dir: Path) -> list[Path]:
    """Join every set of shard files NAME-id-UID.json in `out_dir` (runs with --skip, e.g. one job
    per GPU) into the file one run over all their samples writes: NAME.json when the first shard
    starts at sample 0, else NAME-id-<its UID>.json; per-sample (and per-batch) lists concatenated,
    nsamples updated. The merged shards are removed; a NAME with one shard is left as it is.
    Returns the merged files."""
    sets: dict[str, list[Path]] = {}
    for path in sorted(out_dir.glob("*-id-*.json")):
        if shard := names.shard_of(path.name):
            sets.setdefault(shard[0], []).append(path)
    if not sets and not any(out_dir.glob("*-checkpoint-*.json")):
        raise ConfigError(f"stats.merge: no result files in {out_dir}")
    written = []
    for stem, paths in sets.items():
        shards = sorted(
            ((json.loads(p.read_text()), p) for p in paths), key=lambda r: r[0]["metadata"]["skip"]
        )
        if len(shards) == 1:
            continue
        first, last = shards[0][0]["metadata"], shards[-1][0]["metadata"]
        for (a, pa), (b, pb) in zip(shards, shards[1:]):
            ma, mb = a["metadata"], b["metadata"]
            differ = sorted(
                k
                for k in ma.keys() | mb.keys()
                if k not in ("nsamples", "skip") and ma.get(k) != mb.get(k)
            )
            if differ:
                k = differ[0]
                raise ConfigError(
                    f"stats.merge: {pa.name} and {pb.name} differ in {k} ({ma.get(k)!r} vs "
                    f"{mb.get(k)!r}); they are not shards of one result"
                )
            end = ma["skip"] + ma["nsamples"]
            if end != mb["skip"]:
                raise ConfigError(
                    f"stats.merge: {pa.name} holds samples {ma['skip']}..{end - 1} but {pb.name} starts "
                    f"at {mb['skip']}; shards must be contiguous and must not overlap (each job: "
                    "--skip=START --num-samples=COUNT of its own range)"
                )
        merged = {
            k: [x for r, _ in shards for x in r[k]]
            for k in PER_SAMPLE
            if all(k in r for r, _ in shards)
        }
        merged["metadata"] = {**first, "nsamples": last["skip"] + last["nsamples"] - first["skip"]}
        uid = first["skip"] // first["batch_size"]
        path = files.write_json(
            out_dir / (f"{stem}-id-{uid}.json" if uid else f"{stem}.json"), merged
        )
        for _, p in shards:
            if p != path:
                p.unlink()
        written.append(path)
    return written
