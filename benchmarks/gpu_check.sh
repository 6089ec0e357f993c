#!/usr/bin/env bash
# lipdd on a CUDA machine, in one go: at most 8 minutes, each step stopped at its own limit (exit 124):
#   gpu        the device; torch, CUDA and cuDNN versions; what float32 products and convolutions
#              run in as imported and as lipdd sets them (precision fp32, tf32)
#   pipeline   the default pipeline's commands (prepare, train, stats: params.yaml) on CUDA, each
#              one's seconds
#   leases     two trainings started at once with device cuda and runs_per_gpu 1, both shown only
#              GPU 0, one by index and one by UUID (CUDA_VISIBLE_DEVICES): one waits for the other
#              ("waited": 1), whatever the spelling
#   torchrun   stats of the pipeline's run under torchrun, one process per GPU, NCCL (needs 2 GPUs)
#   bench_train, bench_stats   both benchmarks with --device cuda: bench_train's images/s against
#              upstream's pipeline with 0 and 4 DataLoader workers; bench_stats adds the TF32 and
#              bf16 errors and speed-ups, the fastest jacobian.CHUNK["cuda"], and cnn5_64's and
#              resnet18_64's samples/s, TFLOP/s against one forward + K backward passes and against
#              the convolution peak, and seconds for 49,000 samples
#   bench_device   matmul and conv peaks (IEEE, TF32, bf16), the device's per-sample norms, bound
#              and Hessian against the CPU's, resnet18_64's curvature and bound: time, peak memory
# Each step prints its JSON line as it ends (`gpu_check: NAME {...}` on stderr); at the end one JSON
# line holds them all: each step's exit status and seconds, and the figures it reports. The steps'
# logs are kept in one archive, GPU_CHECK_ARCHIVE (default: $OUT/gpu_check_logs.tar.gz where the
# device runner's $OUT is set, else ./gpu_check_logs.tar.gz), written however the check ends.
#
#   bash benchmarks/gpu_check.sh                         # on the GPU machine, lipdd installed or not
#   GPU_CHECK_WHEELS=.whl bash benchmarks/gpu_check.sh   # first installs benchmarks/wheelhouse.py's
#                                                        # wheels offline, into a folder of its own
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh   # a dry run anywhere
#
# With device cuda on a machine without CUDA it stops at once, exit 2. A step that cannot run
# there (torchrun with one GPU) is reported as skipped, not as passed.
#
# PYTHON picks the interpreter (default: .venv/bin/python if there, else python3); lipdd is imported
# from src/. Everything it writes goes to a temporary folder (GPU_CHECK_KEEP=DIR keeps it there).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:+--quick}
WORK=${GPU_CHECK_KEEP:-$(mktemp -d)}
mkdir -p "$WORK/steps"
ARCHIVE=${GPU_CHECK_ARCHIVE:-${OUT:-.}/gpu_check_logs.tar.gz}
finish() {
    tar czf "$ARCHIVE" -C "$WORK" steps 2>/dev/null && echo "gpu_check: logs in $ARCHIVE" >&2
    [ -n "${GPU_CHECK_KEEP:-}" ] || rm -rf "$WORK"
}
trap finish EXIT
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" \
        "$GPU_CHECK_WHEELS"/*.whl || { echo "gpu_check: the wheelhouse did not install" >&2; exit 1; }
    export PYTHONPATH=$WORK/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "$DEVICE" != cpu ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: CUDA is not available here (GPU_CHECK_DEVICE=cpu for a dry run)" >&2
    exit 2
fi
export MLFLOW_TRACKING_URI=sqlite:///$WORK/mlflow.db LIPDD_GPU_LEASES=$WORK/leases
COMMON=(--params params.yaml --device "$DEVICE" --prepared-dir "$WORK/prepared" --results-dir "$WORK/results")

# step NAME LIMIT_SECONDS COMMAND...: runs it (a function of this script runs in a bash of its own, so
# that timeout can stop it), its output in steps/NAME.log, its status and time in steps/NAME.rc
step() {
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    if declare -F "$1" >/dev/null; then
        set -- bash -c "$(declare -p PY DEVICE WORK COMMON); $(declare -f "$1"); $1"
    fi
    timeout "$limit" "$@" >"$WORK/steps/$name.log" 2>&1
    echo "$? $((SECONDS - start))" >"$WORK/steps/$name.rc"
    echo "gpu_check: $name $(summary "$name")" >&2
}

# summary [NAME]: one step's entry (or all of them, as one object) from steps/NAME.rc and .log
summary() {
    "$PY" - "$WORK/steps" "$@" <<'EOF'
import json, sys
from pathlib import Path

out = {}
for rc in sorted(Path(sys.argv[1]).glob(f"{sys.argv[2] if len(sys.argv) > 2 else '*'}.rc")):
    status, seconds = rc.read_text().split()
    lines = rc.with_suffix(".log").read_text().strip().splitlines() or [""]
    entry = {"exit": status if status == "skipped" else int(status), "seconds": int(seconds)}
    try:  # a step's figures: the JSON object its output ends with
        entry.update(json.loads(lines[-1]))
    except (json.JSONDecodeError, TypeError):
        entry["last_line"] = lines[-1][-300:]
    out[rc.stem] = entry
print(json.dumps(out[sys.argv[2]] if len(sys.argv) > 2 else out))
EOF
}

# What float32 products and convolutions run in, as imported and as each lipdd stage sets them
# (lipdd.runtime.matmul_precision; the measures always fp32).
step gpu 30 "$PY" -c 'import json, torch
from lipdd.runtime import matmul_precision
flags = lambda: {"matmul": torch.backends.cuda.matmul.fp32_precision, "conv": torch.backends.cudnn.conv.fp32_precision}
out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], "precision_as_imported": flags()}
for precision in ("fp32", "tf32"):
    matmul_precision(precision)
    out[f"precision_{precision}"] = flags()
print(json.dumps(out))'

pipeline() {
    local stage start times=()
    for stage in prepare train stats; do
        start=$(date +%s.%N)
        "$PY" -m lipdd $stage "${COMMON[@]}" $([ $stage = stats ] && echo --output-dir "$WORK/stats") ||
            return 1
        times+=("$start" "$(date +%s.%N)")
    done
    "$PY" -c 'import json, sys; t, s = (json.load(open(f)) for f in sys.argv[1:3]); e = [float(v) for v in sys.argv[3:]]
print(json.dumps({"test_error": t["test_error"], "operator_norm_mean": s["jacobian_operator_norm_none"]["mean"],
    **{f"{n}_s": round(e[2 * i + 1] - e[2 * i], 1) for i, n in enumerate(("prepare", "train", "stats"))}}))' \
        "$WORK/results/train/metrics.json" "$WORK/results/stats/metrics.json" "${times[@]}"
}
step pipeline 120 pipeline

leases() {
    local a b uuid=0
    [ "$DEVICE" = cpu ] || uuid=$("$PY" -c 'import torch; u = str(torch.cuda.get_device_properties(0).uuid)
print(u if u.startswith(("GPU-", "MIG-")) else "GPU-" + u)') || return 1
    CUDA_VISIBLE_DEVICES=0 "$PY" -m lipdd train "${COMMON[@]}" --epochs 50 --name leases --seed 1 \
        >"$WORK/steps/lease-a.log" 2>&1 & a=$!
    CUDA_VISIBLE_DEVICES=$uuid "$PY" -m lipdd train "${COMMON[@]}" --epochs 50 --name leases --seed 2 \
        >"$WORK/steps/lease-b.log" 2>&1 & b=$!
    wait $a && wait $b || return 1
    echo "{\"waited\": $(cat "$WORK"/steps/lease-?.log | grep -c 'waiting for a GPU')}"
}
step leases 60 leases

gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$gpus" -ge 2 ]; then
    step torchrun 60 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$gpus" -m lipdd stats \
        "${COMMON[@]}" --output-dir "$WORK/torchrun"
else
    echo "skipped: NCCL needs 2 GPUs, this machine has $gpus" >"$WORK/steps/torchrun.log"
    echo "skipped 0" >"$WORK/steps/torchrun.rc"
    echo "gpu_check: torchrun $(summary torchrun)" >&2
fi

step bench_train 90 "$PY" benchmarks/bench_train.py --device "$DEVICE" --upstream-workers 0 4 $QUICK
step bench_stats 120 "$PY" benchmarks/bench_stats.py --device "$DEVICE" $QUICK
step bench_device 150 "$PY" benchmarks/bench_device.py --device "$DEVICE" $QUICK

summary
