"""Configuration: precedence, upstream spellings, params.yaml <-> flags, refusals."""

import shlex
from pathlib import Path

import pytest
import yaml

from lipdd import cli, config, upstream
from lipdd.errors import ConfigError
from upstream_reference import UPSTREAM_COMMON_FLAGS, UPSTREAM_STATS_FLAGS, UPSTREAM_TRAIN_FLAGS

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_README = ROOT.parent / "shared" / "seed" / "000_03ccb4bad7cd7e9b.txt"

# The upstream README's commands, with `python train.py` -> `lipdd train`.
UPSTREAM_TRAIN = """lipdd train --device=cuda --name='test' --save-dir='checkpoints'
--data-dir="./data" --workers=4
  --data="cifar10" --label-noise=0.2 --model="resnet18_64" --optimizer=sgd --batch-size=128
  --epochs=300
  --augmentation --momentum=0.9 --weight-decay=0 --learning-rate=0.005 --lr-warmup-epochs=5
  --lr-warmup-initial=0.001 --seed=42 --train-split=49000 --val-split=1000 --eval-every=10"""
UPSTREAM_STATS = """lipdd stats --device="cuda" --name=NAME --save-dir=SAVE_DIR --workers=4
--data-dir=DATA_DIR
  --data=cifar10 --dataset-split=train --label-noise=0.2 --model=resnet18_64 --augmentation --seed
  42
  --checkpoint=1 --train-split=49000 --val-split=1000 --num-samples=49000 --batch-size=140
  --metric=jacobian_operator_norm"""


def parse(command: str, environ=None) -> config.Config:
    argv = shlex.split(command)[1:]
    args = cli.build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "params")}
    return config.build(overrides, params_file=args.params, environ=environ or {})


def test_upstream_train_command_parses_with_upstream_semantics():
    cfg = parse(UPSTREAM_TRAIN)
    assert (cfg.model, cfg.width, cfg.data, cfg.label_noise) == ("resnet18", 64, "cifar10", 0.2)
    assert (cfg.optimizer, cfg.batch_size, cfg.epochs, cfg.learning_rate) == (
        "sgd",
        128,
        300,
        0.005,
    )
    assert (cfg.lr_warmup_epochs, cfg.lr_warmup_initial, cfg.train_split, cfg.val_split) == (
        5,
        0.001,
        49000,
        1000,
    )
    assert cfg.augmentation is True and cfg.device == "cuda" and cfg.workers == 4
    assert (cfg.name, cfg.save_dir, cfg.data_dir) == ("test", "checkpoints", "./data")


def test_upstream_stats_command_parses_batch_size_as_the_stats_batch_size():
    cfg = parse(UPSTREAM_STATS)
    s = cfg.stats
    assert (s.num_samples, s.batch_size, s.checkpoint, s.metric) == (
        49000,
        140,
        [1],
        ["jacobian_operator_norm"],
    )
    assert cfg.batch_size == config.Config.batch_size  # the training batch size is untouched
    assert (cfg.model, cfg.width, cfg.seed, cfg.augmentation) == ("resnet18", 64, 42, True)


def test_upstream_readme_commands_are_the_ones_tested():
    """The commands above are the upstream README's, script name aside."""
    if not UPSTREAM_README.exists():
        pytest.skip("upstream README not beside the checkout")
    text = " ".join(UPSTREAM_README.read_text().split())
    for flag in shlex.split(UPSTREAM_TRAIN)[2:] + shlex.split(UPSTREAM_STATS)[2:]:
        assert flag.split("=")[0] in text


def test_precedence_defaults_file_env_flags(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("label_noise: 0.3\nname: from-file\ndevice: cpu\nstats:\n  batch_size: 10\n")
    cfg = config.build({}, params_file=str(params), environ={})
    assert (cfg.label_noise, cfg.name, cfg.stats.batch_size, cfg.epochs) == (
        0.3,
        "from-file",
        10,
        100,
    )
    env = {"NAME": "from-env", "DEVICE": "cpu", "WORKERS": "3", "SAVE_DIR": "s", "DATA_DIR": "d"}
    cfg = config.build({}, params_file=str(params), environ=env)
    assert (cfg.name, cfg.workers, cfg.save_dir, cfg.data_dir) == ("from-env", 3, "s", "d")
    cfg = config.build(
        {"name": "from-flag", "stats.batch_size": "20"}, params_file=str(params), environ=env
    )
    assert (cfg.name, cfg.stats.batch_size, cfg.label_noise) == ("from-flag", 20, 0.3)


def test_every_params_yaml_key_has_a_flag_and_every_flag_a_key():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    keys = {k for k in raw if k != "stats"} | {f"stats.{k}" for k in raw["stats"]}
    fields = {f.name for f in config.field_specs()} | {
        f"stats.{f.name}" for f in config.field_specs(config.StatsConfig)
    }
    assert keys == fields
    dests = set()
    for sub in cli.build_parser()._subparsers._group_actions[0].choices.values():
        dests |= {a.dest for a in sub._actions if a.dest not in ("help", "params")}
    # stats' --batch-size shadows training's on `lipdd stats`; `lipdd train` has it.
    assert dests == fields
    assert config.build({}, params_file=str(ROOT / "params.yaml"), environ={})  # and it validates


def test_params_yaml_is_documented_line_by_line():
    """Every top-level parameter line carries a comment, or the line before it does."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "#")) and not line.startswith("stats:"):
            assert "#" in line or lines[i - 1].lstrip().startswith("#") or "#" in lines[i - 1], line


def test_save_checkpoint_forms():
    assert config.build({"save_checkpoint": 0}, environ={}).save_checkpoint == [0]
    assert config.build({"save_checkpoint": ["5"]}, environ={}).save_checkpoint == [5]
    assert config.build({"save_checkpoint": "1,3,7", "epochs": 10}, environ={}).save_checkpoint == [
        1,
        3,
        7,
    ]


def test_run_params_round_trip():
    cfg = config.build(
        {"model": "resnet18_16", "label_noise": 0.4, "save_checkpoint": [1, 2]}, environ={}
    )
    again = config.from_flat({k: str(v) for k, v in cfg.flat().items()})
    assert again.flat() == cfg.flat()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"label_noise": 1.5}, "label_noise: 1.5 is not allowed; expected a fraction in [0, 1]"),
        ({"label_noise": "lots"}, "label_noise: 'lots' is not a valid float"),
        (
            {"data": "mnist"},
            "data: 'mnist' is not allowed; expected one of digits, cifar10, cifar100",
        ),
        ({"model": "vgg11"}, "model: unknown model 'vgg11'"),
        ({"model": "cnn5_16", "width": 8}, "says width 16 but width is 8"),
        ({"train_split": 100}, "val_split: 0 is not allowed"),
        ({"optimizer": "rmsprop"}, "optimizer: 'rmsprop' is not allowed"),
        (
            {"weight_init": "fixup"},
            "weight_init: 'fixup' is not allowed; expected pytorch or nkaiming for cnn5",
        ),
        ({"epochs": -1}, "epochs: -1 is not allowed"),
        ({"epochs": 2.5}, "epochs: 2.5 is not a valid int"),
        ({"device": "tpu"}, "device: 'tpu' is not allowed"),
        ({"save_checkpoint": [3, 20], "epochs": 10}, "save_checkpoint: [3, 20] is not allowed"),
        (
            {"stats.num_samples": 150, "stats.batch_size": 100},
            "stats.num_samples: 150 is not allowed",
        ),
        ({"stats.skip": 50, "stats.batch_size": 100}, "stats.skip: 50 is not allowed"),
        ({"stats.metric": ["lipschitz"]}, "stats.metric: 'lipschitz' is not allowed"),
        ({"stats.normalization": ["sigmoid"]}, "stats.normalization: 'sigmoid' is not allowed"),
        ({"stats.dataset_split": "holdout"}, "stats.dataset_split: 'holdout' is not allowed"),
        ({"augmentation": "maybe"}, "augmentation: 'maybe' is not a valid bool"),
    ],
)
def test_bad_values_are_refused_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        config.build(overrides, environ={}, registries=cli.registries())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_registry_names_are_checked_only_when_handed_in():
    """The CLI hands the registries' names to validation; config itself never imports them."""
    assert config.build({"stats.metric": ["lipschitz"]}, environ={}).stats.metric == ["lipschitz"]
    with pytest.raises(ConfigError, match="stats.probes: 'nowhere' is not allowed"):
        config.build({"stats.probes": ["nowhere"]}, environ={}, registries=cli.registries())
    assert cli.main(["stats", "--metric", "lipschitz"]) == 2


def test_unknown_params_file_key(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("label_nosie: 0.3\n")
    with pytest.raises(ConfigError, match="unknown parameter 'label_nosie'"):
        config.build({}, params_file=str(p), environ={})


@pytest.mark.parametrize(
    "command, flags",
    [
        ("train", {**UPSTREAM_COMMON_FLAGS, **UPSTREAM_TRAIN_FLAGS}),
        ("stats", {**UPSTREAM_COMMON_FLAGS, **UPSTREAM_STATS_FLAGS}),
    ],
)
def test_every_upstream_flag_is_accepted(command, flags):
    """Each flag of upstream's scripts parses alone; all together they validate as a config."""
    argv = [command]
    for flag, value in flags.items():
        args = [flag] if value is None else [f"{flag}={value}"]
        cli.build_parser().parse_args([command, *args])
        argv += args
    overrides = vars(cli.build_parser().parse_args(argv))
    cfg = config.build(
        {k: v for k, v in overrides.items() if k not in ("command", "params")}, environ={}
    )
    assert (cfg.workers, cfg.random_dataset, cfg.log_level) == (0, "uniform", "info")
    if command == "train":
        assert (cfg.lr_step, cfg.raw_checkpoints, cfg.resume_from) == (10, True, "3910")
    else:
        assert (cfg.stats.normalization, cfg.stats.gen_strategy, cfg.stats.skip) == (
            ["jacobian"],
            "none",
            1280,
        )


def test_upstream_run_directory_names():
    def run_dir(**kw):
        return upstream.run_subdir(
            config.build({"model": "resnet18_64", "data": "cifar10", **kw}, environ={})
        )

    assert (
        run_dir(label_noise=0.2, augmentation=True)
        == "resnet18_64/cifar10/augmentation/noise-0.2000-seed-42"
    )
    assert run_dir(label_noise=0, seed=1) == "resnet18_64/cifar10/default/seed-1"
    assert run_dir(
        label_noise=0.15,
        model_additions=["batch_norm", "dropout"],
        dropout=0.3,
        l1_regularization=1e-4,
        augmentation=True,
        weight_decay=5e-4,
    ) == (
        "resnet18_64/cifar10/batch_norm-dropout_0.3-l1-0.00010-augmentation-wd_0.0005/noise-0.1500-seed-42"
    )
