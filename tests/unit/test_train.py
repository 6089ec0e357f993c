"""Training semantics with exact expectations, against a real MLflow store in a temp dir."""

import tempfile
from pathlib import Path

import pytest
import torch

from lipdd import config, train
from lipdd.errors import CheckpointError, ConfigError
from lipdd.tracking import get_client, list_checkpoints

FAST = dict(
    width=2,
    label_seed=0,
    epochs=6,
    batch_size=256,
    eval_every=2,
    save_checkpoint=[3],
    device="cpu",
    optimizer="sgd",
    learning_rate=0.05,
)


def make(**overrides):
    return config.build({**FAST, **overrides}, environ={})


def final_weights(run_id):
    """(epoch, state) of the run's last checkpoint, from the store in the cwd."""
    client = get_client(f"sqlite:///{Path.cwd()}/mlflow.db")
    epoch, path = list_checkpoints(client, run_id)[-1]
    with tempfile.TemporaryDirectory() as tmp:
        return epoch, torch.load(client.download_artifacts(run_id, path, tmp), weights_only=True)


def test_learning_rate_warmup_then_step_decay():
    cfg = config.build(
        dict(
            learning_rate=0.1,
            lr_warmup_epochs=4,
            lr_warmup_initial=0.02,
            lr_step=3,
            lr_decay_rate=0.5,
            epochs=12,
        ),
        environ={},
    )
    got = [train.learning_rate(cfg, e) for e in range(1, 13)]
    want = [0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]
    assert got == pytest.approx(want, rel=1e-12)


def test_learning_rate_constant_without_schedule():
    cfg = config.build(dict(learning_rate=0.3), environ={})
    assert {train.learning_rate(cfg, e) for e in range(1, 50)} == {0.3}


@pytest.mark.parametrize(
    "save, epochs, want",
    [
        ([0], 10, {0, 10}),
        ([5], 12, {0, 5, 10, 12}),
        ([1, 3, 7], 10, {1, 3, 7}),
    ],
)
def test_checkpoint_epochs(save, epochs, want):
    assert train.checkpoint_epochs(save, epochs) == want


@pytest.mark.parametrize("save, want", [([0], [0, 6]), ([3], [0, 3, 6]), ([1, 3, 5], [1, 3, 5])])
def test_checkpoints_saved_in_the_run(workdir, save, want):
    run_id = train.train(make(save_checkpoint=save))
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    assert [e for e, _ in list_checkpoints(client, run_id)] == want


def test_early_exit_stops_at_first_evaluation_past_threshold(workdir):
    cfg = make(
        epochs=40,
        eval_every=2,
        early_exit_loss=True,
        stop_by_loss_threshold=2.0,
        optimizer="adam",
        learning_rate=0.01,
        width=4,
    )
    run_id = train.train(cfg)
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    losses = client.get_metric_history(run_id, "train_loss")
    steps = [m.step for m in losses]
    assert steps == list(range(0, steps[-1] + 1, 2))
    assert losses[-1].value <= 2.0 and all(m.value > 2.0 for m in losses[1:-1])
    assert steps[-1] < 40
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["epochs_trained"] == str(steps[-1])
    assert [e for e, _ in list_checkpoints(client, run_id)][-1] == steps[-1]


def test_same_seed_gives_bitwise_identical_checkpoints(workdir):
    a, b = train.train(make()), train.train(make())
    (ea, sa), (eb, sb) = final_weights(a), final_weights(b)
    assert ea == eb == 6
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    c = train.train(make(seed=7))
    _, sc = final_weights(c)
    assert not all(torch.equal(sa["model"][k], sc["model"][k]) for k in sa["model"])


def test_resume_after_interruption_is_bitwise_identical(workdir, monkeypatch):
    cfg = make(augmentation=True, optimizer="adam", learning_rate=0.01)
    reference = train.train(cfg)

    real_lr = train.learning_rate

    def interrupted(cfg, epoch):  # the process dies during epoch 5, after the epoch-3 checkpoint
        if epoch == 5:
            raise KeyboardInterrupt
        return real_lr(cfg, epoch)

    monkeypatch.setattr(train, "learning_rate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    monkeypatch.setattr(train, "learning_rate", real_lr)
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    broken = [r for r in client.search_runs(["1"]) if r.info.status == "KILLED"]
    assert len(broken) == 1
    run_id = broken[0].info.run_id

    assert (
        train.train(
            config.build(
                {
                    **FAST,
                    "augmentation": True,
                    "optimizer": "adam",
                    "learning_rate": 0.01,
                    "resume_from": run_id,
                },
                environ={},
            )
        )
        == run_id
    )
    (e1, ref), (e2, resumed) = final_weights(reference), final_weights(run_id)
    assert e1 == e2 == 6
    assert all(torch.equal(ref["model"][k], resumed["model"][k]) for k in ref["model"])
    assert client.get_run(run_id).info.status == "FINISHED"

    # No duplicated steps, and the same loss history as the uninterrupted run.
    def hist(rid, key):
        return [(m.step, m.value) for m in client.get_metric_history(rid, key)]

    for key in ("batch_loss", "train_loss", "test_accuracy"):
        assert sorted(hist(run_id, key)) == sorted(hist(reference, key))


def test_resume_refuses_different_parameters(workdir):
    run_id = train.train(make())
    with pytest.raises(ConfigError, match="learning_rate"):
        train.train(make(resume_from=run_id, learning_rate=0.5))


def test_a_killed_run_is_continued_by_the_same_command(workdir, monkeypatch):
    """Started again with the same parameters, training continues the interrupted run."""
    real_lr = train.learning_rate
    monkeypatch.setattr(
        train,
        "learning_rate",
        lambda c, e: (_ for _ in ()).throw(KeyboardInterrupt) if e == 5 else real_lr(c, e),
    )
    with pytest.raises(KeyboardInterrupt):
        train.train(make())
    monkeypatch.setattr(train, "learning_rate", real_lr)
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    (killed,) = client.search_runs(["1"])
    assert train.train(make()) == killed.info.run_id
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "batch_loss")]
    assert steps == list(range(1, 6 * 6 + 1))  # ceil(1297 / 256) = 6 steps per epoch, none repeated


def test_divergence_fails_the_run_and_keeps_the_last_good_checkpoint(workdir, capsys):
    from lipdd import cli

    argv = [
        "train",
        "--width",
        "2",
        "--epochs",
        "6",
        "--save-checkpoint",
        "1",
        "--device",
        "cpu",
        "--optimizer",
        "sgd",
        "--learning-rate",
        "1e12",
        "--batch-size",
        "256",
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training diverged: loss" in err[0] and "at epoch 1, step" in err[0]
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs(["1"])
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["error"]
    assert [e for e, _ in list_checkpoints(client, run.info.run_id)] == [0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_error")] == [0]
    # A diverged run is not resumed: the same command starts afresh (and diverges again).
    assert cli.main(argv) == 1
    assert len(client.search_runs(["1"])) == 2


def test_a_checkpoint_that_would_run_code_is_refused(workdir, tmp_path):
    """weights_only loading: the pickle's payload never executes."""
    import pickle

    from lipdd import tracking

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    run_id = train.train(make(epochs=1))
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    evil = tmp_path / "evil" / "epoch_0009.pt"
    evil.parent.mkdir()
    torch.save({"model": Payload()}, evil, pickle_module=pickle)
    client.log_artifact(run_id, str(evil), "checkpoints")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        tracking.load_checkpoint(client, run_id, "checkpoints/epoch_0009.pt")
    assert not marker.exists()
    truncated = tmp_path / "evil" / "epoch_0010.pt"
    truncated.write_bytes((workdir / "mlflow.db").read_bytes()[:100])
    client.log_artifact(run_id, str(truncated), "checkpoints")
    with pytest.raises(CheckpointError, match="epoch_0010.pt of run"):
        tracking.load_checkpoint(client, run_id, "checkpoints/epoch_0010.pt")


def test_compiled_training_is_the_same_training(workdir):
    """torch.compile fuses kernels, so rounding differs, but every step (the short last batch of
    each epoch included, which compiles a second graph) follows the eager trajectory."""
    eager, compiled = (
        train.train(make(epochs=2, augmentation=True, compile=c)) for c in (False, True)
    )
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    losses = [
        [m.value for m in client.get_metric_history(r, "batch_loss")] for r in (eager, compiled)
    ]
    assert len(losses[0]) == len(losses[1]) == 2 * 6  # 1,437 training images in batches of 256
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_compile_without_a_cpp_compiler_is_refused(workdir, monkeypatch, capsys):
    from lipdd import cli

    monkeypatch.setenv("PATH", str(workdir))  # no g++, no c++
    monkeypatch.delenv("CXX", raising=False)
    assert cli.main(["train", "--compile", "--device", "cpu", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("lipdd train: error: compile: torch.compile on the CPU needs a C++ compiler")
        and "\n" not in err
    )
    assert get_client(f"sqlite:///{workdir}/mlflow.db").search_runs(["0"]) == []


def test_system_metrics_are_mlflows_own_and_can_be_turned_off(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    run_id = train.train(make(epochs=40, width=8))
    history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert history and all(0 <= m.value <= 100 * torch.get_num_threads() for m in history)
    assert "system/system_memory_usage_megabytes" in client.get_run(run_id).data.metrics
    quiet = train.train(make(epochs=40, width=8, system_metrics=False, seed=1))
    assert not any(k.startswith("system/") for k in client.get_run(quiet).data.metrics)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_precision_applies_to_the_training_steps_only(workdir, precision):
    """Seen from inside every forward pass of the network: bf16 autocasts the training steps, tf32
    sets CUDA's float32 products and convolutions to TF32 during them; evaluations run in IEEE
    fp32 without autocast, and so does whatever runs after the training."""
    seen = []

    def record(module, args, output):
        if type(module).__name__ == "CNN5":
            seen.append(
                (
                    torch.is_grad_enabled(),  # training step, not an evaluation
                    torch.is_autocast_enabled("cpu"),
                    torch.backends.cudnn.conv.fp32_precision,
                    torch.backends.cuda.matmul.fp32_precision,
                )
            )

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run_id = train.train(make(epochs=2, precision=precision))
    finally:
        handle.remove()
    steps = {s[1:] for s in seen if s[0]}
    evaluations = {s[1:] for s in seen if not s[0]}
    mode = "tf32" if precision == "tf32" else "ieee"
    assert steps == {(precision == "bf16", mode, mode)}
    assert evaluations == {(False, "ieee", "ieee")}
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    run = client.get_run(run_id)
    assert run.data.params["precision"] == precision
    assert (run.data.tags["device_requested"], run.data.tags["device"]) == ("cpu", "cpu")
    if precision == "bf16":  # bf16 rounds: another trajectory than fp32's
        fp32 = client.get_run(train.train(make(epochs=2)))
        assert run.data.metrics["epoch_loss"] != fp32.data.metrics["epoch_loss"]


def test_sigusr1_checkpoints_at_the_end_of_the_epoch_and_the_same_command_continues(
    workdir, monkeypatch
):
    """A scheduler's warning (SLURM's --signal=USR1@60) during epoch 4: the training finishes
    that epoch, checkpoints it (save_checkpoint asks only for 3), stops with its run KILLED, and
    the same command continues from epoch 4 to the uninterrupted run's very weights."""
    import os
    import signal

    cfg = make(augmentation=True, optimizer="adam", learning_rate=0.01)
    reference = train.train(cfg)
    real_lr = train.learning_rate

    def warned_in_epoch_4(cfg, epoch):
        if epoch == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_lr(cfg, epoch)

    monkeypatch.setattr(train, "learning_rate", warned_in_epoch_4)
    with pytest.raises(KeyboardInterrupt, match="SIGUSR1: checkpointed at epoch 4"):
        train.train(cfg)
    monkeypatch.setattr(train, "learning_rate", real_lr)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handler restored
    client = get_client(f"sqlite:///{workdir}/mlflow.db")
    (killed,) = [r for r in client.search_runs(["1"]) if r.info.status == "KILLED"]
    assert [e for e, _ in list_checkpoints(client, killed.info.run_id)] == [0, 3, 4]
    assert train.train(cfg) == killed.info.run_id
    (e1, ref), (e2, resumed) = final_weights(reference), final_weights(killed.info.run_id)
    assert e1 == e2 == 6
    assert all(torch.equal(ref["model"][k], resumed["model"][k]) for k in ref["model"])
