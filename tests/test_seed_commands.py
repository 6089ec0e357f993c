"""The seed README's commands, pasted with `lipdd train` / `lipdd stats` for the scripts and
smaller sizes, on a directory in the real CIFAR-10 on-disk format."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cifar_fixture import write_cifar10
from lipdd import cli
from lipdd.data import load_prepared
from lipdd.tracking import get_client

# Seed values kept, except: --epochs, --train-split, --val-split, width and --num-samples
# (smaller), and --no-verify-checksums (the fixture's bytes are not the real files').
TRAIN = """train --device=cuda --name='test' --save-dir='checkpoints' --data-dir="./data" --workers=4
  --data="cifar10" --label-noise=0.2 --model="resnet18_2" --optimizer=sgd --batch-size=128 --epochs=2
  --augmentation --momentum=0.9 --weight-decay=0 --learning-rate=0.005 --lr-warmup-epochs=5
  --lr-warmup-initial=0.001 --seed=42 --train-split=80 --val-split=20 --eval-every=10
  --no-verify-checksums"""
STATS = """stats --device="cuda" --name=test --save-dir=checkpoints --workers=4 --data-dir=./data
  --data=cifar10 --dataset-split=train --label-noise=0.2 --model=resnet18_2 --augmentation --seed 42
  --checkpoint=1 --train-split=80 --val-split=20 --num-samples=40 --batch-size=20
  --metric=jacobian_operator_norm --no-verify-checksums"""
SEED_DIR = "checkpoints/test/resnet18_2/cifar10/augmentation/seed-42"


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, empty_store):
    """The seed README's training, run once for the module in a project folder of its own."""
    project = tmp_path_factory.mktemp("trained")
    shutil.copy(empty_store, project / "mlflow.db")
    write_cifar10(project / "data", n_train_per_batch=20, n_test=30)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
            mp.delenv(var, raising=False)
        assert cli.main(shlex.split(TRAIN)) == 0
    return project


@pytest.fixture
def trained(trained_once, workdir):
    """That training's project (store, data, results) copied into this test's working directory;
    its artifacts stay in the module's folder, where tests only add stats tables."""
    shutil.copytree(trained_once, workdir, dirs_exist_ok=True)
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    return client, run


def test_seed_train_command(trained, workdir):
    client, run = trained
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "resnet18" and run.data.params["width"] == "2"
    assert run.data.params["augmentation"] == "True" and run.data.params["train_split"] == "80"
    prepared = load_prepared(workdir / "data/prepared/cifar10")
    assert {k: len(v.labels) for k, v in prepared.splits.items()} == {"train": 80, "val": 20, "test": 30}
    assert prepared.splits["train"].corrupted.sum() == 16
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0, 2]
    # The seed's warmup: epoch 1 at lr_warmup_initial, then linear towards learning_rate.
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert lrs == pytest.approx([0.001 + (0.005 - 0.001) * 1 / 5])


def test_seed_stats_command(trained, workdir):
    client, run = trained
    assert cli.main(shlex.split(STATS)) == 0
    out = workdir / SEED_DIR / "jacobian_operator_norm_none_train_epoch0002-0.json"
    result = json.loads(out.read_text())
    assert set(result) == {"stats", "batch_means", "sample_ids", "targets", "ground_truths", "metadata"}
    assert len(result["stats"]) == 40 and all(v > 0 for v in result["stats"])
    meta = result["metadata"]
    assert (meta["run_id"], meta["checkpoint_epoch"], meta["metric"], meta["normalization"]) == (
        run.info.run_id, 2, "jacobian_operator_norm", "none")
    assert (meta["model"], meta["dataset"], meta["label_noise"], meta["augmentation"]) == (
        "resnet18_2", "cifar10", 0.2, True)
    # The samples are the first 40 of the mc_sample_seed order; targets noisy, ground truths clean.
    train = load_prepared(workdir / "data/prepared/cifar10").splits["train"]
    order = np.random.default_rng(0).permutation(80)[:40]
    assert result["sample_ids"] == train.index[order].tolist()
    assert result["targets"] == train.labels[order].tolist()
    assert result["ground_truths"] == train.clean_labels[order].tolist()
    assert (workdir / SEED_DIR / "stats-0.log").read_text().count("epoch 2") == 1
    assert [m.step for m in client.get_metric_history(
        run.info.run_id, "train_jacobian_operator_norm_none_mean")] == [2]


def test_skip_selects_the_next_shard(trained, workdir):
    assert cli.main(shlex.split(STATS.replace("--checkpoint=1", "--checkpoint=0 --skip=20"))) == 0
    shard = json.loads((workdir / SEED_DIR / "jacobian_operator_norm_none_train_epoch0000-1.json").read_text())
    train = load_prepared(workdir / "data/prepared/cifar10").splits["train"]
    assert shard["sample_ids"] == train.index[np.random.default_rng(0).permutation(80)[20:40]].tolist()


def test_export_checkpoints_writes_the_seed_zip(trained, workdir, capsys):
    argv = shlex.split(STATS)
    keep = [a for a in argv[1:] if not a.startswith(("--checkpoint", "--num-samples", "--batch-size",
                                                     "--metric", "--dataset-split"))]
    assert cli.main(["export-checkpoints", *keep]) == 0
    with zipfile.ZipFile(workdir / SEED_DIR / "checkpoints.zip") as z:
        assert sorted(z.namelist()) == ["checkpoints/", "checkpoints/epoch_0000.pt", "checkpoints/epoch_0002.pt"]


def test_checkpoint_flag_without_value_lists_them(trained, capsys):
    argv = [a for a in shlex.split(STATS) if not a.startswith("--checkpoint")] + ["--checkpoint"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == ["0\tepoch 0\tcheckpoints/epoch_0000.pt",
                                                    "1\tepoch 2\tcheckpoints/epoch_0002.pt"]


def test_ordinal_out_of_range_is_refused(trained, capsys):
    assert cli.main(shlex.split(STATS.replace("--checkpoint=1", "--checkpoint=5"))) == 2
    assert "stats.checkpoint: ordinal 5 is out of range; the run has 2 checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize("flags, epochs", [
    (["--checkpoint-by-step", "--checkpoint", "2"], [2]),  # 80 samples, batch 128: one step an epoch
    (["--checkpoint-by-step", "--nsteps-per-epoch", "2", "--checkpoint", "0", "4"], [0, 2]),
    (["--checkpoint", "1", "0"], [2, 0]),
])
def test_checkpoints_by_ordinal_and_by_step(trained, workdir, flags, epochs):
    argv = [a for a in shlex.split(STATS) if not a.startswith("--checkpoint")] + flags
    assert cli.main(argv) == 0
    written = sorted((workdir / SEED_DIR).glob("jacobian_operator_norm_none_train_epoch*-0.json"))
    assert [json.loads(p.read_text())["metadata"]["checkpoint_epoch"] for p in written] == sorted(epochs)


def test_a_moved_store_is_named(trained, workdir, capsys):
    (workdir / "mlflow.db").rename(workdir / "elsewhere.db")
    assert cli.main(shlex.split(STATS)) == 2
    err = capsys.readouterr().err
    assert f"the MLflow store {workdir / 'mlflow.db'} does not exist" in err
    assert not (workdir / "mlflow.db").exists()


def test_a_named_experiment_is_never_overridden_by_the_pipelines_run(trained, workdir, capsys):
    """results/train/run.json names the run of experiment `test`; stats asked for experiment
    `other` (same identifying flags) must not take it."""
    assert json.loads((workdir / "results/train/run.json").read_text())["experiment_name"] == "test"
    assert cli.main(shlex.split(STATS.replace("--name=test", "--name=other"))) == 2
    assert "no finished run in experiment 'other'" in capsys.readouterr().err
    assert not (workdir / "checkpoints/other").exists()


def test_narrow_resnets_train_under_onednn_avx2(trained_once, tmp_path):
    """oneDNN's AVX2 kernel of a strided 1x1 convolution's weight gradient writes out of bounds on
    channels-last inputs of fewer than 8 channels (oneDNN #6035): this training crashed or hung
    under ONEDNN_MAX_CPU_ISA=AVX2, as it would on an AVX2 CPU, until training left channels-last there."""
    shutil.copytree(trained_once, tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(ONEDNN_MAX_CPU_ISA="AVX2", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    argv = shlex.split(TRAIN.replace("--name='test'", "--name=avx2").replace("--workers=4", "--workers=1"))
    proc = subprocess.run(["lipdd", *argv], cwd=tmp_path / "project", env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
