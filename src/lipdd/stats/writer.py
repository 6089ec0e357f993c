"""Rank 0's part of `lipdd stats`: each checkpoint's result files in the upstream layout, their
summaries as MLflow metrics at step = epoch and as the stage's metrics.json and history.csv, the
per-batch means as an MLflow artifact, and a log beside the results."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import files, names, runs, tracking, upstream
from ..config import Config
from ..data import Split
from ..measures import MEASURES

log = logging.getLogger(__name__)


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


class Writer:
    """Writes what each checkpoint measured (`checkpoint`); on a clean exit, the summaries."""

    def __init__(
        self, cfg: Config, client, run_id: str, run_cfg: Config, samples: Split, meta: dict,
        out_dir: Path,
    ):  # fmt: skip
        s = cfg.stats
        self.cfg, self.client, self.run_id, self.samples = cfg, client, run_id, samples
        self.out_dir, self.random_dataset = out_dir, run_cfg.random_dataset
        self.first_batch = (s.skip or 0) // s.batch_size
        # upstream names shards only when --skip is given
        self.uid = None if s.skip is None else self.first_batch
        # Upstream's metadata keys, then lipdd's own.
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
        # The pipeline's summary describes the pipeline's run; any other run's goes beside its
        # results.
        pipeline = run_id == runs.pipeline_run_id(cfg)
        self.summary_dir = Path(cfg.results_dir) / "stats" if pipeline else out_dir
        self.written, self.history, self.last = [], [], {}

    def __enter__(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # a log beside the results, as upstream kept one
        self.log = open(self.out_dir / f"stats-{self.first_batch}.log", "a")
        self.logger = tracking.MetricLogger(self.client, self.run_id)
        return self

    def __exit__(self, kind, *exc):
        self.log.close()
        if kind is None and self.history:
            last = {"run_id": self.run_id, "epoch": self.history[-1]["epoch"], **self.last}
            files.write_json(self.summary_dir / "metrics.json", last)
            files.write_csv(self.summary_dir / "history.csv", self.history)

    def checkpoint(
        self, key: int, epoch: int, step: int, values: dict[tuple, np.ndarray], network: dict,
        probed: dict, seconds: float,
    ):  # fmt: skip
        """values: {(measure, normalization): per-sample values}; network: {measure: (summary,
        details)}; probed: {probe: (its points, {(measure, normalization): values})}."""
        s = self.cfg.stats
        line = (
            f"run {self.run_id} checkpoint {key} (epoch {epoch}): {len(self.samples.labels)} "
            f"{s.dataset_split} samples from position {s.skip or 0}, {seconds:.1f}s"
        )
        log.info(line)
        self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
        self.row, self.at = {"epoch": epoch}, (key, epoch, step)
        batch_rows = [r for (m, n), v in values.items() for r in self.sample_measure(m, n, v)]
        for measure, (summary, details) in network.items():
            self.network_measure(measure, summary, details, values)
        for probe, (points, probe_values) in probed.items():
            for (measure, norm), point_values in probe_values.items():
                self.probe_measure(probe, points, measure, norm, point_values)
        self.logger.flush()
        if batch_rows:  # the per-batch means of every statistic, as one table per checkpoint
            with tempfile.TemporaryDirectory() as tmp:
                artifact = Path(
                    names.batch_means_artifact(s.dataset_split, epoch, self.first_batch)
                )
                local = files.write_csv(Path(tmp) / artifact.name, batch_rows)
                self.client.log_artifact(self.run_id, str(local), str(artifact.parent))
        self.history.append(self.row)
        self.log.flush()

    def sample_measure(self, measure: str, norm: str | None, values: np.ndarray) -> list[dict]:
        """One statistic on the split's samples; returns its per-batch means as table rows."""
        s, epoch = self.cfg.stats, self.at[1]
        name = names.stat(measure, norm, s.target_logit_only)
        corrupted = self.samples.corrupted
        summary = summarize(values, {"clean": ~corrupted, "corrupted": corrupted})
        logged = MEASURES[measure].logged
        self.log_summary(
            epoch,
            {
                names.summary_key(s.dataset_split, name, k): summary[k]
                for k in logged
                if k in summary
            },
        )
        self.row.update({f"{name}_{k}": v for k, v in summary.items()})
        self.last[name] = summary
        starts = range(0, len(values), s.batch_size)
        batch_means = [float(values[i : i + s.batch_size].mean()) for i in starts]
        # upstream nests each sample's value in a list of its own
        content = {
            "stats": values[:, None].tolist(),
            "batch_means": batch_means,
            "sample_ids": self.samples.index.tolist(),
            "targets": self.samples.labels.tolist(),
            "ground_truths": self.samples.clean_labels.tolist(),
            "metadata": self.meta(measure, norm),
        }
        self.write(self.result(measure, norm, s.dataset_split, self.uid), content,
                   f"mean {summary['mean']:.6g}")  # fmt: skip
        return [
            {"statistic": name, "batch": self.first_batch + b, "mean": m}
            for b, m in enumerate(batch_means)
        ]

    def network_measure(self, measure: str, summary: dict, details: dict, values: dict) -> None:
        # a relation to the per-sample values needs all of them: a --skip shard has its own
        if (relate := MEASURES[measure].relate) and self.uid is None:
            summary.update(relate(summary, values, self.cfg.stats))
        self.log_summary(self.at[1], summary)
        self.row.update(summary)
        self.last[measure] = summary
        # which samples the job measured says nothing of the network: shards and one process
        # write the same file
        meta = {k: v for k, v in self.meta(measure, None).items() if k not in ("nsamples", "skip")}
        content = {"summary": summary, **details, "metadata": meta}
        self.write(self.result(measure, None, None, None), content, summary)

    def probe_measure(self, probe: str, points, measure: str, norm: str | None, values) -> None:
        """One statistic on one probe set; with a reduction (ProbeSet.reduce), summarised per
        training point."""
        s = self.cfg.stats
        name = names.stat(measure, norm, s.target_logit_only)
        reduced = points.reduce(values) if points.reduce else {"": values}
        (_, first), *others = reduced.items()
        summary = summarize(first, points.groups, dict(others))
        logged = {
            names.probe_key(probe, name, k): summary[k]
            for k in MEASURES[measure].probe_logged
            if k in summary
        }
        if logged:
            self.log_summary(self.at[1], logged)
        self.row.update({names.probe_key(probe, name, k): v for k, v in summary.items()})
        self.last[f"probe_{probe}_{name}"] = summary
        per_point = {}
        if points.reduce:
            per_point = {"per_training_point": first.tolist()}
            per_point.update({f"per_training_point_{r}": v.tolist() for r, v in others})
        meta = {
            **self.meta(measure, norm),
            "sampling-strategy": probe,
            "nsamples": len(points.targets),
        }
        content = {
            "summary": summary,
            "stats": values[:, None].tolist(),
            **per_point,
            "targets": points.targets.tolist(),
            "provenance": points.provenance,
            "metadata": meta,
        }
        self.write(self.result(measure, norm, s.dataset_split, None, probe), content,
                   f"mean {summary['mean']:.6g}")  # fmt: skip

    def files(self) -> list[Path]:
        return self.written

    def log_summary(self, epoch: int, summary: dict[str, float]) -> None:
        # A recomputation (dvc repro -f, a re-run by hand) logs nothing the run already holds.
        first = next(iter(summary))
        if not self.logger.holds(first, epoch, summary[first]):
            self.logger.log_dict(summary, step=epoch)

    def result(self, measure, norm, split, uid, probe=None) -> Path:
        """The path of one result file of the checkpoint being written (a per-network measure's
        has no split)."""
        s = self.cfg.stats
        target_only = s.target_logit_only and split is not None
        name = upstream.result_file(measure, norm, target_only, split, self.at[0], uid, s.outname,
                                    self.random_dataset, probe)  # fmt: skip
        return self.out_dir / name

    def meta(self, measure: str, normalization: str | None) -> dict:
        key, epoch, step = self.at
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
