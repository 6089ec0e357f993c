"""The upstream README's commands, pasted with `lipdd train` / `lipdd stats` for the scripts and
smaller sizes, on a directory in the real CIFAR-10 on-disk format."""

import io
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_fixture import write_cifar10
from lipdd import cli
from lipdd.data import load_prepared
from lipdd.tracking import get_client
from upstream_reference import (
    upstream_corrupt,
    upstream_model,
    upstream_sample_positions,
    upstream_split,
)

UPSTREAM_METADATA = (
    "model",
    "dataset",
    "split",
    "seed",
    "label-noise",
    "augmentation",
    "checkpoint",
    "nsamples",
    "label-noise-seed",
    "data-split-seed",
    "mc-sample-seed",
    "metric",
    "normalization",
    "sampling-strategy",
)

# Seed values kept, except: --epochs, --train-split, --val-split, width and --num-samples
# (smaller), and --no-verify-checksums (the fixture's bytes are not the real files').
TRAIN = """train --device=cuda --name='test' --save-dir='checkpoints' --data-dir="./data"
--workers=4
  --data="cifar10" --label-noise=0.2 --model="resnet18_2" --optimizer=sgd --batch-size=128
  --epochs=2
  --augmentation --momentum=0.9 --weight-decay=0 --learning-rate=0.005 --lr-warmup-epochs=5
  --lr-warmup-initial=0.001 --seed=42 --train-split=80 --val-split=20 --eval-every=10
  --no-verify-checksums"""
STATS = """stats --device="cuda" --name=test --save-dir=checkpoints --workers=4 --data-dir=./data
  --data=cifar10 --dataset-split=train --label-noise=0.2 --model=resnet18_2 --augmentation --seed 42
  --checkpoint=1 --train-split=80 --val-split=20 --num-samples=40 --batch-size=20
  --metric=jacobian_operator_norm --no-verify-checksums"""
UPSTREAM_DIR = "checkpoints/test/resnet18_2/cifar10/augmentation/noise-0.2000-seed-42"
if not torch.cuda.is_available():  # asking for CUDA where there is none is an error, exit 2
    TRAIN, STATS = (
        c.replace("--device=cuda", "--device=cpu").replace('--device="cuda"', "--device=cpu")
        for c in (TRAIN, STATS)
    )


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, empty_store):
    """The upstream README's training, run once for the module in a project folder of its own."""
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


def test_upstream_train_command(trained, workdir):
    client, run = trained
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == "resnet18" and run.data.params["width"] == "2"
    assert run.data.params["augmentation"] == "True" and run.data.params["train_split"] == "80"
    prepared = load_prepared(workdir / "data/prepared/cifar10")
    assert {k: len(v.labels) for k, v in prepared.splits.items()} == {
        "train": 80,
        "val": 20,
        "test": 30,
    }
    assert prepared.splits["train"].corrupted.sum() == 16
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0, 2]
    # Upstream's warmup: epoch 1 at lr_warmup_initial, then linear towards learning_rate.
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
    assert lrs == pytest.approx([0.001 + (0.005 - 0.001) * 1 / 5])


def upstream_facts(workdir, run):
    """The training split and its noisy labels as upstream's own calls draw them, with the label
    seed lipdd drew for the run (the upstream command gives none)."""
    train = load_prepared(workdir / "data/prepared/cifar10").splits["train"]
    indices, _ = upstream_split(100, 80, 20, 42)  # --data-split-seed: upstream's default
    assert train.index.tolist() == indices
    label_seed = int(run.data.params["label_seed"])
    assert train.labels.tolist() == upstream_corrupt(train.clean_labels.tolist(), 0.2, label_seed)
    return train


def test_upstream_stats_command(trained, workdir):
    client, run = trained
    assert cli.main(shlex.split(STATS)) == 0
    result = json.loads(
        (workdir / UPSTREAM_DIR / "jacobian_operator_norm-train-checkpoint-1.json").read_text()
    )
    assert set(result) == {
        "stats",
        "batch_means",
        "sample_ids",
        "targets",
        "ground_truths",
        "metadata",
    }
    assert len(result["stats"]) == 40 and all(len(v) == 1 and v[0] > 0 for v in result["stats"])
    meta = result["metadata"]
    assert {k: meta[k] for k in UPSTREAM_METADATA} == {
        "model": "resnet18_2",
        "dataset": "cifar10",
        "split": "train",
        "seed": 42,
        "label-noise": 0.2,
        "augmentation": True,
        "checkpoint": 1,
        "nsamples": 40,
        "label-noise-seed": int(run.data.params["label_seed"]),
        "data-split-seed": 42,
        "mc-sample-seed": 4321,
        "metric": "jacobian_operator_norm",
        "normalization": None,
        "sampling-strategy": "none",
    }
    assert (meta["run_id"], meta["checkpoint_epoch"]) == (run.info.run_id, 2)
    # Upstream's sampler: the split in order, the first --num-samples; targets noisy, ground truths
    # clean.
    train = upstream_facts(workdir, run)
    positions = upstream_sample_positions(80, 20, 40)
    assert result["sample_ids"] == train.index[positions].tolist()
    assert result["targets"] == train.labels[positions].tolist()
    assert result["ground_truths"] == train.clean_labels[positions].tolist()
    assert (workdir / UPSTREAM_DIR / "stats-0.log").read_text().count("(epoch 2)") == 1
    assert [
        m.step
        for m in client.get_metric_history(
            run.info.run_id, "train_jacobian_operator_norm_none_mean"
        )
    ] == [2]


def test_skip_then_num_samples_counts(trained, workdir):
    client, run = trained
    assert cli.main(shlex.split(STATS.replace("--checkpoint=1", "--checkpoint=0 --skip=20"))) == 0
    shard = json.loads(
        (workdir / UPSTREAM_DIR / "jacobian_operator_norm-train-checkpoint-0-id-1.json").read_text()
    )
    positions = upstream_sample_positions(80, 20, 40, skip=20)
    assert positions == list(range(20, 60))
    assert shard["sample_ids"] == upstream_facts(workdir, run).index[positions].tolist()


def test_outname_and_normalizations_over_several_checkpoints_never_share_a_file(trained, workdir):
    argv = shlex.split(
        STATS.replace(
            "--checkpoint=1", "--checkpoint 0 1 --outname=foo --normalization none softmax"
        )
    )
    assert cli.main(argv) == 0
    assert {p.name for p in (workdir / UPSTREAM_DIR).glob("foo-*.json")} == {
        f"foo-jacobian_operator_norm{n}-train-checkpoint-{c}.json"
        for c in (0, 1)
        for n in ("", "-softmax")
    }


def test_runs_differing_only_in_label_noise_never_share_a_directory(trained, workdir):
    assert cli.main(shlex.split(TRAIN.replace("--label-noise=0.2", "--label-noise=0.1"))) == 0
    for noise in ("0.2", "0.1"):
        assert (
            cli.main(shlex.split(STATS.replace("--label-noise=0.2", f"--label-noise={noise}"))) == 0
        )
    files = {
        noise: json.loads(
            (
                workdir
                / f"checkpoints/test/resnet18_2/cifar10/augmentation/noise-{noise}000-seed-42"
                / "jacobian_operator_norm-train-checkpoint-1.json"
            ).read_text()
        )
        for noise in ("0.2", "0.1")
    }
    assert [files[n]["metadata"]["label-noise"] for n in ("0.2", "0.1")] == [0.2, 0.1]
    assert files["0.2"]["metadata"]["run_id"] != files["0.1"]["metadata"]["run_id"]


def export(workdir, *extra):
    keep = [
        a
        for a in shlex.split(STATS)[1:]
        if not a.startswith(
            ("--checkpoint", "--num-samples", "--batch-size", "--metric", "--dataset-split")
        )
    ]
    assert cli.main(["export-checkpoints", *keep, *extra]) == 0


def test_exported_checkpoints_load_into_upstreams_network(trained, workdir):
    export(workdir)
    with zipfile.ZipFile(workdir / UPSTREAM_DIR / "checkpoints.zip") as z:
        assert sorted(z.namelist()) == [
            "checkpoint_0.pt",
            "checkpoint_2.pt",
        ]  # global steps: one step an epoch
        for name in z.namelist():
            saved = torch.load(io.BytesIO(z.read(name)), weights_only=True)
            upstream_model("resnet18", 2).load_state_dict(
                saved["model"]
            )  # strict, as compute_stats.py loads it
            assert saved["trainer"]["iteration"] == int(name[11:-3])
    export(workdir, "--raw-checkpoints=1")
    assert sorted(p.name for p in (workdir / UPSTREAM_DIR / "checkpoints").iterdir()) == [
        "checkpoint_0.pt",
        "checkpoint_2.pt",
    ]


def test_export_then_import_gives_the_same_stats(trained, workdir):
    client, run = trained
    export(workdir)
    theirs = workdir / "checkpoints/imported" / UPSTREAM_DIR.removeprefix("checkpoints/test/")
    theirs.mkdir(parents=True)
    shutil.copy(workdir / UPSTREAM_DIR / "checkpoints.zip", theirs)
    upstream_train = (
        TRAIN.replace("--name='test'", "--name=imported")
        + f" --label-seed={run.data.params['label_seed']}"
    )
    assert cli.main(["import-checkpoints", *shlex.split(upstream_train)[1:]]) == 0
    imported = client.search_runs([client.get_experiment_by_name("imported").experiment_id])
    assert [r.info.status for r in imported] == ["FINISHED"] and "imported_from" in imported[
        0
    ].data.tags
    assert [m.step for m in client.get_metric_history(imported[0].info.run_id, "test_error")] == [
        0,
        2,
    ]
    assert cli.main(shlex.split(STATS)) == 0
    assert cli.main(shlex.split(STATS.replace("--name=test", "--name=imported"))) == 0
    ours, again = (
        json.loads((workdir / d / "jacobian_operator_norm-train-checkpoint-1.json").read_text())
        for d in (UPSTREAM_DIR, theirs)
    )
    assert again["sample_ids"] == ours["sample_ids"] and again["targets"] == ours["targets"]
    assert np.allclose(again["stats"], ours["stats"], rtol=1e-6, atol=0)


def test_checkpoint_flag_without_value_lists_them(trained, capsys):
    argv = [a for a in shlex.split(STATS) if not a.startswith("--checkpoint")] + ["--checkpoint"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [
        "0\tstep 0\tepoch 0\tcheckpoints/epoch_0000.pt",
        "1\tstep 2\tepoch 2\tcheckpoints/epoch_0002.pt",
    ]


def test_ordinal_out_of_range_is_refused(trained, capsys):
    assert cli.main(shlex.split(STATS.replace("--checkpoint=1", "--checkpoint=5"))) == 2
    assert (
        "stats.checkpoint: ordinal 5 is no checkpoint of this run; it has ordinals [0, 1]"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "flags, keys, epochs",
    [
        (
            ["--checkpoint-by-step", "--checkpoint", "2"],
            [2],
            [2],
        ),  # 80 samples, batch 128: one step an epoch
        (
            ["--checkpoint-by-step", "--nsteps-per-epoch", "2", "--checkpoint", "0", "1"],
            [0, 1],
            [0, 2],
        ),  # step // 2
        (["--checkpoint", "1", "0"], [1, 0], [2, 0]),
    ],
)
def test_checkpoints_by_ordinal_and_by_step(trained, workdir, flags, keys, epochs):
    argv = [a for a in shlex.split(STATS) if not a.startswith("--checkpoint")] + flags
    assert cli.main(argv) == 0
    for key, epoch in zip(keys, epochs):
        path = workdir / UPSTREAM_DIR / f"jacobian_operator_norm-train-checkpoint-{key}.json"
        assert json.loads(path.read_text())["metadata"]["checkpoint_epoch"] == epoch


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
    under ONEDNN_MAX_CPU_ISA=AVX2, as it would on an AVX2 CPU, until training left channels-last
    there."""
    shutil.copytree(trained_once, tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        ONEDNN_MAX_CPU_ISA="AVX2", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    )
    argv = shlex.split(
        TRAIN.replace("--name='test'", "--name=avx2").replace("--workers=4", "--workers=1")
    )
    proc = subprocess.run(
        ["lipdd", *argv],
        cwd=tmp_path / "project",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture
def restored_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            h.close()
    root.handlers[:], root.level = handlers, level


def test_logfile_and_upstreams_jacobian_normalization(trained, workdir, restored_logging):
    argv = shlex.split(STATS) + [
        "--normalization",
        "none",
        "jacobian",
        "--logfile=output.log",
        "--log-level=info",
    ]
    assert cli.main(argv) == 0
    none, jacobian = (
        json.loads(
            (
                workdir / UPSTREAM_DIR / f"jacobian_operator_norm{n}-train-checkpoint-1.json"
            ).read_text()
        )
        for n in ("", "-jacobian")
    )
    assert jacobian["stats"] == none["stats"]  # upstream parses it and normalises nothing
    assert (none["metadata"]["normalization"], jacobian["metadata"]["normalization"]) == (
        None,
        "jacobian",
    )
    assert "checkpoint 1 (epoch 2)" in (workdir / UPSTREAM_DIR / "output.log").read_text()


def test_a_random_dataset_trains_and_names_its_results(trained, workdir):
    random = (
        TRAIN.replace("--name='test'", "--name=random") + " --random-dataset=jitter --label-seed=1"
    )
    assert cli.main(shlex.split(random)) == 0
    stats = STATS.replace("--name=test", "--name=random") + " --random-dataset=jitter"
    assert cli.main(shlex.split(stats)) == 0
    result = (
        workdir
        / UPSTREAM_DIR.replace("/test/", "/random/")
        / "jacobian_operator_norm-random_jitter-train-checkpoint-1.json"
    )
    assert json.loads(result.read_text())["metadata"]["run_id"] != trained[1].info.run_id
