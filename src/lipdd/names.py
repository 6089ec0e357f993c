"""The metric-naming contract: how every MLflow metric key, summary column and result file that
lipdd writes is spelled, in one place, for the stages that write them (train, stats), the one that
reads them back (report), dvc.yaml's plots and the tests."""

from __future__ import annotations

SPLITS = ("train", "val", "test")
# "jacobian" is the seed's: it parses it and normalises nothing, so it is the logits' Jacobian
NORMALIZATIONS = ("none", "softmax", "logsoftmax", "crossentropy", "jacobian")

# --- training: per batch (step = global step) and per evaluation (step = epoch) ------------------
BATCH_LOSS = "batch_loss"
# the mean of an epoch's batch losses at step = epoch: the training loss on the evaluations' x-axis
EPOCH_LOSS = "epoch_loss"
LR = "lr"
EVALUATED = ("loss", "accuracy", "error")
# accuracy on the corrupted training samples against their noisy labels: how much noise was memorised
NOISE = ("train_corrupted_accuracy", "train_clean_accuracy")


def evaluation(split: str, quantity: str) -> str:
    return f"{split}_{quantity}"


def is_evaluation(key: str) -> bool:
    """Whether `key` is one of an evaluation's metrics (what results/train/history.csv holds)."""
    return (
        key in (LR, EPOCH_LOSS)
        or key in NOISE
        or any(key == evaluation(s, q) for s in SPLITS for q in EVALUATED)
    )


# --- stats: per checkpoint (step = epoch) -------------------------------------------------------
# MLflow holds what a researcher charts against epochs and compares across runs; the result files,
# results/stats/metrics.json and history.csv hold every summary.
LOGGED_SUMMARIES = ("mean", "clean_mean", "corrupted_mean")
# The operator norm's largest value over the samples is the empirical lower bound on the Lipschitz
# constant (its mean is the paper's estimate); its 99th percentile says whether one sample makes it.
LOGGED_EXTREMES = ("max", "p99")
SUMMARIES = ("mean", "median", "std", "max", "p99", "clean_mean", "corrupted_mean")


def logged_summaries(measure: str) -> tuple[str, ...]:
    """The summaries of a per-sample measure's statistics that go to MLflow."""
    return LOGGED_SUMMARIES + (LOGGED_EXTREMES if measure == "jacobian_operator_norm" else ())


def logged_probe_summaries(measure: str) -> tuple[str, ...]:
    """The summaries of a probe set's statistics that go to MLflow: the operator norm's (the
    Lipschitz estimate off the training points) and the accuracy's mean; the rest stay in the
    result files and the stats stage's metrics.json and history.csv."""
    if measure == "jacobian_operator_norm":
        return ("mean", "max", "clean_mean", "corrupted_mean")
    return ("mean",) if measure == "accuracy" else ()


def bound_ratio(normalization: str) -> str:
    """The MLflow metric of the Lipschitz upper bound over the largest per-sample operator norm."""
    return (
        "lipschitz_upper_bound"
        + ("" if normalization == "none" else f"_{normalization}")
        + "_over_max"
    )


def stat(measure: str, normalization: str | None = None, target_logit_only: bool = False) -> str:
    """One statistic's name: the measure, then for a Jacobian measure its normalization (and
    `_target` when only the labelled output is differentiated)."""
    if normalization is None:
        return measure
    return f"{measure}_{normalization}" + ("_target" if target_logit_only else "")


def summary_key(split: str, stat_name: str, summary: str) -> str:
    """The MLflow metric of one summary of one statistic on one split, e.g.
    train_jacobian_operator_norm_softmax_mean."""
    return f"{split}_{stat_name}_{summary}"


def probe_key(probe: str, stat_name: str, summary: str) -> str:
    """The MLflow metric of one summary of one statistic on one probe set (lipdd.probes), e.g.
    probe_between_jacobian_operator_norm_none_mean."""
    return f"probe_{probe}_{stat_name}_{summary}"


def parse_summary_key(key: str) -> tuple[str, str, str] | None:
    """(split, statistic, summary) of a summary_key, or None for any other metric."""
    split, _, rest = key.partition("_")
    if split not in SPLITS:
        return None
    for summary in sorted(SUMMARIES, key=len, reverse=True):  # corrupted_mean before mean
        if rest.endswith("_" + summary):
            return split, rest[: -len(summary) - 1], summary
    return None


def result_file(
    measure: str,
    normalization: str | None,
    target_logit_only: bool,
    split: str | None,
    checkpoint: int,
    uid: int | None = None,
    outname: str | None = None,
    random_dataset: str | None = None,
    probe: str | None = None,
) -> str:
    """The seed's result file name,
    [OUTNAME-]METRIC[-target_only][-random_KIND]-SPLIT-checkpoint-KEY[-id-UID].json
    (KEY: the checkpoint as --checkpoint named it; UID: skip / batch_size, when --skip was given),
    with two additions: a normalization other than none follows METRIC, because one lipdd call
    computes several where the seed computed one, and a probe set follows SPLIT as -probe_NAME.
    Per-network measures have no SPLIT."""
    name = f"{outname}-{measure}" if outname else measure
    if normalization not in (None, "none"):
        name += f"-{normalization}"
    if target_logit_only and normalization != "crossentropy":
        name += "-target_only"
    if random_dataset:
        name += f"-random_{random_dataset}"
    if split:
        name += f"-{split}"
    if probe:
        name += f"-probe_{probe}"
    name += f"-checkpoint-{checkpoint}"
    return name + (f"-id-{uid}" if uid is not None else "") + ".json"


def shard_of(filename: str) -> tuple[str, int] | None:
    """(the name without -id-UID, UID) of a result file of a --skip run, else None."""
    stem, sep, uid = filename.removesuffix(".json").rpartition("-id-")
    return (stem, int(uid)) if sep and uid.isdigit() else None


def batch_means_artifact(split: str, epoch: int, first_batch: int) -> str:
    """MLflow artifact with the per-batch means of every statistic of one checkpoint."""
    return f"stats/{split}/batch_means_epoch{epoch:04d}-{first_batch}.csv"


# --- report: columns of by_width.csv / by_epoch.csv --------------------------------------------
ERRORS = ("train_error", "test_error")
OPNORM = "jacobian_operator_norm"


def opnorm_column(normalization: str, summary: str) -> str:
    return f"opnorm_{normalization}_{summary}"
