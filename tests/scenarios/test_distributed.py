"""Past one process: `lipdd stats` and `lipdd train` under torchrun (gloo, 2 CPU processes),
and `lipdd stats --merge` joining the shard files of --skip jobs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lipdd import cli, config
from lipdd.tracking import get_client, list_checkpoints
from stats_results import assert_same_results, results

BIN = Path(sys.executable).parent
# 250 samples in 5 batches: the 2 ranks get 2 and 3 batches.
STATS = [
    "--num-samples=250",
    "--batch-size=50",
    "--metric",
    "jacobian_operator_norm",
    "accuracy",
    # per network, dealt out to the two ranks: distance_from_init and output_margin to rank 0,
    # lipschitz_upper_bound to rank 1
    "distance_from_init",
    "lipschitz_upper_bound",
    "output_margin",
    "--curvature-samples=100",
    "--normalization",
    "none",
    "softmax",
    "--device=cpu",
]
# SGD, whose steps scale with the gradient (Adam's do not), so a wrongly averaged gradient shows.
DDP_TRAIN = [
    "--width=2",
    "--label-seed=0",
    "--epochs=4",
    "--batch-size=128",
    "--eval-every=2",
    "--save-checkpoint=2",
    "--device=cpu",
    "--optimizer=sgd",
    "--learning-rate=0.01",
    "--augmentation",
]


def run(*commands, cwd) -> list[str]:
    """Commands started at once, as a user runs them: the venv's tools, no tracking URI (the
    default store of `cwd`), one thread per process; their outputs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in config.ENV_VARS and not k.startswith("MLFLOW_")
    }
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c in commands
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for c, p, (out, err) in zip(commands, procs, outs):
        assert p.returncode == 0, f"`{' '.join(c)}` exited with {p.returncode}\n{out}\n{err}"
    return [out for out, _ in outs]


def torchrun(*args, cwd) -> str:
    return run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", *args], cwd=cwd)[0]


@pytest.fixture
def run_id(tiny_run):
    return tiny_run


def test_stats_under_torchrun_equal_one_process(workdir, run_id):
    out = torchrun(
        "-m", "lipdd", "stats", "--run-id", run_id, *STATS, "--output-dir=two", cwd=workdir
    )
    two = results(workdir / "two")
    assert len(two) == 12  # (3 statistics + 3 per-network measures) x 2 checkpoints
    assert sorted(out.split()) == [f"two/{name}" for name in two]  # rank 0 alone writes and prints
    two_summary = json.loads((workdir / "results/stats/metrics.json").read_text())
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    logged = [
        k
        for k in client.get_run(run_id).data.metrics
        if k.startswith(("train_jacobian", "train_accuracy_"))
    ]
    assert {"train_jacobian_operator_norm_softmax_mean", "train_accuracy_clean_mean"} <= set(logged)
    for key in logged:  # one entry per checkpoint: rank 0 alone logs
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [0, 2], key
    # The per-batch means of the 5 batches, in each result file and in one table per checkpoint.
    result = two["jacobian_operator_norm-train-checkpoint-1.json"]
    values = [v for (v,) in result["stats"]]
    assert result["batch_means"] == pytest.approx(
        [sum(values[i : i + 50]) / 50 for i in range(0, 250, 50)]
    )
    table = client.download_artifacts(
        run_id, "stats/train/batch_means_epoch0002-0.csv", str(workdir)
    )
    rows = [line.split(",") for line in Path(table).read_text().splitlines()[1:]]
    assert [float(m) for name, b, m in rows if name == "jacobian_operator_norm_none"] == result[
        "batch_means"
    ]

    assert cli.main(["stats", "--run-id", run_id, *STATS, "--output-dir=one"]) == 0
    assert_same_results(two, results(workdir / "one"))
    one_summary = json.loads((workdir / "results/stats/metrics.json").read_text())
    assert two_summary.keys() == one_summary.keys()
    for name, summary in one_summary.items():
        assert two_summary[name] == (
            pytest.approx(summary, rel=1e-6) if isinstance(summary, dict) else summary
        )


def test_ddp_training_runs_to_the_end_in_one_run(workdir):
    torchrun(
        str(BIN / "lipdd"), "train", *DDP_TRAIN, cwd=workdir
    )  # the console script, as a user types it
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("lipdd").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["epochs_trained"] == "4"
    assert [e for e, _ in list_checkpoints(client, run_id)] == [0, 2, 4]
    losses = client.get_metric_history(run_id, "batch_loss")
    assert [m.step for m in losses] == list(
        range(1, 4 * 11 + 1)
    )  # 1,297 samples: 11 global batches an epoch
    assert all(math.isfinite(m.value) for m in losses)
    evaluated = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in evaluated] == [0, 2, 4]
    assert evaluated[2].value < evaluated[1].value < evaluated[0].value

    # The global batches are one process's (test_data checks the loader's slices), so the first
    # losses are one process's up to float32 summation order: each side sums 128 non-negative
    # per-sample losses in some order, within (128 - 1) * 2**-24 of the exact sum, relatively.
    # Step 2 adds the rounding of the averaged gradient, times the learning rate: orders smaller.
    # Later steps are not compared: rounding differences grow through the training, by how much
    # depends on the CPU's kernels.
    assert cli.main(["train", *DDP_TRAIN]) == 0
    single = client.search_runs([run.info.experiment_id], order_by=["attributes.start_time DESC"])[
        0
    ].info.run_id
    assert single != run_id
    want = [m.value for m in client.get_metric_history(single, "batch_loss")]
    assert [m.value for m in losses[:2]] == pytest.approx(want[:2], rel=2 * 127 * 2**-24, abs=0)


def test_batch_size_must_divide_over_the_world(workdir, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "--batch-size=255", "--epochs=1", "--width=2", "--device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("lipdd train: error: batch_size: 255 does not divide over world size 2")
        and "\n" not in err
    )
    assert (
        get_client(f"sqlite:///{workdir}/mlflow.db").get_experiment_by_name("lipdd") is None
    )  # no run


def test_merge_joins_skip_shards_into_one_process_result(workdir, run_id, capsys):
    """Shards computed one after another here (test_slurm runs them as independent jobs)."""
    job = ["stats", "--run-id", run_id, *STATS, "--output-dir=shards"]
    for skip, n in ((0, 100), (100, 150)):  # samples 0..99 and 100..249
        assert cli.main([*job, f"--skip={skip}", f"--num-samples={n}"]) == 0
    assert sorted(results(workdir / "shards"))[:2] == [
        "accuracy-train-checkpoint-0-id-0.json",
        "accuracy-train-checkpoint-0-id-2.json",
    ]
    capsys.readouterr()
    merge = ["stats", "--merge", "--run-id", run_id, "--output-dir=shards"]
    assert cli.main(merge) == 0
    assert len(capsys.readouterr().out.split()) == 6
    assert cli.main(["stats", "--run-id", run_id, *STATS, "--output-dir=one"]) == 0
    assert_same_results(results(workdir / "shards"), results(workdir / "one"), shards=True)
    capsys.readouterr()
    assert cli.main(merge) == 0 and capsys.readouterr().out == ""  # merged already: nothing to do

    # Overlapping shards are refused, on one line.
    for skip, n in ((0, 100), (50, 150)):
        assert (
            cli.main(
                [
                    "stats",
                    "--run-id",
                    run_id,
                    *STATS,
                    f"--skip={skip}",
                    f"--num-samples={n}",
                    "--output-dir=overlap",
                ]
            )
            == 0
        )
    capsys.readouterr()
    assert cli.main([*merge[:-1], "--output-dir=overlap"]) == 2
    err = capsys.readouterr().err.strip()
    assert "must be contiguous and must not overlap" in err and "\n" not in err
