"""The upstream scripts' files on disk, both ways: a run's directory,
SAVE_DIR/NAME/MODEL/DATA/SETTING/ [noise-N-]seed-S, and its checkpoints there, `checkpoints.zip`
(or, raw, a `checkpoints/` folder) of `checkpoint_STEP.pt` files (STEP: the global step) holding the
network under "model".

`export_checkpoints` writes a lipdd run's checkpoints so that upstream's compute_stats.py loads them
as they are; `import_checkpoints` turns an upstream run's directory into a FINISHED MLflow run with
its params, checkpoints and an evaluation per checkpoint, so lipdd's stats, report and UI work on
it.
"""

from __future__ import annotations

import io
import math
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from . import data as datalib
from . import files, runs, runtime, tracking, upstream
from .config import Config
from .errors import ConfigError
from .models import model_for
from .train import evaluation

CHECKPOINT = re.compile(r"(?:.*/)?checkpoint_(\d+)\.pt")


def _steps_per_epoch(run) -> int:
    steps = int(run.data.tags.get("steps_per_epoch", 0))
    if not steps:
        raise ConfigError(
            f"run {run.info.run_id} has no steps_per_epoch tag, so its checkpoints' global steps "
            "are unknown; it was not trained by lipdd"
        )
    return steps


def export_checkpoints(cfg: Config) -> Path:
    """Every checkpoint of the run `lipdd stats` would analyse, as upstream's train.py leaves
    them."""
    client, run, run_cfg, _ = runs.analysed_run(cfg)
    steps = _steps_per_epoch(run)
    name = "checkpoints" if cfg.raw_checkpoints else "checkpoints.zip"
    target = upstream.run_dir(cfg, run_cfg) / name
    with files.replacing(target) as new, tempfile.TemporaryDirectory(dir=new.parent) as tmp:
        folder = new if cfg.raw_checkpoints else Path(tmp) / "checkpoints"
        folder.mkdir()
        for epoch, artifact in tracking.list_checkpoints(client, run.info.run_id):
            state = tracking.load_checkpoint(client, run.info.run_id, artifact)
            step = state["global_step"]
            trainer = {
                "epoch_length": steps,
                "max_epochs": run_cfg.epochs,
                "iteration": step,
                "epoch": epoch,
            }
            torch.save(
                {
                    "model": state["model"],
                    "optimizer": state.get("optimizer", {}),
                    "trainer": trainer,
                },
                folder / f"checkpoint_{step}.pt",
            )
        if not cfg.raw_checkpoints:  # files at the archive's root, as make_archive puts them
            Path(shutil.make_archive(str(new), "zip", folder)).rename(new)
    return target


def _seed_checkpoints(folder: Path) -> list[tuple[int, bytes]]:
    """(global step, file bytes) of the upstream run's checkpoints, by step."""
    zipped, raw = folder / "checkpoints.zip", folder / "checkpoints"
    found = []
    if zipped.is_file():
        with zipfile.ZipFile(zipped) as z:
            found = [
                (int(m.group(1)), z.read(i))
                for i in z.infolist()
                if (m := CHECKPOINT.fullmatch(i.filename))
            ]
    elif raw.is_dir():
        found = [
            (int(m.group(1)), p.read_bytes())
            for p in raw.iterdir()
            if (m := CHECKPOINT.fullmatch(p.name))
        ]
    if not found:
        raise ConfigError(
            f"import: no checkpoint_STEP.pt in {zipped} or {raw}; the flags must name the "
            "upstream run as its train.py was given them (save-dir, name, model, data, label "
            "noise, seed, ...)"
        )
    return sorted(found)


def upstream_weights(state: dict, model: torch.nn.Module) -> dict:
    """An upstream checkpoint's network as lipdd's model holds it: upstream's train.py keeps an
    unused stem batch norm in resnets without the batch_norm addition (its compute_stats.py builds
    none), dropped."""
    keys = set(model.state_dict())
    return {k: v for k, v in state.items() if k in keys or not k.startswith("bn1.")}


def import_checkpoints(cfg: Config) -> str:
    """An upstream run's directory as a new FINISHED MLflow run of experiment NAME; returns its
    id."""
    if cfg.label_noise and cfg.label_seed is None:
        raise ConfigError(
            "label_seed: upstream drew this run's noisy labels from fresh randomness unless given "
            "--label-seed; pass the one it was trained with, or its labels cannot be rebuilt"
        )
    device = runtime.setup(cfg)
    checkpoints = _seed_checkpoints(upstream.run_dir(cfg))
    prepared = datalib.ensure_prepared(cfg)
    steps = math.ceil(prepared.meta["splits"]["train"] / cfg.batch_size)
    bad = [s for s, _ in checkpoints if s % steps]
    if bad:
        raise ConfigError(
            f"import: checkpoint_{bad[0]}.pt is no epoch's end at {steps} steps an epoch "
            f"(train_split {prepared.meta['splits']['train']}, batch_size {cfg.batch_size}); pass "
            "the run's batch size"
        )
    model = model_for(cfg, prepared.meta).to(device).eval()
    loaders = {
        split: datalib.Loader.of(data, prepared.meta, device, 1024)
        for split, data in prepared.splits.items()
    }
    client = tracking.get_client(tracking.tracking_uri(cfg.tracking_uri))
    run_id = runs.start(client, cfg, prepared.meta["content_hash"], steps)
    with runs.ending(client, run_id):
        client.set_tag(run_id, "imported_from", str(upstream.run_dir(cfg).resolve()))
        with tracking.MetricLogger(client, run_id) as logger:
            for step, raw in checkpoints:
                epoch = step // steps
                try:
                    state = torch.load(io.BytesIO(raw), map_location=device, weights_only=True)
                    model.load_state_dict(upstream_weights(state["model"], model))
                except Exception as e:
                    raise ConfigError(
                        f"import: checkpoint_{step}.pt does not load into {cfg.model_name} "
                        f"({str(e).strip().splitlines()[0][:300]})"
                    ) from None
                tracking.log_checkpoint(
                    client,
                    run_id,
                    dict(
                        model=model.state_dict(), epoch=epoch, global_step=step, config=cfg.flat()
                    ),
                    epoch,
                )
                logger.log_dict(evaluation(model, loaders), step=epoch)
        client.set_tag(run_id, "epochs_trained", str(checkpoints[-1][0] // steps))
    return run_id
