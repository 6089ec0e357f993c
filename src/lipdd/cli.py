"""`lipdd prepare | train | stats | report`: the commands DVC stages and people both run, and
`lipdd sweep` (lipdd.sweep), which runs the pipeline over a grid of parameters.

Flags are generated from the config fields, under the upstream README's spellings, so
`python train.py --label-noise=0.2 ...` becomes `lipdd train --label-noise=0.2 ...`.
Heavy libraries (torch, mlflow) are imported inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys

from . import config, upstream
from .config import Config, StatsConfig
from .errors import ConfigError, TrackingUnavailable, TrainingDiverged

GROUPS = {
    "prepare": ("data", "run"),
    "train": ("data", "model", "train", "run"),
    "stats": ("data", "model", "train", "run", "stats"),
    "export-checkpoints": ("data", "model", "train", "run"),
    "import-checkpoints": ("data", "model", "train", "run"),
    "report": ("data", "model", "run"),
}
DESCRIPTIONS = {
    "report": "Figures and tables across the finished runs of one data / model / label-noise "
    "setting, by width and by epoch; logged to a report run.",
    "export-checkpoints": "Write a run's checkpoints as upstream's train.py does, to "
    "SAVE_DIR/NAME/MODEL/DATA/SETTING/[noise-N-]seed-S/checkpoints.zip (checkpoints/ with "
    "--raw-checkpoints).",
    "import-checkpoints": "Turn the upstream run these flags name (its checkpoints.zip or "
    "checkpoints/) into a finished MLflow run with its params, checkpoints and an evaluation per "
    "checkpoint.",
    "prepare": "Turn a dataset into the prepared format: uint8 arrays, clean and noisy labels, "
    "splits, meta.json.",
    "train": "Train one network; log params, per-batch loss, evaluations and checkpoints to one "
    "MLflow run.",
    "stats": "Compute per-sample statistics (Jacobian operator norm, ...) of a run's checkpoints.",
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and status 2, like every other bad input
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_sweep_parser() -> Parser:
    p = Parser(
        prog="lipdd sweep",
        description="Run every point of a parameter grid as a DVC experiment: here, one after "
        "another, or as a SLURM job array (--slurm).",
    )
    p.add_argument(
        "-S",
        dest="set",
        action="append",
        required=True,
        metavar="KEY=VALUES",
        help="params.yaml key and its values: 1,2,4 or range(1,65); repeat for a grid",
    )
    p.add_argument(
        "--name", help="the sweep's name (default: sweep-<time>), its experiments' prefix"
    )
    p.add_argument("--slurm", action="store_true", help="submit a SLURM job array (submitit)")
    p.add_argument("--parallel", type=int, default=8, help="array tasks running at once (SLURM)")
    p.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    p.add_argument("--time", type=int, default=24 * 60, help="minutes a job may run (SLURM)")
    p.add_argument("--cpus", type=int, default=1, help="CPUs per job (SLURM)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per job (SLURM)")
    p.add_argument("--no-wait", action="store_true", help="submit and return (SLURM)")
    return p


def add_field(parser, f, dest: str) -> None:
    meta = f.metadata
    names = [f"--{f.name.replace('_', '-')}"] + ([meta["alias"]] if meta.get("alias") else [])
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kw = dict(dest=dest, default=argparse.SUPPRESS, help=meta["help"], metavar=f.name.upper())
    if meta.get("choices") and not callable(meta["choices"]):
        kw["metavar"] = "{" + ",".join(meta["choices"]) + "}"
    if f.name == "raw_checkpoints":  # upstream's flag takes a value
        parser.add_argument(*names, nargs="?", const=True, **kw)
    elif isinstance(default, bool):
        parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
    elif f.type.startswith("list"):
        # --checkpoint alone lists the checkpoints; --probes alone measures no probe set
        parser.add_argument(*names, nargs="*" if f.name in ("checkpoint", "probes") else "+", **kw)
    else:
        parser.add_argument(*names, **kw)


def build_parser() -> Parser:
    parser = Parser(
        prog="lipdd", description="Lipschitz estimates of trained networks and double descent."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser(  # listed here, parsed by lipdd.sweep
        "sweep",
        help="Every point of a parameter grid (-S width=1,2,4 -S seed=1,2) as a DVC experiment, "
        "here or as a SLURM job array (--slurm); `lipdd sweep --help` for its flags.",
    )
    for command, groups in GROUPS.items():
        p = sub.add_parser(command, help=DESCRIPTIONS[command], description=DESCRIPTIONS[command])
        p.add_argument(
            "--params", metavar="FILE", help="params.yaml to start from (flags override it)"
        )
        taken = set()
        if command == "export-checkpoints":  # the run is found as `lipdd stats` finds it
            add_field(
                p,
                next(f for f in config.field_specs(StatsConfig) if f.name == "run_id"),
                "stats.run_id",
            )
        if (
            "stats" in groups
        ):  # stats flags win: --batch-size is the stats batch size here, as in upstream
            g = p.add_argument_group("statistics")
            for f in config.field_specs(StatsConfig):
                add_field(g, f, f"stats.{f.name}")
                taken.add(f.name)
        for group in groups:
            if group == "stats":
                continue
            g = p.add_argument_group(group)
            for f in config.field_specs(Config):
                if f.metadata["group"] == group and f.name not in taken:
                    add_field(g, f, f.name)
    return parser


def interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:  # a grid of pipelines, not one command's config
        from .sweep import sweep

        return sweep(build_sweep_parser().parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "params")}
    # `kill`, a scheduler's preemption and `dvc queue kill` send SIGTERM: end like Ctrl-C,
    # so the MLflow run is marked KILLED instead of staying RUNNING.
    signal.signal(signal.SIGTERM, interrupt)
    try:
        cfg = config.build(overrides, params_file=args.params, registries=registries())
        setup_logging(cfg)
        return COMMANDS[args.command](cfg) or 0
    except ConfigError as e:  # bad input, data, checkpoints: the user's to fix
        print(f"lipdd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lipdd {args.command}: interrupted", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"lipdd {args.command}: error: {e}", file=sys.stderr)
        return 1
    except TrackingUnavailable as e:
        print(f"lipdd {args.command}: error: {e}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: the same command succeeds later


def registries() -> dict[str, tuple[str, ...]]:
    """The names config validation checks stats.metric and stats.probes against: a typo fails
    before any work. Read here, after parsing, so `--help` never imports torch."""
    from .measures import MEASURES, PROBES

    return {"measures": tuple(MEASURES), "probes": tuple(PROBES)}


def setup_logging(cfg: Config) -> None:
    """Upstream's --log-level and --logfile: Python's logging at that level, to stderr and, with a
    log file, to that file in the run's upstream layout directory; neither given, nothing changes.
    """
    if cfg.log_level is None and cfg.logfile is None:
        return
    handlers = [logging.StreamHandler()]
    if cfg.logfile:
        path = upstream.run_dir(cfg) / cfg.logfile
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path))
    logging.basicConfig(
        level=(cfg.log_level or "info").upper(),
        handlers=handlers,
        force=True,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )


def cmd_prepare(cfg: Config) -> None:
    from .data import draw_label_seed, prepare_for

    if cfg.label_seed is None:
        cfg.label_seed = draw_label_seed()
    meta = prepare_for(cfg)
    print(
        f"prepared {cfg.data} in {cfg.prepared_path}: {meta['splits']}, {meta['n_corrupted']} "
        "corrupted training labels"
    )


def cmd_train(cfg: Config) -> None:
    from .train import train

    print(f"run {train(cfg)} finished")


def cmd_stats(cfg: Config) -> None:
    from . import stats

    if cfg.stats.checkpoint == []:  # upstream's --checkpoint with no value: list them
        return stats.list_checkpoints(cfg)
    for path in (stats.merge if cfg.stats.merge else stats.compute_stats)(cfg):
        print(path)


def cmd_export_checkpoints(cfg: Config) -> None:
    from .upstream_runs import export_checkpoints

    print(export_checkpoints(cfg))


def cmd_import_checkpoints(cfg: Config) -> None:
    from .upstream_runs import import_checkpoints

    print(f"run {import_checkpoints(cfg)} imported")


def cmd_report(cfg: Config) -> None:
    from .report import report

    for path in report(cfg):
        print(path)


COMMANDS = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "stats": cmd_stats,
    "export-checkpoints": cmd_export_checkpoints,
    "import-checkpoints": cmd_import_checkpoints,
    "report": cmd_report,
}

if __name__ == "__main__":
    sys.exit(main())
