"""Training throughput: lipdd's training loop against upstream's input pipeline, and MLflow's cost.

    .venv/bin/python benchmarks/bench_train.py [--device cpu|cuda] [--quick]

1. Images/s of training steps (SGD, momentum 0.9, batch 128, augmentation on) on CIFAR-shaped data
   (random uint8 3x32x32 images, 10 classes), for cnn5 width 4 (input-bound) and resnet18 width 64:
     upstream      a torchvision Dataset of PIL images, RandomCrop(32, padding=4),
                   RandomHorizontalFlip, ToTensor, Normalize; a shuffling DataLoader; a plain
                   loop. num_workers=0: on 2 cores worker processes only compete with the
                   training (they were slower when measured).
     ours          lipdd.train.train_epoch, the loop lipdd.train runs, over a lipdd.data.Loader:
                   data resident on the device, a seeded permutation,
                   lipdd.data.loader.random_crop_flip (one gather) and normalize on the whole
                   batch, channels-last model and batches (where lipdd.runtime.channels_last
                   allows), in-place ReLUs, one host sync per epoch.
     ours_compiled the same with the network under torch.compile (lipdd train --compile); the
                   one-off compile happens in the warm-up round and is not timed.
   On CPU the process first calls lipdd.runtime.retain_freed_memory, as lipdd train does: the
   upstream runs with malloc keeping freed memory too. Each ratio is the median over rounds of the
   per-round ratio; methods alternate within a round.
2. Evaluation: lipdd.train.evaluate over a Loader (batches of 1,024) against an upstream-style
   evaluation (DataLoader of PIL images, ToTensor, Normalize, batches of 128, no_grad).
3. MLflow logging overhead on the embedded default: lipdd.train.train with params.yaml as it stands
   (digits, cnn5 width 8, 1,000 epochs, 1 thread) into a temporary SQLite store. Everything the
   trainer spends in lipdd.tracking.BackgroundLogger is timed: starting the sender process, each log
   (buffering, and pickling every 100 rows down the pipe), each flush (which waits until the sender
   has written everything: at the end of the training) and the close. Checkpoints are saved by the
   trainer and uploaded by the sender; saving one is the checkpoint's cost, not logging's, and is
   not timed (it was not before the sender took the uploads either). The sender writes in parallel
   on the core the 1-thread trainer leaves free; a trainer that uses every core shares them with the
   sender. Timing the calls measures what logging adds without the noise of differencing two timings
   on a shared machine.

The last line is one JSON object: vs_upstream_pipeline_cnn5_4 and vs_upstream_pipeline_resnet18_64
(lipdd as configured by default over upstream with the first --upstream-workers; the _compiled keys
with --compile), logging_overhead and eval_vs_upstream_cnn5_4; images_per_s_<model>_<row> of every
row, and vs_upstream_pipeline_<model>_upstream_w<N> (ours over upstream with N workers) for each
further --upstream-workers (benchmarks/gpu_check.sh passes 0 4).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lipdd import data as datalib
from lipdd import tracking
from lipdd.config import Config, build
from lipdd.models import build_model
from lipdd.runtime import channels_last, retain_freed_memory
from lipdd.train import evaluate, make_optimizer, train, train_epoch

BATCH = 128
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- data


def cifar_like(n, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    mean = (images.reshape(-1, 3).mean(0) / 255).tolist()
    std = (images.reshape(-1, 3).std(0) / 255).tolist()
    return datalib.Split(images, labels, labels.copy(), np.arange(n)), mean, std


class UpstreamDataset(Dataset):
    """Upstream's training set: PIL images through torchvision transforms, one sample at a time."""

    def __init__(self, split, mean, std, augment):
        self.images, self.labels = split.images, split.labels
        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
        self.transform = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


# ----------------------------------------------------------------------------- the training loops


class UpstreamTrainer:
    def __init__(self, model, split, mean, std, workers=0):
        self.model, self.opt = model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.loader = DataLoader(  # workers kept between rounds: their start is not timed
            UpstreamDataset(split, mean, std, augment=True),
            batch_size=BATCH,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def run(self, batches, device):
        done = 0
        for x, y in self.loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            done += len(y)
            if done >= batches * BATCH:
                break
        return done


class OurTrainer:
    """lipdd.train.train_epoch, the loop lipdd.train runs, over `batches` batches per round."""

    def __init__(self, model, split, mean, std, device, batches, compile=False):
        self.cfg = Config(
            width=4, learning_rate=0.01, momentum=0.9, batch_size=BATCH, augmentation=True
        )
        cl = channels_last(device)  # the layout lipdd train picks here
        self.model = model.to(
            device, memory_format=torch.channels_last if cl else torch.contiguous_format
        )
        self.net = torch.compile(self.model) if compile else self.model
        self.opt = make_optimizer(self.cfg, self.model)
        self.loader = datalib.Loader.of(
            split.take(np.arange(batches * BATCH)),
            dict(mean=mean, std=std),
            device,
            BATCH,
            seed=0,
            augment=True,
            channels_last=cl,
        )

    def run(self, batches, device):
        losses = train_epoch(self.cfg, self.net, self.model, self.opt, self.loader)
        return len(losses.tolist()) * BATCH


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(trainers, batches, rounds, device):
    """{name: [images/s per round]}, trainers alternating within each round, after a one-batch
    warm-up."""
    for t in trainers.values():
        t.run(1, device)
    out = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, t in trainers.items():
            sync(device)
            start = time.perf_counter()
            n = t.run(batches, device)
            sync(device)
            out[name].append(n / (time.perf_counter() - start))
    return out


def paired(fast, slow):
    return statistics.median(f / s for f, s in zip(fast, slow))


def bench_pipelines(args, device):
    split, mean, std = cifar_like(2048)

    ratios, rates = {}, {}
    print(f"\ntraining images/s (median over rounds), batch {BATCH}, augmentation on")
    upstreams = [f"upstream_w{w}" for w in args.upstream_workers]  # DataLoader num_workers
    names = (*upstreams, "ours", "ours_compiled")
    print(
        f"{'model':14} "
        + " ".join(f"{n:>15}" for n in names)
        + f" {'ours/seed':>10} {'compiled/seed':>14}  (seed: {upstreams[0]})"
    )
    for family, width, batches, rounds in (("cnn5", 4, 16, 5), ("resnet18", 64, 2, 5)):
        if args.quick:
            batches, rounds = max(1, batches // 2), 2

        def model():
            torch.manual_seed(0)
            return build_model(family, width, 3, 10).to(device)

        trainers = {
            **{
                f"upstream_w{w}": UpstreamTrainer(model(), split, mean, std, workers=w)
                for w in args.upstream_workers
            },
            "ours": OurTrainer(model(), split, mean, std, device, batches),
            "ours_compiled": OurTrainer(model(), split, mean, std, device, batches, compile=True),
        }
        ips = throughput(trainers, batches, rounds, device)
        key = f"{family}_{width}"
        ratios[key] = paired(ips["ours"], ips[upstreams[0]])
        ratios[key + "_compiled"] = paired(ips["ours_compiled"], ips[upstreams[0]])
        rates |= {f"{key}_{name}": statistics.median(ips[name]) for name in names}
        for name in upstreams[1:]:
            ratios[f"{key}_{name}"] = paired(ips["ours"], ips[name])
        print(
            f"{key:14} "
            + " ".join(f"{statistics.median(ips[n]):>15.0f}" for n in names)
            + f" {ratios[key]:>10.2f} {ratios[key + '_compiled']:>14.2f}",
            flush=True,
        )

    # evaluation: lipdd.train.evaluate against a seed-style loader, cnn5 width 4
    torch.manual_seed(0)
    net = build_model("cnn5", 4, 3, 10).to(device).eval()
    loader = DataLoader(
        UpstreamDataset(split, mean, std, augment=False), batch_size=BATCH, num_workers=0
    )
    ours = datalib.Loader.of(split, dict(mean=mean, std=std), device, 1024, channels_last=True)

    def upstream_eval():
        with torch.no_grad():
            return [
                F.cross_entropy(net(x.to(device)), y.to(device), reduction="none")
                for x, y in loader
            ]

    times = {"upstream": [], "ours": []}
    for _ in range(1 if args.quick else 3):
        for name, fn in (("upstream", upstream_eval), ("ours", lambda: evaluate(net, ours))):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(len(split.labels) / (time.perf_counter() - start))
    ratios["eval_cnn5_4"] = paired(times["ours"], times["upstream"])
    print(
        f"evaluation, cnn5_4: upstream {statistics.median(times['upstream']):.0f} img/s, "
        f"lipdd.train.evaluate {statistics.median(times['ours']):.0f} img/s, ratio "
        f"{ratios['eval_cnn5_4']:.2f}"
    )
    return ratios, rates


# -------------------------------------------------------------------------- MLflow logging overhead


class TimedLogger(tracking.BackgroundLogger):
    """The logger lipdd.train.train uses, adding up the wall time the trainer spends in its calls
    (the outermost ones only: log sends and close flushes), from starting its sender to closing it.
    """

    seconds, depth = 0.0, 0

    def timed(self, method, *args, **kwargs):
        TimedLogger.depth += 1
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            TimedLogger.depth -= 1
            if not TimedLogger.depth:
                TimedLogger.seconds += time.perf_counter() - start

    def __init__(self, *args, **kwargs):
        self.timed(super().__init__, *args, **kwargs)

    def log(self, key, value, step):
        self.timed(super().log, key, value, step)

    def flush(self):
        self.timed(super().flush)

    def close(self, wait=None):
        self.timed(super().close, wait)


def bench_logging(args, device):
    """lipdd.train.train on the embedded default (params.yaml), every metric through TimedLogger."""
    epochs = 100 if args.quick else None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build(
            {
                "tracking_uri": f"sqlite:///{tmp}/mlflow.db",
                "prepared_dir": f"{tmp}/prepared",
                "results_dir": f"{tmp}/results",
                "device": str(device),
                **({"epochs": epochs} if epochs else {}),
            },
            params_file=ROOT / "params.yaml",
        )
        datalib.ensure_prepared(cfg)
        tracking.get_client(cfg.tracking_uri)  # the store's tables exist before the clock starts
        tracking.BackgroundLogger, plain = TimedLogger, tracking.BackgroundLogger
        TimedLogger.seconds = 0.0
        try:
            start = time.perf_counter()
            run_id = train(cfg)
            total = time.perf_counter() - start
        finally:
            tracking.BackgroundLogger = plain
        client = tracking.get_client(cfg.tracking_uri)
        logged = sum(  # lipdd's own metrics: MLflow's system/ ones, every 10 s, go another way
            len(client.get_metric_history(run_id, k))
            for k in client.get_run(run_id).data.metrics
            if not k.startswith("system/")
        )
    inside = TimedLogger.seconds
    overhead = inside / (total - inside)
    print(
        "\n"
        f"MLflow metric logging in lipdd.train.train, embedded default ({cfg.model}_{cfg.width} "
        f"on {cfg.data}, {cfg.epochs} epochs, {cfg.workers} thread), SQLite store"
    )
    print(f"{'metrics':>8} {'train s':>8} {'in logger s':>12} {'per metric':>11} {'overhead':>9}")
    print(
        f"{logged:>8} {total:>8.2f} {inside:>12.3f} {inside / logged * 1e6:>9.0f}us "
        f"{overhead:>9.2%}"
    )
    return overhead


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer batches and rounds (a smoke test; quote the full run)",
    )
    parser.add_argument(
        "--upstream-workers",
        type=int,
        nargs="+",
        default=[0],
        help="DataLoader worker processes of upstream's pipeline, one row each; ratios are "
        "against the first (default 0)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        retain_freed_memory()
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    ratios, rates = bench_pipelines(args, device)
    overhead = bench_logging(args, device)
    print(
        json.dumps(
            {
                "vs_upstream_pipeline_cnn5_4": round(ratios["cnn5_4"], 3),
                "vs_upstream_pipeline_resnet18_64": round(ratios["resnet18_64"], 3),
                "vs_upstream_pipeline_cnn5_4_compiled": round(ratios["cnn5_4_compiled"], 3),
                "vs_upstream_pipeline_resnet18_64_compiled": round(
                    ratios["resnet18_64_compiled"], 3
                ),
                "logging_overhead": round(overhead, 4),
                "eval_vs_upstream_cnn5_4": round(ratios["eval_cnn5_4"], 3),
                **{
                    f"vs_upstream_pipeline_{k}": round(v, 3)
                    for k, v in ratios.items()
                    if "_upstream_w" in k
                },
                **{f"images_per_s_{k}": round(v) for k, v in rates.items()},
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
