"""Nothing lost, nothing let in: bad input, SIGKILL, concurrent writers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lipdd import cli, config, train
from lipdd.tracking import get_client, list_checkpoints
from tiny import TINY_FLAGS


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A directory with prepared digits, a store and one finished run (3 epochs, checkpoints
    0..3)."""
    root = tmp_path_factory.mktemp("robust")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        env = {k: os.environ.pop(k) for k in ("MLFLOW_TRACKING_URI", "DVC_ROOT") if k in os.environ}
        run_id = train.train(
            config.build(
                dict(
                    width=2,
                    label_seed=0,
                    epochs=3,
                    batch_size=256,
                    save_checkpoint=[1],
                    device="cpu",
                ),
                environ={},
            )
        )
        os.environ.update(env)
    finally:
        os.chdir(cwd)
    return root, run_id


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


BAD = [
    # prepare
    ("prepare --label-noise 1.5", "label_noise: 1.5 is not allowed; expected a fraction in [0, 1]"),
    ("prepare --label-noise -0.1", "label_noise: -0.1 is not allowed"),
    (
        "prepare --data mnist",
        "data: 'mnist' is not allowed; expected one of digits, cifar10, cifar100",
    ),
    (
        "prepare --train-split 100",
        "val_split: 0 is not allowed; expected a positive value together with train_split=100",
    ),
    ("prepare --train-split 1200 --val-split 200", "train_split"),
    ("prepare --data cifar10 --data-dir nowhere --no-verify-checksums", "nowhere"),
    ("prepare --label-seed x", "label_seed: 'x' is not a valid int"),
    ("prepare --params missing.yaml", "--params: file 'missing.yaml' does not exist"),
    ("prepare --labelnoise 0.1", "unrecognized arguments: --labelnoise"),
    ("prepare --data-split-seed 1.5", "data_split_seed: '1.5' is not a valid int"),
    # train
    ("train --epochs -1", "epochs: -1 is not allowed"),
    ("train --epochs 2.5", "epochs: '2.5' is not a valid int"),
    ("train --learning-rate 0", "learning_rate: 0.0 is not allowed; expected a positive number"),
    ("train --learning-rate nan", "learning_rate: nan is not allowed"),
    ("train --batch-size 0", "batch_size: 0 is not allowed"),
    ("train --optimizer rmsprop", "optimizer: 'rmsprop' is not allowed; expected one of sgd, adam"),
    ("train --model vgg11", "model: unknown model 'vgg11'"),
    ("train --model cnn5_16 --width 8", "model: 'cnn5_16' says width 16 but width is 8"),
    ("train --model cnn5_0", "width: model 'cnn5_0' with width 0"),
    (
        "train --weight-init fixup",
        "weight_init: 'fixup' is not allowed; expected pytorch or nkaiming for cnn5",
    ),
    ("train --model resnet18 --weight-init fixup --model-additions batch_norm", "with batch_norm"),
    ("train --label-seed -1", "label_seed: -1 is not allowed; expected an integer >= 0"),
    ("train --dropout 1", "dropout: 1.0 is not allowed; expected a rate in [0, 1)"),
    ("train --device tpu", "device: 'tpu' is not allowed; expected cpu, cuda, cuda:N or auto"),
    *(
        []
        if torch.cuda.is_available()
        else [("train --device cuda", "device: 'cuda' asked for, but CUDA is not available here")]
    ),
    (
        "train --save-checkpoint 3 20 --epochs 10",
        "save_checkpoint: [3, 20] is not allowed; expected epochs within 0..10",
    ),
    ("train --momentum 1.5", "momentum: 1.5 is not allowed; expected a number in [0, 1)"),
    ("train --stop-by-accuracy-threshold 2", "stop_by_accuracy_threshold: 2.0 is not allowed"),
    ("train --eval-every 0", "eval_every: 0 is not allowed"),
    (
        "train --resume-from 0123456789abcdef",
        "resume_from: '0123456789abcdef' is not a run in the store",
    ),
    # stats
    (
        "stats --run-id 0123456789abcdef",
        "stats.run_id: '0123456789abcdef' is not a run in the store",
    ),
    (
        "stats --num-samples 150 --batch-size 100",
        "stats.num_samples: 150 is not allowed; expected a positive multiple of "
        "stats.batch_size=100",
    ),
    ("stats --skip 50 --batch-size 100", "stats.skip: 50 is not allowed"),
    (
        "stats --num-samples 200 --batch-size 100 --skip 1200",
        "stats.num_samples: 200 samples from position 1200 are more than the 1297 samples of "
        "split 'train'",
    ),
    (
        "stats --checkpoint 9",
        "stats.checkpoint: ordinal 9 is no checkpoint of this run; it has ordinals [0, 1, 2, 3]",
    ),
    (
        "stats --checkpoint-by-step --checkpoint 7",
        "stats.checkpoint: step 7 is no checkpoint of this run; it has steps [0, 6, 12, 18]",
    ),
    ("stats --metric lipschitz", "stats.metric: 'lipschitz' is not allowed"),
    ("stats --normalization sigmoid", "stats.normalization: 'sigmoid' is not allowed"),
    ("stats --dataset-split holdout", "stats.dataset_split: 'holdout' is not allowed"),
    ("stats --dataset-split val", "stats.dataset_split: 'val' does not exist for this run"),
    (
        "stats --num-samples 5000 --batch-size 100",
        "stats.num_samples: 5000 samples from position 0 are more than the 1297 samples",
    ),
    ("stats --seed 7", "stats.run_id: no finished run in experiment 'lipdd' has"),
    (
        "import-checkpoints --label-noise 0",
        "import: no checkpoint_STEP.pt in "
        "results/runs/lipdd/cnn5_2/digits/default/seed-42/checkpoints.zip",
    ),
    (
        "import-checkpoints",
        "label_seed: upstream drew this run's noisy labels from fresh randomness",
    ),
]


@pytest.mark.parametrize("command, message", BAD, ids=[c for c, _ in BAD])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(
    trained, monkeypatch, capsys, command, message
):
    root, run_id = trained
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    command, *args = command.split()
    identify = (
        ["--width", "2"] if command in ("stats", "import-checkpoints") else []
    )  # the run the stats cases refer to
    before = snapshot(root)
    try:
        status = cli.main([command, "--device", "cpu", *identify, *args])
    except SystemExit as e:  # argparse's own refusals
        status = e.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert message in err
    assert snapshot(root) == before
    assert len(get_client(f"sqlite:///{root}/mlflow.db").search_runs(["1"])) == 1


def lipdd(*args, cwd, **kw):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME")
    }
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "lipdd", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def last_weights(client, run_id):
    epoch, path = list_checkpoints(client, run_id)[-1]
    with tempfile.TemporaryDirectory() as tmp:
        return epoch, torch.load(client.download_artifacts(run_id, path, tmp), weights_only=True)[
            "model"
        ]


def test_sigkill_mid_epoch_then_the_same_command_finishes_the_same_run(workdir):
    args = [
        "train",
        *TINY_FLAGS,
        "--epochs",
        "12",
        "--save-checkpoint",
        "2",
        "--seed",
        "3",
        "--augmentation",
    ]
    reference = lipdd(*args, cwd=workdir)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    (ref,) = client.search_runs(["1"])

    victim = lipdd(*args, cwd=workdir)
    deadline = time.time() + 300
    while True:  # kill once a checkpoint past the first exists, i.e. in the middle of training
        runs = [r for r in client.search_runs(["1"]) if r.info.run_id != ref.info.run_id]
        if runs and len(list_checkpoints(client, runs[0].info.run_id)) >= 3:
            break
        assert victim.poll() is None and time.time() < deadline, (
            "training ended before it could be killed"
        )
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (killed,) = runs
    assert (
        client.get_run(killed.info.run_id).info.status == "RUNNING"
    )  # SIGKILL leaves no time to say

    again = lipdd(*args, cwd=workdir)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    assert f"resuming run {killed.info.run_id}" in out
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    (e1, w1), (e2, w2) = (
        last_weights(client, ref.info.run_id),
        last_weights(client, killed.info.run_id),
    )
    assert e1 == e2 == 12 and all(torch.equal(w1[k], w2[k]) for k in w1)
    for key in ("batch_loss", "train_loss", "test_accuracy", "lr"):
        got = [(m.step, m.value) for m in client.get_metric_history(killed.info.run_id, key)]
        want = [(m.step, m.value) for m in client.get_metric_history(ref.info.run_id, key)]
        assert sorted(got) == sorted(want), key


def test_four_concurrent_trainings_share_one_sqlite_store(workdir):
    """As `dvc queue start -j 4` does: no run lost, no metric step lost, no lock error."""
    train.datalib.ensure_prepared(config.build({}, environ={}))
    shutil.copy(workdir / "mlflow.db", workdir / "empty.db")
    (workdir / "mlflow.db").unlink()  # a fresh store: its creation is contended too
    procs = [
        lipdd(
            "train",
            *TINY_FLAGS,
            "--epochs",
            "3",
            "--loss-checkpoint",
            "1",
            "--seed",
            str(seed),
            cwd=workdir,
        )
        for seed in range(4)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs(["1"])
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2", "3"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "batch_loss")] == list(
            range(1, 19)
        )  # ceil(1297 / 256) = 6 steps an epoch
        assert [m.step for m in client.get_metric_history(r.info.run_id, "test_error")] == [0, 3]


def test_stats_never_overwrite_another_runs_results(workdir, capsys):
    """Runs that differ only in a parameter the upstream layout does not name (here the learning
    rate)
    share its directory: the second run's stats are refused there, and written where asked."""
    run = [
        train.train(
            config.build(
                dict(
                    width=2,
                    label_seed=0,
                    epochs=1,
                    batch_size=256,
                    save_checkpoint=[1],
                    device="cpu",
                    learning_rate=lr,
                ),
                environ={},
            )
        )
        for lr in (0.01, 0.02)
    ]
    stats = [
        "stats",
        "--device",
        "cpu",
        "--metric",
        "accuracy",
        "--num-samples",
        "100",
        "--batch-size",
        "100",
        "--probes",
        "between",
    ]
    assert cli.main([*stats, "--run-id", run[0]]) == 0
    before = snapshot(workdir / "results")
    capsys.readouterr()
    assert cli.main([*stats, "--run-id", run[1]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"of run {run[0]}, and this is run {run[1]}" in err, err
    assert snapshot(workdir / "results") == before
    assert cli.main([*stats, "--run-id", run[1], "--output-dir", "results/second"]) == 0
    assert (
        cli.main([*stats, "--run-id", run[0]]) == 0
    )  # a run's own results: measured again in place
