"""The upstream layout: where the upstream code (magamba/overparameterization, the paper's own
scripts) keeps a run's files, and how it names them, so that its commands, checkpoints and result
files work with lipdd unchanged. A run's directory is SAVE_DIR/NAME/MODEL/DATA/SETTING/
[noise-N-]seed-S; its stats files are named by `result_file`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config


def setting(cfg: Config) -> str:
    """The SETTING directory (upstream's core/utils.py log_additions): the model additions (dropout
    with its rate), -l1-/-l2- coefficients, augmentation, wd_ weight decay; else default."""
    parts = [
        f"dropout_{cfg.dropout}" if a == "dropout" and cfg.dropout else a
        for a in cfg.model_additions
    ]
    name = "-".join(parts)
    if cfg.l1_regularization:
        name += f"-l1-{cfg.l1_regularization:0.5f}"
    if cfg.l2_regularization:
        name += f"-l2-{cfg.l2_regularization:0.5f}"
    if cfg.augmentation:
        name += "-augmentation"
    if cfg.weight_decay:
        name += f"-wd_{cfg.weight_decay}"
    return name.strip("-") or "default"


def run_subdir(cfg: Config) -> str:
    """MODEL/DATA/SETTING/[noise-N-]seed-S of the run `cfg` describes."""
    noise = f"noise-{cfg.label_noise:.4f}-" if cfg.label_noise != 0 else ""
    return f"{cfg.model_name}/{cfg.data}/{setting(cfg)}/{noise}seed-{cfg.seed}"


def run_dir(cfg: Config, run_cfg: Config | None = None) -> Path:
    """SAVE_DIR/NAME (cfg's) / the directory of the run `run_cfg` (default: cfg's own)."""
    return Path(cfg.save_dir) / cfg.name / run_subdir(run_cfg or cfg)


def result_file(
    measure: str,
    normalization: str | None,
    target_logit_only: bool,
    split: str | None,
    checkpoint: int,
    uid: int | None = None,
    outname: str | None = None,
    random_dataset: str | None = None,
    probe: str | None = None,
) -> str:
    """Upstream's result file name,
    [OUTNAME-]METRIC[-target_only][-random_KIND]-SPLIT-checkpoint-KEY[-id-UID].json
    (KEY: the checkpoint as --checkpoint named it; UID: skip / batch_size, when --skip was given),
    with two additions: a normalization other than none follows METRIC, because one lipdd call
    computes several where upstream's computed one, and a probe set follows SPLIT as -probe_NAME.
    Per-network measures have no SPLIT."""
    name = f"{outname}-{measure}" if outname else measure
    if normalization not in (None, "none"):
        name += f"-{normalization}"
    if target_logit_only and normalization != "crossentropy":
        name += "-target_only"
    if random_dataset:
        name += f"-random_{random_dataset}"
    if split:
        name += f"-{split}"
    if probe:
        name += f"-probe_{probe}"
    name += f"-checkpoint-{checkpoint}"
    return name + (f"-id-{uid}" if uid is not None else "") + ".json"


def shard_of(filename: str) -> tuple[str, int] | None:
    """(the name without -id-UID, UID) of a result file of a --skip run, else None."""
    stem, sep, uid = filename.removesuffix(".json").rpartition("-id-")
    return (stem, int(uid)) if sep and uid.isdigit() else None
