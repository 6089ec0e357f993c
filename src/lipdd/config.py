"""One typed, validated configuration for every command.

Precedence: built-in defaults <- `--params FILE` (params.yaml) <- environment (SAVE_DIR,
NAME, DATA_DIR, DEVICE, WORKERS) <- command-line flags. Each field declares its help text,
its upstream flag spellings and its choices once; the CLI and the validation are built
from those declarations, so a params.yaml key and its flag cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError
from .names import (
    INPUT_STATS,
    LOG_LEVELS,
    MODEL_ADDITIONS,
    MODEL_FAMILIES,
    NORMALIZATIONS,
    OPTIMIZERS,
    PRECISIONS,
    RANDOM_DATASETS,
    SOURCES,
    SPLITS,
    WEIGHT_INITS,
)

ENV_VARS = {
    "SAVE_DIR": "save_dir",
    "NAME": "name",
    "DATA_DIR": "data_dir",
    "DEVICE": "device",
    "WORKERS": "workers",
}


# What a training parameter says about a run (a marker on each field, read by runs.py):
#   "identity"  upstream's scripts name a run by it (compute_stats.py's flags find the run);
#   "training"  it changes what the training computes: two runs are the same training when
#               they agree on every identity and training parameter;
#   "place"     where the run executes or lands: free to differ on resume, never tells runs apart.
ROLES = ("identity", "training", "place")


def opt(default, help, group, choices=None, kind=None, role="training", alias=None):
    """A config field. `kind` is the element parser for list fields and the parser for
    fields whose default is None; `role` is one of ROLES; `alias` a second flag spelling."""
    assert role in ROLES, role
    meta = dict(help=help, group=group, choices=choices, kind=kind, role=role, alias=alias)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class StatsConfig:
    # Built-in defaults are upstream's (one metric, raw logits); params.yaml asks for more.
    metric: list[str] = opt(
        ["jacobian_operator_norm"],
        "measures to compute (lipdd.measures.MEASURES)",
        "stats",
        choices="measures",
        kind=str,
    )
    normalization: list[str] = opt(
        ["none"],
        "output normalisation(s) for the Jacobian metrics",
        "stats",
        choices=NORMALIZATIONS,
        kind=str,
    )
    target_logit_only: bool = opt(False, "Jacobian of the labelled output only", "stats")
    dataset_split: str = opt("train", "split the samples come from", "stats", choices=SPLITS)
    num_samples: int | None = opt(
        None,
        "how many samples, from position SKIP on, a multiple of batch_size (default: the rest of "
        "the split)",
        "stats",
        kind=int,
    )
    batch_size: int = opt(100, "samples per batch (one result file per shard)", "stats")
    skip: int | None = opt(
        None,
        "start at sample SKIP of the split, a multiple of batch_size (manual data parallelism); "
        "given, the result files are named -id-SKIP/BATCH_SIZE",
        "stats",
        kind=int,
    )
    mc_sample_seed: int = opt(
        4321,
        "recorded only, as in upstream, whose stats loader never shuffles: the samples are the "
        "split's, in order",
        "stats",
    )
    checkpoint: list[int] | None = opt(
        None,
        "checkpoint ordinals (0 = initial); default all; the flag with no value lists them",
        "stats",
        kind=int,
    )
    checkpoint_by_step: bool = opt(
        False, "read --checkpoint as global steps, not ordinals", "stats"
    )
    nsteps_per_epoch: int | None = opt(
        None, "steps per epoch for --checkpoint-by-step (default: from the run)", "stats", kind=int
    )
    gen_strategy: str = opt(
        "none",
        "upstream's sampling strategy; it has one, none: the split's samples as they are",
        "stats",
        choices=("none",),
    )
    curvature_samples: int = opt(
        1000,
        "loss_curvature, output_margin, weight_norms, pacbayes: training points they are "
        "measured on (a fixed seeded subset)",
        "stats",
    )
    curvature_seed: int = opt(
        0,
        "seed of that subset, of Hutchinson's probes (loss_curvature) and of the perturbations "
        "(pacbayes)",
        "stats",
    )
    curvature_top_k: int = opt(
        1, "loss_curvature: how many of the largest Hessian eigenvalues", "stats"
    )
    curvature_tolerance: float = opt(
        1e-3, "loss_curvature: relative tolerance of those eigenvalues (Lanczos)", "stats"
    )
    curvature_memory: int = opt(
        1024,
        "loss_curvature: MiB the Lanczos basis may take on the device; past it Lanczos restarts "
        "(more products, same tolerance)",
        "stats",
    )
    hutchinson_probes: int = opt(
        100, "loss_curvature: Rademacher probes of the Hessian trace estimate", "stats"
    )
    spectrum_probes: int = opt(
        4, "hessian_spectrum: Rademacher vectors of the density estimate", "stats"
    )
    spectrum_steps: int = opt(
        40, "hessian_spectrum: Lanczos steps from each (nodes of its quadrature)", "stats"
    )
    probes: list[str] = opt(
        [],
        "probe sets the per-sample measures are also evaluated on, off the training points "
        "(lipdd.measures.probes.PROBES); the flag with no value: none",
        "stats",
        choices="probes",
        kind=str,
    )
    probe_samples: int = opt(
        100, "probes: training points they start from (a fixed seeded subset)", "stats"
    )
    probe_seed: int = opt(
        0, "probes: seed of that subset, of the pairs and of the random inputs", "stats"
    )
    probe_lambdas: list[float] = opt(
        [0.25, 0.5, 0.75],
        "between: interpolation coefficients lambda in [0, 1]",
        "stats",
        kind=float,
    )
    probe_directions: int = opt(
        8,
        "shift1, shift4, shift_path: directions per training point",
        "stats",
        alias="--num-directions",
    )
    worst_radius: float = opt(
        1.0, "worst: radius of the l2 ball around each training point (normalised inputs)", "stats"
    )
    worst_steps: int = opt(10, "worst: projected gradient ascent steps", "stats")
    bigmem: bool = opt(
        False, "all K output gradients in one pass (memory x K) instead of bounded chunks", "stats"
    )
    num_power_iters: int = opt(
        0, "kept for upstream compatibility; the operator norm is always exact", "stats"
    )
    outname: str | None = opt(
        None,
        "result file prefix (default: METRIC_NORMALIZATION_SPLIT_epochNNNN)",
        "stats",
        kind=str,
    )
    output_dir: str | None = opt(
        None,
        "directory of the per-sample results (default: the upstream layout "
        "SAVE_DIR/NAME/MODEL/DATA/SETTING/seed-SEED)",
        "stats",
        kind=str,
    )
    run_id: str | None = opt(
        None,
        "MLflow run to analyse (default: results/train/run.json, else the latest finished run "
        "matching the identifying flags)",
        "stats",
        kind=str,
    )
    merge: bool = opt(
        False,
        "compute nothing; join the shard files of --skip runs in the output directory into the "
        "file one run would have written",
        "stats",
    )


@dataclass
class Config:
    # data
    data: str = opt("digits", "dataset", "data", choices=SOURCES, role="identity")
    data_dir: str = opt(
        "data/raw",
        "where raw datasets are read from / downloaded to (env DATA_DIR)",
        "data",
        role="place",
    )
    verify_checksums: bool = opt(
        True, "check CIFAR files against torchvision's md5 sums", "data", role="place"
    )
    prepared_dir: str = opt(
        "data/prepared",
        "where prepared arrays are written (one folder per dataset)",
        "data",
        role="place",
    )
    label_noise: float = opt(
        0.2, "fraction of training labels replaced by another class", "data", role="identity"
    )
    label_seed: int | None = opt(
        None,
        "seed of the label corruption (unset: train draws one and logs it; stats takes the run's)",
        "data",
        kind=int,
        role="identity",
    )
    train_split: int = opt(
        0,
        "training samples drawn from the training set (0 = all, no validation)",
        "data",
        role="identity",
    )
    val_split: int = opt(
        0,
        "validation samples drawn from the training set (with train_split)",
        "data",
        role="identity",
    )
    data_split_seed: int = opt(42, "seed of the train/validation split", "data", role="identity")
    random_dataset: str | None = opt(
        None,
        "upstream's random data in place of the images: uniform (within the per-channel mean +- "
        "std) / normal (that mean and std) / hypersphere (each channel in the unit ball) images "
        "with random labels, drawn with seed 1234; jitter: the real images, thresholded after "
        "normalisation",
        "data",
        choices=RANDOM_DATASETS,
        kind=str,
        role="identity",
    )
    input_stats: str = opt(
        "fixed",
        "per-channel mean/std inputs are normalised with: fixed (upstream's CIFAR constants; "
        "digits: its whole training set's) or split (the prepared training split's)",
        "data",
        choices=INPUT_STATS,
    )
    # model
    model: str = opt(
        "cnn5",
        "cnn5 | resnet18 | resnet34, or a combined name such as cnn5_16",
        "model",
        role="identity",
    )
    width: int | None = opt(
        None, "width k (default: from the model name, else 64)", "model", kind=int, role="identity"
    )
    model_additions: list[str] = opt(
        [],
        "extra layers: batch_norm after every convolution; dropout (rate --dropout) on the pooled "
        "features before the last linear layer",
        "model",
        choices=MODEL_ADDITIONS,
        kind=str,
    )
    dropout: float = opt(
        0.0, "dropout rate of the dropout addition (without it, no effect, as in upstream)", "model"
    )
    weight_init: str = opt("pytorch", "weight initialisation", "model", choices=WEIGHT_INITS)
    # training
    optimizer: str = opt("sgd", "optimizer", "train", choices=OPTIMIZERS)
    learning_rate: float = opt(0.01, "learning rate after warmup", "train")
    momentum: float = opt(0.9, "SGD momentum", "train")
    weight_decay: float = opt(0.0, "optimizer weight decay", "train")
    l1_regularization: float = opt(
        0.0, "coefficient of the L1 norm of the weights added to the loss", "train"
    )
    l2_regularization: float = opt(
        0.0, "coefficient of the squared L2 norm of the weights added to the loss", "train"
    )
    lr_warmup_epochs: int = opt(0, "epochs of linear warmup from lr_warmup_initial", "train")
    lr_warmup_initial: float = opt(0.001, "learning rate of the first warmup epoch", "train")
    lr_step: int = opt(
        0,
        "decay the learning rate every LR_STEP epochs after warmup (0 = never)",
        "train",
        alias="--learning-rate-step",
    )
    lr_decay_rate: float = opt(0.1, "factor of each step decay", "train")
    batch_size: int = opt(128, "training batch size", "train")
    epochs: int = opt(100, "training epochs", "train")
    augmentation: bool = opt(
        False, "random crop (4-pixel zero padding) and horizontal flip", "train", role="identity"
    )
    precision: str = opt(
        "fp32",
        "arithmetic of the training steps on a GPU: fp32 (IEEE), tf32 (TensorFloat-32 matrix "
        "products and convolutions) or bf16 (autocast); evaluation and measures run in IEEE fp32",
        "train",
        choices=PRECISIONS,
    )
    eval_every: int = opt(
        10, "evaluate train/val/test loss and accuracy every N epochs (and at the end)", "train"
    )
    accuracy_threshold: float = opt(
        1.0,
        "deprecated and unused in upstream; accepted so its commands run",
        "train",
        role="place",
    )
    early_exit_accuracy: bool = opt(
        False, "stop once training accuracy reaches the threshold", "train"
    )
    stop_by_accuracy_threshold: float = opt(1.0, "training accuracy that stops early", "train")
    early_exit_loss: bool = opt(False, "stop once training loss falls to the threshold", "train")
    stop_by_loss_threshold: float = opt(0.001, "training loss that stops early", "train")
    save_checkpoint: list[int] = opt(
        [0], "0: initial and final; N: every N epochs too; several: those epochs", "train", kind=int
    )
    loss_checkpoint: int = opt(1, "log the training loss every N batches", "train")
    resume_from: str | None = opt(
        None,
        "MLflow run id whose last checkpoint training continues from; a number is upstream's "
        "global step of the last checkpoint of this training's interrupted run",
        "train",
        kind=str,
        role="place",
    )
    seed: int = opt(
        42, "seed of initialisation, batch order and augmentation", "train", role="identity"
    )
    # where things run and land
    device: str = opt("auto", "cpu | cuda | cuda:N | auto (env DEVICE)", "run", role="place")
    runs_per_gpu: int = opt(
        1,
        "processes that share one GPU: each `cuda` (or `auto`) training or stats process leases a "
        "GPU slot for its life, waiting while all are taken",
        "run",
        role="place",
    )
    workers: int = opt(
        1,
        "CPU threads for the math (env WORKERS): training splits each op over them, stats runs "
        "that many 32-sample chunks at once; data is device-resident, so no loader workers",
        "run",
        role="place",
    )
    compile: bool = opt(
        False,
        "torch.compile the network for training: a one-off compile (needs a C++ compiler on CPU), "
        "then fused kernels; measure it on a short run first (docs/performance.md)",
        "run",
        role="place",
    )
    name: str = opt("lipdd", "MLflow experiment name (env NAME)", "run", role="place")
    log_level: str | None = opt(
        None,
        "level of Python's logging (lipdd, MLflow, torch): debug | info | warning | error | "
        "critical (default: each library's own)",
        "run",
        choices=LOG_LEVELS,
        kind=str,
        role="place",
    )
    logfile: str | None = opt(
        None,
        "also log to this file in the upstream layout directory of the run "
        "(SAVE_DIR/NAME/MODEL/DATA/SETTING/[noise-N-]seed-S/LOGFILE)",
        "run",
        kind=str,
        role="place",
    )
    save_dir: str = opt(
        "results/runs",
        "root of the upstream layout for stats files and exported checkpoints (env SAVE_DIR)",
        "run",
        role="place",
    )
    raw_checkpoints: bool = opt(
        False,
        "export-checkpoints writes a checkpoints/ folder, not checkpoints.zip (upstream's flag "
        "takes a value: --raw-checkpoints=1)",
        "run",
        role="place",
    )
    results_dir: str = opt(
        "results", "pipeline outputs: train/run.json, metrics, histories", "run", role="place"
    )
    tracking_uri: str | None = opt(
        None,
        "MLflow tracking URI (default: env MLFLOW_TRACKING_URI, else sqlite:///<project "
        "root>/mlflow.db)",
        "run",
        kind=str,
        role="place",
    )
    tracking_outage_limit: float = opt(
        86400.0,
        "seconds a training goes on while the tracking server is unreachable, its metrics and "
        "checkpoints kept on disk and written once the server is back; past it the training "
        "stops, to be resumed",
        "run",
        role="place",
    )
    system_metrics: bool = opt(
        True,
        "log the training's CPU, memory, disk and network use (GPU with nvidia-ml-py) as MLflow's "
        "system/ metrics, sampled every 10 s (env MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL)",
        "run",
        role="place",
    )
    stats: StatsConfig = field(default_factory=StatsConfig, metadata=dict(group=None))

    # --- derived -------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return f"{self.model}_{self.width}"

    @property
    def prepared_path(self) -> Path:
        return Path(self.prepared_dir) / self.data

    def run_name(self) -> str:
        return f"{self.model_name}-{self.data}-noise{self.label_noise:g}-seed{self.seed}"

    def flat(self) -> dict[str, Any]:
        """Every resolved training parameter under a stable key: the MLflow run's params.
        Stats options are not among them: one run is analysed many ways."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "stats"}

    def params(self, *roles: str) -> dict[str, Any]:
        """flat(), cut to the parameters of the given roles (see ROLES)."""
        return {k: v for k, v in self.flat().items() if ROLE[k] in roles}


def parse_model_name(name: str, width: int | None = None) -> tuple[str, int]:
    """Split 'family' or 'family_width' into (family, width); an explicit width must agree with
    the name, and a bare family is the standard width 64."""
    allowed = f"families are {', '.join(MODEL_FAMILIES)}"
    family, sep, suffix = name.partition("_")
    if family not in MODEL_FAMILIES:
        raise ConfigError(f"model: unknown model {name!r}; {allowed}")
    if sep:
        # isascii+isdigit rejects '+8', ' 8', '1_6' and non-ASCII digits, all of which int() would
        # accept
        if not (suffix.isascii() and suffix.isdigit()):
            raise ConfigError(
                f"model: {name!r} has unparsable width {suffix!r}; expected <family>_<width>, "
                f"{allowed}"
            )
        named = int(suffix)
        if width is not None and width != named:
            raise ConfigError(f"model: {name!r} says width {named} but width is {width}")
        width = named
    elif width is None:
        width = 64
    if width < 1:
        raise ConfigError(
            f"width: model {name!r} with width {width}; the width must be a positive integer"
        )
    return family, width


# --- building ---------------------------------------------------------------------------


def field_specs(cls=Config):
    return [f for f in fields(cls) if f.name != "stats"]


ROLE = {f.name: f.metadata["role"] for f in field_specs()}


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Turn a YAML / env / flag value into the field's type, or raise ConfigError."""
    name = f"{where}{f.name}"
    kind = f.metadata.get("kind")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    is_list = isinstance(default, list) or f.type.startswith("list")
    if value is None:
        if default is None:
            return None
        if is_list:
            return []
        raise ConfigError(f"{name}: null is not allowed; expected a {type(default).__name__}")
    if is_list:
        items = (
            value
            if isinstance(value, (list, tuple))
            else str(value).split(",")
            if isinstance(value, str)
            else [value]
        )
        return [_scalar(kind, x, name) for x in items]
    return _scalar(kind or type(default), value, name)


def _scalar(kind, value, name):
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a valid {kind.__name__}") from None


def load_params(path: str | os.PathLike) -> dict[str, Any]:
    """params.yaml as a flat {key: value} dict with stats.* keys; unknown keys are errors."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--params: file {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"--params: {path} is not valid YAML ({str(e).splitlines()[0]})"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--params: {path} must hold a mapping of parameter names to values")
    flat = {k: v for k, v in raw.items() if k != "stats"}
    stats = raw.get("stats") or {}
    if not isinstance(stats, dict):
        raise ConfigError(f"--params: 'stats' in {path} must be a mapping")
    flat.update({f"stats.{k}": v for k, v in stats.items()})
    known = {f.name for f in field_specs()} | {f"stats.{f.name}" for f in field_specs(StatsConfig)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(f"--params: unknown parameter {unknown[0]!r} in {path}")
    return flat


def build(
    overrides: dict[str, Any] | None = None,
    params_file: str | None = None,
    environ: dict[str, str] | None = None,
    registries: dict[str, tuple[str, ...]] | None = None,
) -> Config:
    """Resolve a Config from the four layers and validate it (`registries`: see validate).
    `overrides` are flat keys (`label_noise`, `stats.batch_size`) from the command line."""
    layers: dict[str, Any] = {}
    if params_file:
        layers.update(load_params(params_file))
    env = os.environ if environ is None else environ
    layers.update({key: env[var] for var, key in ENV_VARS.items() if env.get(var)})
    layers.update(overrides or {})
    cfg, stats = Config(), StatsConfig()
    specs = {f.name: f for f in field_specs()}
    stats_specs = {f.name: f for f in field_specs(StatsConfig)}
    for key, value in layers.items():
        if key.startswith("stats."):
            f = stats_specs[key[6:]]
            setattr(stats, f.name, _coerce(f, value, "stats."))
        else:
            setattr(cfg, key, _coerce(specs[key], value, ""))
    cfg.stats = stats
    validate(cfg, registries)
    # 'cnn5_16' -> 'cnn5', 16: one spelling per run
    cfg.model, cfg.width = parse_model_name(cfg.model, cfg.width)
    return cfg


def from_flat(params: dict[str, str]) -> Config:
    """Rebuild a run's Config from its MLflow params (all strings); unknown keys are ignored
    so runs from older versions still load."""
    specs = {f.name: f for f in field_specs()}
    specs.update({f"stats.{f.name}": f for f in field_specs(StatsConfig)})
    values = {k: _from_param_string(specs[k], v) for k, v in params.items() if k in specs}
    return build(values, environ={})


def _from_param_string(f: dataclasses.Field, text: str) -> Any:
    if text == "None":
        return None
    if f.type.startswith("str"):  # keep e.g. run ids and paths verbatim
        return text
    return yaml.safe_load(text)


# --- validation ---------------------------------------------------------------------------


def _positive(v):
    return v > 0 and math.isfinite(v)


def _non_negative(v):
    return v >= 0 and math.isfinite(v)


def _device(v):
    return v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())


# One value's rules: key -> (test, what is allowed). Rules across values are in `validate`.
POSITIVE, NON_NEGATIVE = (_positive, "a positive number"), (_non_negative, "a number >= 0")
COUNT, POSITIVE_COUNT = (
    (lambda v: v >= 0, "an integer >= 0"),
    (lambda v: v >= 1, "a positive integer"),
)
RULES = {
    "label_noise": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "label_seed": (
        lambda v: v is None or v >= 0,
        "an integer >= 0 (numpy's default_rng takes no negative seed), or unset for a fresh one",
    ),
    "train_split": COUNT,
    "val_split": COUNT,
    **dict.fromkeys(
        ("learning_rate", "batch_size", "eval_every", "loss_checkpoint", "lr_decay_rate"), POSITIVE
    ),
    **dict.fromkeys(
        ("weight_decay", "epochs", "l1_regularization", "l2_regularization", "lr_warmup_epochs")
        + ("lr_warmup_initial", "lr_step", "stop_by_loss_threshold", "tracking_outage_limit"),
        NON_NEGATIVE,
    ),
    "momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "workers": (
        lambda v: v >= 0,
        "an integer >= 0 (0, upstream's no loader processes, computes on one thread like 1)",
    ),
    "dropout": (lambda v: 0 <= v < 1, "a rate in [0, 1)"),
    "stop_by_accuracy_threshold": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
    "save_checkpoint": (
        lambda v: len(v) > 0 and min(v) >= 0,
        "0, a period N > 0, or a list of epochs >= 0",
    ),
    "runs_per_gpu": POSITIVE_COUNT,
    "device": (_device, "cpu, cuda, cuda:N or auto"),
    "stats.batch_size": POSITIVE_COUNT,
    "stats.metric": (len, "at least one metric"),
    "stats.normalization": (len, "at least one normalization"),
    "stats.curvature_samples": POSITIVE_COUNT,
    "stats.curvature_top_k": POSITIVE_COUNT,
    "stats.curvature_memory": POSITIVE_COUNT,
    "stats.hutchinson_probes": (lambda v: v >= 2, "an integer >= 2 (the standard error needs two)"),
    "stats.curvature_tolerance": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "stats.spectrum_probes": POSITIVE_COUNT,
    "stats.spectrum_steps": POSITIVE_COUNT,
    "stats.probe_samples": (lambda v: v >= 2, "an integer >= 2 (pairs need two)"),
    "stats.probe_lambdas": (
        lambda v: len(v) > 0 and all(0 <= x <= 1 for x in v),
        "one or more numbers in [0, 1]",
    ),
    "stats.probe_directions": POSITIVE_COUNT,
    "stats.worst_radius": POSITIVE,
    "stats.worst_steps": COUNT,
    "stats.num_power_iters": COUNT,
    "stats.checkpoint": (lambda v: v is None or min(v, default=0) >= 0, "ordinals >= 0"),
    "stats.nsteps_per_epoch": (lambda v: v is None or v >= 1, "a positive integer"),
}


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {value!r} is not allowed; expected {allowed}")


def _values(cfg: Config):
    """(key, field, value) of every parameter, stats ones under stats.KEY."""
    for cls, obj, prefix in ((Config, cfg, ""), (StatsConfig, cfg.stats, "stats.")):
        for f in field_specs(cls):
            yield prefix + f.name, f, getattr(obj, f.name)


def validate(cfg: Config, registries: dict[str, tuple[str, ...]] | None = None) -> None:
    """Every rule that can be checked before any work starts. A field whose choices are a
    registry's names ("measures", "probes") is checked against `registries` when given: the CLI
    hands them in, so the configuration never imports the code that computes the measures."""
    for key, f, value in _values(cfg):
        choices = f.metadata.get("choices")
        if isinstance(choices, str):
            choices = (registries or {}).get(choices)
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            if choices:
                _check(v in choices, key, v, "one of " + ", ".join(choices))
        if key in RULES:
            test, allowed = RULES[key]
            _check(bool(test(value)), key, value, allowed)
    family, _ = parse_model_name(cfg.model, cfg.width)
    both = f"a positive value together with train_split={cfg.train_split} (both or neither)"
    _check((cfg.train_split > 0) == (cfg.val_split > 0), "val_split", cfg.val_split, both)
    if cfg.weight_init in ("fixup", "mfixup"):
        why = "pytorch or nkaiming for cnn5 (fixup needs residual blocks)"
        _check(family != "cnn5", "weight_init", cfg.weight_init, why)
        why = "pytorch or nkaiming with batch_norm (fixup replaces normalisation)"
        _check("batch_norm" not in cfg.model_additions, "weight_init", cfg.weight_init, why)
    ckpt = cfg.save_checkpoint
    if len(ckpt) > 1:
        _check(max(ckpt) <= cfg.epochs, "save_checkpoint", ckpt, f"epochs within 0..{cfg.epochs}")
    if cfg.tracking_uri and urlsplit(cfg.tracking_uri).password is not None:  # never echoed
        raise ConfigError(
            "tracking_uri: holds a password, which params.yaml and dvc.lock would carry into git; "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or put the URI in "
            "MLFLOW_TRACKING_URI) instead"
        )
    s = cfg.stats
    if s.skip is not None:
        why = (
            f"a multiple of stats.batch_size={s.batch_size} (the result file's id is skip / "
            "batch_size)"
        )
        _check(s.skip >= 0 and s.skip % s.batch_size == 0, "stats.skip", s.skip, why)
    if s.num_samples is not None:
        why = f"a positive multiple of stats.batch_size={s.batch_size}"
        _check(
            s.num_samples > 0 and s.num_samples % s.batch_size == 0,
            "stats.num_samples",
            s.num_samples,
            why,
        )
