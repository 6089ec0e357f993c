"""lipdd's vocabulary, in one place: the values each choice parameter may take, and how every
MLflow metric key, summary column and artifact that lipdd writes is spelled, for the stages that
write them (train, stats), the one that reads them back (report), dvc.yaml's plots and the tests."""

from __future__ import annotations

SOURCES = ("digits", "cifar10", "cifar100")
INPUT_STATS = ("fixed", "split")
RANDOM_DATASETS = ("uniform", "normal", "hypersphere", "jitter")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
MODEL_FAMILIES = ("cnn5", "resnet18", "resnet34")
OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("fp32", "tf32", "bf16")
MODEL_ADDITIONS = ("batch_norm", "dropout")
WEIGHT_INITS = ("pytorch", "nkaiming", "fixup", "mfixup")
SPLITS = ("train", "val", "test")
# "jacobian" is upstream's: it parses it and normalises nothing, so it is the logits' Jacobian
NORMALIZATIONS = ("none", "softmax", "logsoftmax", "crossentropy", "jacobian")

# --- training: per batch (step = global step) and per evaluation (step = epoch) ------------------
BATCH_LOSS = "batch_loss"
# the mean of an epoch's batch losses at step = epoch: the training loss on the evaluations' x-axis
EPOCH_LOSS = "epoch_loss"
LR = "lr"
EVALUATED = ("loss", "accuracy", "error")
# accuracy on the corrupted training samples against their noisy labels: how much noise was
# memorised
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
# MLflow holds what a researcher charts against epochs and compares across runs.
# The summaries of a per-sample measure that go to MLflow unless its registry entry says otherwise
# (lipdd.measures.Measure.logged); the result files, results/stats/metrics.json and history.csv
# hold every summary.
LOGGED_SUMMARIES = ("mean", "clean_mean", "corrupted_mean")
SUMMARIES = ("mean", "median", "std", "max", "p99", "clean_mean", "corrupted_mean")


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
    """The MLflow metric of one summary of one statistic on one probe set (lipdd.measures.probes),
    e.g. probe_between_jacobian_operator_norm_none_mean."""
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


def batch_means_artifact(split: str, epoch: int, first_batch: int) -> str:
    """MLflow artifact with the per-batch means of every statistic of one checkpoint."""
    return f"stats/{split}/batch_means_epoch{epoch:04d}-{first_batch}.csv"


# --- report: columns of by_width.csv / by_epoch.csv --------------------------------------------
ERRORS = ("train_error", "test_error")
OPNORM = "jacobian_operator_norm"

# --- MLflow's chart view ------------------------------------------------------------------------
# The curves a researcher compares first, logged twice: under their own key and as
# OVERVIEW_PREFIX + key, a section of its own that MLflow's run page and chart view show before
# every other metric (sections by the prefix before "/"; checked on MLflow 3.17).
OVERVIEW_PREFIX = "overview/"
OVERVIEW = (
    "test_error",
    "train_error",
    EPOCH_LOSS,
    f"train_{OPNORM}_none_mean",
    f"train_{OPNORM}_none_max",
    "lipschitz_upper_bound",
)


def opnorm_column(normalization: str, summary: str) -> str:
    return f"opnorm_{normalization}_{summary}"
