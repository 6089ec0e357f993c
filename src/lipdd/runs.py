"""A training run's life in MLflow: which runs are the same training, starting one, finding the one
to resume or to analyse, and ending it. The parameters that tell runs apart are the config fields'
roles (config.ROLES): this module is their one reader."""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

from mlflow.entities import RunTag

from . import config as configlib
from . import tracking, upstream
from .config import ROLE, Config
from .data import draw_label_seed
from .errors import ConfigError, TrackingUnavailable

KIND = "lipdd.kind"  # tag of report runs, so nothing takes a report for a training
# A report draws the runs of one setting (its title) against its axes, averaging over seeds.
REPORT_SETTING = ("data", "model", "label_noise")
REPORT_AXES = ("width", "seed")
MAX_RUNS = 50_000  # MLflow's cap on one search, far above any sweep here: no paging needed


def get_run(client, run_id: str, flag: str):
    """The run `run_id` names, or one line saying it is not in the store."""
    try:
        return client.get_run(run_id)
    except Exception:
        raise ConfigError(
            f"{flag}: {run_id!r} is not a run in the store {client.tracking_uri}"
        ) from None


def what_trains(params: dict[str, str]) -> dict[str, str]:
    """A run's params without those that only say where it ran (unknown keys stay: they count)."""
    return {k: v for k, v in params.items() if ROLE.get(k) != "place"}


def differing_param(params: dict[str, str], cfg: Config) -> str | None:
    """The first parameter in which a run's params differ from cfg's training, if any (an unset
    label_seed matches any)."""
    for key, value in cfg.params("identity", "training").items():
        if params.get(key) != str(value) and not (key == "label_seed" and value is None):
            return key
    return None


def identity(cfg: Config) -> dict[str, str]:
    """cfg's identity params as logged (str(value)); an unset label_seed names no value (upstream
    drew a fresh one; lipdd records the one it drew), so it matches any run's."""
    return {
        k: str(v)
        for k, v in cfg.params("identity").items()
        if not (k == "label_seed" and v is None)
    }


def search(client, cfg: Config, where: str = "") -> list:
    """Runs of cfg's experiment whose identity params (upstream's flags) are cfg's, newest first.
    Params are logged as str(value), so str() of the resolved config matches them exactly."""
    exp = client.get_experiment_by_name(cfg.name)
    if exp is None:
        return []
    query = [f"params.{k} = '{v}'" for k, v in identity(cfg).items()] + ([where] if where else [])
    return client.search_runs(
        [exp.experiment_id],
        " and ".join(query),
        max_results=MAX_RUNS,
        order_by=["attributes.start_time DESC"],
    )


# --- training: start, or continue an interrupted run -------------------------------------------


def git(*args: str) -> subprocess.CompletedProcess | None:
    """git in the directory the command runs in: a queued DVC experiment's own copy of the
    workspace, with the experiment's parameters, not the workspace it reports to."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None


def git_output(*args: str) -> str | None:
    out = git(*args)
    return (out.stdout.strip() or None) if out and out.returncode == 0 else None


def git_commit() -> str | None:
    return git_output("rev-parse", "HEAD")


def source_tags() -> dict[str, str | None]:
    """Where a training comes from: MLflow's own source tags (the UI's Source, Version and
    Created by columns), the DVC experiment (`workspace` outside one: `dvc repro`, `lipdd
    train`), the commit it is based on, and whether params.yaml differs from that commit (a DVC
    experiment's own changes, or edits not committed)."""
    # A queued experiment's copy has a commit of DVC's own checked out; it names the real one.
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or git_commit()
    diff = git("diff", "--quiet", commit, "--", ":/params.yaml") if commit else None
    remote = git_output("remote", "get-url", "origin")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = None
    return {
        "mlflow.source.name": "lipdd train",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": user,
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
        "mlflow.source.git.branch": git_output(
            "symbolic-ref", "--short", "-q", "HEAD"
        ),  # none when detached
        "mlflow.source.git.repoURL": tracking.without_credentials(remote) if remote else None,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
        "dvc_exp_baseline_rev": commit,
        "params_differ_from_commit": {0: "false", 1: "true"}.get(diff.returncode) if diff else None,
    }


def owner_tags() -> dict[str, str]:
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def process_alive(run) -> bool:
    """Whether the process that owns a RUNNING run may still exist. Only its own host can
    tell; a run of another host counts as alive, one without owner tags as dead."""
    host, pid = run.data.tags.get("host"), run.data.tags.get("pid", "")
    if host != socket.gethostname() or not pid.isdigit():
        return host is not None and host != socket.gethostname()
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start(client, cfg: Config, dataset_hash: str, steps_per_epoch: int) -> str:
    exp_id = tracking.experiment_id(client, cfg.name)
    tags = {
        **source_tags(),
        "dataset_hash": dataset_hash,
        "steps_per_epoch": steps_per_epoch,
        **owner_tags(),
    }
    run = client.create_run(
        exp_id, run_name=cfg.run_name(), tags={k: str(v) for k, v in tags.items() if v is not None}
    )
    try:
        tracking.log_params(client, run.info.run_id, cfg.flat())
        tracking.log_dataset(client, run.info.run_id, cfg, dataset_hash)
    except BaseException:  # no run left RUNNING by a training that never started
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    return run.info.run_id


def interrupted(client, cfg: Config) -> str | None:
    """The latest run of this exact training that was interrupted (KILLED, FAILED but not
    diverged, or RUNNING with its process gone) and holds a checkpoint: started again with
    the same parameters, a training continues it rather than starting over."""
    for run in search(client, cfg, "attributes.status != 'FINISHED'"):
        if (
            differing_param(run.data.params, cfg) is None
            and "diverged" not in run.data.tags
            and not (run.info.status == "RUNNING" and process_alive(run))
            and tracking.list_checkpoints(client, run.info.run_id)
        ):
            return run.info.run_id
    return None


def resume_checkpoint(client, run_id: str, cfg: Config, dataset_hash: str) -> str:
    """The last checkpoint of run `run_id`, which must have been trained with cfg's parameters
    on the very data prepared now."""
    run = get_run(client, run_id, "resume_from")
    key = differing_param(run.data.params, cfg)
    if key is not None:
        raise ConfigError(
            f"resume_from: run {run_id} has {key}={run.data.params.get(key)!r} but this training "
            f"asks for {str(getattr(cfg, key))!r}; resume with the run's parameters"
        )
    if run.data.tags.get("dataset_hash", dataset_hash) != dataset_hash:
        raise ConfigError(
            f"resume_from: run {run_id} was trained on data with hash "
            f"{run.data.tags['dataset_hash'][:12]}, the prepared data now has "
            f"{dataset_hash[:12]}; the source files or the preparing code changed"
        )
    if "imported_from" in run.data.tags:
        raise ConfigError(
            f"resume_from: run {run_id} was imported from upstream's files, whose checkpoints do "
            "not hold the batch order and augmentation state to continue exactly; train a new run"
        )
    checkpoints = tracking.list_checkpoints(client, run_id)
    if not checkpoints:
        raise ConfigError(f"resume_from: run {run_id} has no checkpoint to resume from")
    return checkpoints[-1][1]


def with_label_seed(client, cfg: Config) -> Config:
    """cfg with its label_seed set: an unset one (upstream's default, fresh randomness) becomes the
    interrupted run's this training would continue, else a fresh draw, logged with the run."""
    if cfg.label_seed is not None:
        return cfg
    if cfg.resume_from and not cfg.resume_from.isdigit():
        run = get_run(client, cfg.resume_from, "resume_from")
    else:
        run = client.get_run(run_id) if (run_id := interrupted(client, cfg)) else None
    if run is not None and run.data.params.get("label_seed", "None").isdigit():
        return dataclasses.replace(cfg, label_seed=int(run.data.params["label_seed"]))
    return dataclasses.replace(cfg, label_seed=draw_label_seed())


def open_training(
    client, cfg: Config, dataset_hash: str, steps_per_epoch: int
) -> tuple[str, str | None]:
    """(run id, checkpoint to continue from): run `resume_from`, else the interrupted run of
    this training, else a new run, which has no checkpoint yet."""
    if cfg.resume_from and cfg.resume_from.isdigit():  # upstream's --resume-from STEP
        return resume_at_step(client, cfg, int(cfg.resume_from), dataset_hash, steps_per_epoch)
    run_id = cfg.resume_from or interrupted(client, cfg)
    if run_id:
        return run_id, resume_checkpoint(client, run_id, cfg, dataset_hash)
    return start(client, cfg, dataset_hash, steps_per_epoch), None


def resume_at_step(
    client, cfg: Config, step: int, dataset_hash: str, steps_per_epoch: int
) -> tuple[str, str]:
    """Upstream's integer --resume-from: the global step of a checkpoint of this training's
    interrupted run, which must be its last (a run continues from where it stopped)."""
    run_id = interrupted(client, cfg)
    if run_id is None:
        raise ConfigError(
            f"resume_from: step {step} names a checkpoint of this training's interrupted run, and "
            f"experiment {cfg.name!r} has none with these parameters; pass an MLflow run id "
            "instead"
        )
    artifact = resume_checkpoint(client, run_id, cfg, dataset_hash)
    last = tracking.list_checkpoints(client, run_id)[-1][0] * steps_per_epoch
    if step != last:
        raise ConfigError(
            f"resume_from: run {run_id}'s last checkpoint is at step {last}, not {step}; a run "
            "continues from its last checkpoint"
        )
    return run_id, artifact


def reopen(client, run_id: str) -> None:
    """Marks a run this process continues as RUNNING, and its own."""
    client.update_run(run_id, "RUNNING")
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner_tags().items()])


@contextlib.contextmanager
def ending(client, run_id: str) -> Iterator[None]:
    """Ends the run FINISHED, KILLED on an interrupt, FAILED on any error (message in a tag),
    so no exited process leaves a run RUNNING; unless the server is unreachable, when the run stays
    RUNNING, to be resumed (its process gone, `interrupted` finds it)."""
    try:
        yield
    except TrackingUnavailable:
        raise
    except BaseException as e:
        try:
            if isinstance(e, KeyboardInterrupt):
                client.set_terminated(run_id, "KILLED")
            else:
                client.log_batch(run_id, tags=[RunTag("error", f"{type(e).__name__}: {e}"[:5000])])
                client.set_terminated(run_id, "FAILED")
        except Exception as unmarked:  # the error under way is the one to report
            print(
                f"warning: run {run_id} could not be marked ended: {type(unmarked).__name__}: "
                f"{str(unmarked)[:300]}",
                file=sys.stderr,
            )
        raise
    client.set_terminated(run_id, "FINISHED")


# --- analysis: the run `lipdd stats` measures, the runs `lipdd report` draws --------------------


def pipeline_run_id(cfg: Config) -> str | None:
    """The run the pipeline's train stage recorded in results/train/run.json, if it is a run of
    cfg's experiment (a file the user did not name never overrides the experiment they did)."""
    run_file = Path(cfg.results_dir) / "train" / "run.json"
    if not run_file.exists():
        return None
    recorded = json.loads(run_file.read_text())
    return recorded["run_id"] if recorded.get("experiment_name", cfg.name) == cfg.name else None


def trained(client, cfg: Config) -> str:
    """The run to analyse: --run-id; else results/train/run.json's when its identity params are
    cfg's; else the latest finished run of cfg's experiment with cfg's identity params."""
    if cfg.stats.run_id:
        return get_run(client, cfg.stats.run_id, "stats.run_id").info.run_id
    wanted = identity(cfg)
    if run_id := pipeline_run_id(cfg):
        try:
            params = client.get_run(run_id).data.params
        except Exception:
            params = {}
        if all(params.get(k) == v for k, v in wanted.items()):
            return run_id
    runs = search(client, cfg, "attributes.status = 'FINISHED'")
    if not runs:
        raise ConfigError(
            f"stats.run_id: no finished run in experiment {cfg.name!r} has "
            f"{', '.join(f'{k}={v}' for k, v in wanted.items())}; pass --run-id"
        )
    # Re-runs of one training are interchangeable (the latest wins); runs that differ in
    # anything else (learning rate, epochs, ...) are a choice only the user can make.
    differing = [r for r in runs if what_trains(r.data.params) != what_trains(runs[0].data.params)]
    if differing:
        listing = "; ".join(f"{r.info.run_id} ({r.info.run_name})" for r in runs[:10])
        raise ConfigError(
            f"stats.run_id: {len(runs)} finished runs match and differ in other parameters: "
            f"{listing}; pass --run-id"
        )
    return runs[0].info.run_id


def for_report(client, cfg: Config, usable) -> list:
    """The runs a report draws: the finished, `usable` training runs of cfg's REPORT_SETTING;
    where those disagree in another training parameter, the ones with cfg's value of it. So two
    sweeps at one noise level are never averaged together, and a parameter every run shares need
    not be repeated on the command line. Says on stderr which runs it left out, and why."""
    exp = client.get_experiment_by_name(cfg.name)
    if exp is None:
        raise ConfigError(
            f"name: experiment {cfg.name!r} does not exist in {client.tracking_uri}; train some "
            "runs first"
        )
    training = [
        r
        for r in client.search_runs([exp.experiment_id], max_results=MAX_RUNS)
        if r.data.tags.get(KIND) != "report"
    ]
    wanted = {k: str(getattr(cfg, k)) for k in REPORT_SETTING}
    setting = [r for r in training if all(r.data.params.get(k) == v for k, v in wanted.items())]
    runs = [r for r in setting if r.info.status == "FINISHED" and usable(r)]
    for r in setting:
        if r not in runs:
            why = (
                "is " + r.info.status
                if r.info.status != "FINISHED"
                else "has neither test_error nor Jacobian stats"
            )
            print(
                f"report: leaving out run {r.info.run_id} ({r.info.run_name}): it {why}",
                file=sys.stderr,
            )
    if not runs:
        found = Counter("/".join(r.data.params.get(k, "?") for k in wanted) for r in training)
        have = ", ".join(f"{n} x {k}" for k, n in found.most_common())
        raise ConfigError(
            "report: no finished run with test_error or Jacobian stats in experiment "
            f"{cfg.name!r} has {', '.join(f'{k}={v}' for k, v in wanted.items())}; it has "
            f"{len(training)} training runs ({'/'.join(wanted)}: {have or 'none'})"
        )
    for key, value in cfg.params("identity", "training").items():
        if key in REPORT_AXES:
            continue
        counts = Counter(
            r.data.params[key] for r in runs if key in r.data.params
        )  # older runs may lack a key
        if len(counts) < 2:
            continue
        found = ", ".join(f"{v}: {n} runs" for v, n in sorted(counts.items()))
        kept = [r for r in runs if r.data.params.get(key, str(value)) == str(value)]
        if not kept:
            raise ConfigError(
                f"report: the runs of {cfg.model} on {cfg.data} at label noise "
                f"{cfg.label_noise:g} differ in {key} ({found}) and none has {key}={value}; pass "
                f"--{key.replace('_', '-')} with one of those values"
            )
        print(
            f"report: the runs differ in {key} ({found}); keeping the {len(kept)} with "
            f"{key}={value}",
            file=sys.stderr,
        )
        runs = kept
    return runs


def analysed_run(cfg: Config) -> tuple:
    """(client, run, the run's own Config, the output directory) of the run cfg names (lipdd
    stats and the commands that read a run as it does)."""
    client = tracking.get_client(tracking.tracking_uri(cfg.tracking_uri), create=False)
    run = client.get_run(trained(client, cfg))
    run_cfg = configlib.from_flat(run.data.params)
    out_dir = Path(cfg.stats.output_dir) if cfg.stats.output_dir else upstream.run_dir(cfg, run_cfg)
    return client, run, run_cfg, out_dir
