"""Training throughput: lipdd's training loop against the seed's input pipeline, and MLflow's cost.

    .venv/bin/python benchmarks/bench_train.py [--device cpu|cuda] [--quick]

1. Images/s of training steps (SGD, momentum 0.9, batch 128, augmentation on) on CIFAR-shaped data
   (random uint8 3x32x32 images, 10 classes), for cnn5 width 4 (input-bound) and resnet18 width 64:
     seed          a torchvision Dataset of PIL images, RandomCrop(32, padding=4), RandomHorizontalFlip,
                   ToTensor, Normalize; a shuffling DataLoader; a plain loop. num_workers=0: on these 2
                   cores worker processes only compete with the training (measured 3,030 img/s with 0
                   workers, 2,450 with 1, 2,490 with 2, cnn5 width 4).
     ours          the loop of lipdd.train: data resident on the device (lipdd.data.to_device), a seeded
                   permutation, lipdd.data.random_crop_flip (one gather) and normalize on the whole batch,
                   channels-last model and batches, summed loss over batch size, one host sync per epoch.
   Each ratio is the median over rounds of the per-round ratio; methods alternate within a round.
2. Evaluation: lipdd.train.evaluate (inference_mode, batches of 1,024) against a seed-style evaluation
   (DataLoader of PIL images, ToTensor, Normalize, batches of 128, no_grad).
3. MLflow logging overhead on the embedded default (digits, cnn5 width 8, batch 128): the loop as
   lipdd.train runs it, logging batch_loss for every step through lipdd.tracking.MetricLogger into a
   temporary SQLite store (it flushes per 1,000 metrics or 30 s, and at the end). The overhead is the time spent
   inside the logger's calls over the time of the loop without them: logging is synchronous, so that is
   exactly what it adds, without the noise of differencing two timings of a shared machine (the paired
   wall-clock difference is printed beside it as a check). A flush per epoch cost 17.9% here, which
   is why the logger batches across epochs. (MLflow's asynchronous log_batch, synchronous=False, was
   tried and dropped: with a flush per epoch it still cost ~20% of wall time, its logging thread
   competing with this Python-bound loop for the GIL and the 2 cores.)

The last line is one JSON object: vs_seed_pipeline_cnn5_4 and vs_seed_pipeline_resnet18_64 (ours over
seed), logging_overhead (as train.py logs) and eval_vs_seed_cnn5_4.
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
from lipdd.config import Config
from lipdd.models import build_model
from lipdd.train import CL, evaluate, learning_rate, make_model, make_optimizer

BATCH = 128


# ----------------------------------------------------------------------------- data


def cifar_like(n, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int64)
    mean = (images.reshape(-1, 3).mean(0) / 255).tolist()
    std = (images.reshape(-1, 3).std(0) / 255).tolist()
    return datalib.Split(images, labels, labels.copy(), np.arange(n)), mean, std


class SeedDataset(Dataset):
    """The seed's training set: PIL images through torchvision transforms, one sample at a time."""

    def __init__(self, split, mean, std, augment):
        self.images, self.labels = split.images, split.labels
        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
        self.transform = T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


# ----------------------------------------------------------------------------- the training loops


class SeedTrainer:
    def __init__(self, model, split, mean, std):
        self.model, self.opt = model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.loader = DataLoader(SeedDataset(split, mean, std, augment=True), batch_size=BATCH, shuffle=True,
                                 num_workers=0)

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
    """The inner loop of lipdd.train, built from the same functions."""

    def __init__(self, model, split, mean, std, device):
        self.cfg = Config(width=4, learning_rate=0.01, momentum=0.9, batch_size=BATCH, augmentation=True)
        self.model = model.to(device, memory_format=CL)
        self.opt = make_optimizer(self.cfg, self.model)
        self.x, self.y, _ = datalib.to_device(split, device)
        self.mean, self.std = (torch.tensor(v, device=device) for v in (mean, std))
        self.gens = {"batches": torch.Generator().manual_seed(0),
                     "augment": torch.Generator(device).manual_seed(1)}
        self.epoch = 0

    def run(self, batches, device):
        self.epoch += 1
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(self.cfg, self.epoch)
        order = torch.randperm(len(self.x), generator=self.gens["batches"]).to(device)
        loss_sums = []
        for i in range(0, batches * BATCH, BATCH):
            idx = order[i:i + BATCH]
            x = datalib.random_crop_flip(self.x[idx], self.gens["augment"])
            x = datalib.normalize(x, self.mean, self.std).contiguous(memory_format=CL)
            loss_sum = F.cross_entropy(self.model(x), self.y[idx], reduction="sum")
            loss_sums.append(loss_sum.detach())
            self.opt.zero_grad(set_to_none=True)
            (loss_sum / len(idx)).backward()
            self.opt.step()
        torch.stack(loss_sums).tolist()  # the loop's one host sync per epoch
        return batches * BATCH


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(trainers, batches, rounds, device):
    """{name: [images/s per round]}, trainers alternating within each round, after a one-batch warm-up."""
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

    ratios = {}
    print(f"\ntraining images/s (median over rounds), batch {BATCH}, augmentation on")
    names = ("seed", "ours")
    print(f"{'model':14} " + " ".join(f"{n:>15}" for n in names) + f" {'ours/seed':>10}")
    for family, width, batches, rounds in (("cnn5", 4, 16, 5), ("resnet18", 64, 2, 3)):
        if args.quick:
            batches, rounds = max(1, batches // 2), 2

        def model():
            torch.manual_seed(0)
            return build_model(family, width, 3, 10).to(device)

        trainers = {"seed": SeedTrainer(model(), split, mean, std),
                    "ours": OurTrainer(model(), split, mean, std, device)}
        ips = throughput(trainers, batches, rounds, device)
        key = f"{family}_{width}"
        ratios[key] = paired(ips["ours"], ips["seed"])
        print(f"{key:14} " + " ".join(f"{statistics.median(ips[n]):>15.0f}" for n in names)
              + f" {ratios[key]:>10.2f}", flush=True)

    # evaluation: lipdd.train.evaluate against a seed-style loader, cnn5 width 4
    torch.manual_seed(0)
    net = build_model("cnn5", 4, 3, 10).to(device).eval()
    loader = DataLoader(SeedDataset(split, mean, std, augment=False), batch_size=BATCH, num_workers=0)
    xs, ys, _ = datalib.to_device(split, device)
    m, s = (torch.tensor(v, device=device) for v in (mean, std))

    def seed_eval():
        with torch.no_grad():
            return [F.cross_entropy(net(x.to(device)), y.to(device), reduction="none") for x, y in loader]

    times = {"seed": [], "ours": []}
    for _ in range(1 if args.quick else 3):
        for name, fn in (("seed", seed_eval), ("ours", lambda: evaluate(net, xs, ys, m, s))):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(len(ys) / (time.perf_counter() - start))
    ratios["eval_cnn5_4"] = paired(times["ours"], times["seed"])
    print(f"evaluation, cnn5_4: seed {statistics.median(times['seed']):.0f} img/s, lipdd.train.evaluate "
          f"{statistics.median(times['ours']):.0f} img/s, ratio {ratios['eval_cnn5_4']:.2f}")
    return ratios


# ----------------------------------------------------------------------------- MLflow logging overhead


class TimedLogger(tracking.MetricLogger):
    """lipdd.tracking.MetricLogger that adds up the wall time spent in its calls."""

    def __init__(self, client, run_id):
        super().__init__(client, run_id)
        self.seconds = 0.0

    def log(self, key, value, step):
        start = time.perf_counter()
        super().log(key, value, step)  # flushes by itself, as in lipdd.train
        self.seconds += time.perf_counter() - start

    def close(self):
        start = time.perf_counter()
        self.flush()
        self.seconds += time.perf_counter() - start


def digits_loop(store, epochs, rounds, device):
    """{variant: [(loop seconds, seconds inside the logger)] per round} for the digits default."""
    with tempfile.TemporaryDirectory() as tmp:
        datalib.prepare(Path(tmp) / "digits", "digits", Path(tmp) / "raw")
        prepared = datalib.load_prepared(Path(tmp) / "digits")
    cfg = Config(width=8, batch_size=BATCH)
    x_train, y_train, _ = datalib.to_device(prepared.splits["train"], device)
    mean, std = (torch.tensor(prepared.meta[k], device=device) for k in ("mean", "std"))
    client = tracking.get_client(f"sqlite:///{store}/mlflow.db")
    exp = client.create_experiment("bench", artifact_location=(Path(store) / "artifacts").as_uri())

    def run(logger, epochs):
        torch.manual_seed(0)
        model = make_model(cfg, prepared.meta).to(device, memory_format=CL)
        opt = make_optimizer(cfg, model)
        gen, step = torch.Generator().manual_seed(0), 0
        start = time.perf_counter()
        for epoch in range(1, epochs + 1):
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, epoch)
            order = torch.randperm(len(x_train), generator=gen).to(device)
            loss_sums = []
            for i in range(0, len(x_train), cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                batch = datalib.normalize(x_train[idx], mean, std).contiguous(memory_format=CL)
                loss_sum = F.cross_entropy(model(batch), y_train[idx],
                                           reduction="sum")
                loss_sums.append(loss_sum.detach())
                opt.zero_grad(set_to_none=True)
                (loss_sum / len(idx)).backward()
                opt.step()
                step += 1
            losses = torch.stack(loss_sums).tolist()
            if logger is not None:
                for s, value in enumerate(losses, step - len(losses) + 1):
                    logger.log("batch_loss", value, s)
        if logger is not None:
            logger.close()
        return time.perf_counter() - start, logger.seconds if logger else 0.0

    variants = {"none": None, "lipdd": {}}
    run(None, 2)  # warm-up
    out = {v: [] for v in variants}
    for _ in range(rounds):
        for name, kwargs in variants.items():
            logger = None if kwargs is None else TimedLogger(client, client.create_run(exp).info.run_id, **kwargs)
            out[name].append(run(logger, epochs))
    return out, -(-len(x_train) // cfg.batch_size)


def bench_logging(args, device):
    # 100 epochs = 1,100 steps: one flush of 1,000 metrics mid-run for the batched logger, as in a long run
    epochs, rounds = (30, 2) if args.quick else (100, 3)
    with tempfile.TemporaryDirectory() as store:
        out, steps = digits_loop(store, epochs, rounds, device)
    plain = [t for t, _ in out["none"]]
    print(f"\nMLflow batch_loss logging, digits, cnn5 width 8, batch {BATCH}, {epochs} epochs x {steps} steps, "
          f"SQLite store")
    print(f"{'logger':16} {'loop s':>8} {'in logger s':>12} {'overhead':>9} {'wall-clock vs none':>19}")
    overheads = {}
    for name in ("lipdd",):
        total = statistics.median(t for t, _ in out[name])
        inside = statistics.median(s for _, s in out[name])
        overheads[name] = statistics.median(s / (t - s) for t, s in out[name])
        overheads[name + "_wall"] = statistics.median(t / p - 1 for (t, _), p in zip(out[name], plain))
        print(f"{name:16} {total:>8.3f} {inside:>12.4f} {overheads[name]:>9.2%} {overheads[name + '_wall']:>19.2%}")
    print(f"{'none':16} {statistics.median(plain):>8.3f}")
    return overheads


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer batches and rounds (a smoke test; quote the full run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    ratios = bench_pipelines(args, device)
    overheads = bench_logging(args, device)
    print(json.dumps({
        "vs_seed_pipeline_cnn5_4": round(ratios["cnn5_4"], 3),
        "vs_seed_pipeline_resnet18_64": round(ratios["resnet18_64"], 3),
        "logging_overhead": round(overheads["lipdd"], 4),
        "eval_vs_seed_cnn5_4": round(ratios["eval_cnn5_4"], 3),
    }))


if __name__ == "__main__":
    sys.exit(main())
