"""Running under torchrun: ranks, the process group, and the few collectives the stages use.

torchrun (on one node, or on many through its rendezvous) starts the processes and sets
WORLD_SIZE, RANK and LOCAL_RANK in each. Without them every helper here is the
single-process identity, so `train` and `stats` have one code path either way.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal

import torch
import torch.distributed as dist

# How long a rank waits in a collective for the others. A rank that dies makes the others
# fail after this long instead of hanging forever (torchrun stops the processes of its own
# node at once; this is for the other nodes). Rank 0's evaluation and checkpoint upload run
# while the others wait, so it is generous.
TIMEOUT = datetime.timedelta(minutes=30)
FAILED = "lipdd_failed"  # key of the first error in torchrun's store


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_rank0() -> bool:
    return rank() == 0


@contextlib.contextmanager
def process_group(device: torch.device):
    """Joins torchrun's process group for the block: NCCL when `device` is a GPU, else gloo."""
    if world_size() == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the object collectives use the current device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def part(n: int) -> slice:
    """This rank's contiguous share of n items: ranks 0, 1, ... in turn cover 0..n-1 in order."""
    w, r = world_size(), rank()
    return slice(r * n // w, (r + 1) * n // w)


def broadcast(obj):
    """Rank 0's `obj`, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj) -> list | None:
    """Every rank's `obj` in rank order, on rank 0; None on the others."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_rank0() else None
    dist.gather_object(obj, out, dst=0)
    return out


def shared(fn, items: list) -> dict | None:
    """{item: fn(item)} for every item, each computed by one rank (round-robin), joined on rank
    0 in the order of `items`; None on the others. An error on any rank is raised on every rank,
    so none waits for the others at the next collective."""
    mine = {}
    for item in items[rank() :: world_size()]:
        try:
            mine[item] = fn(item)
        except Exception as e:
            mine = e
            break
    parts = gather(mine)
    error = broadcast(next((p for p in parts if isinstance(p, Exception)), None) if parts else None)
    if error is not None:
        raise error
    if parts is None:
        return None
    joined = {k: v for part in parts for k, v in part.items()}
    return {item: joined[item] for item in items}


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks, in place."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def on_rank0(fn, *args):
    """fn(*args) run by rank 0 alone; its result, or the error it raised, on every rank, so
    that all ranks go on together or stop together."""
    result = None
    if is_rank0():
        try:
            result = fn(*args)
        except Exception as e:
            result = e
    result = broadcast(result)
    if isinstance(result, Exception):
        raise result
    return result


class _Nothing:
    """Stands in for rank 0's objects on the other ranks: every method does nothing, returns
    None."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def rank0_only(cls, *args):
    """cls(*args) on rank 0; on the other ranks an object whose every method does nothing."""
    return cls(*args) if is_rank0() else _Nothing()


def in_turn(fn, *args):
    """fn(*args) on rank 0 first, then on the first process of each other node, then on the
    rest: what the first writes (prepared data) is there for those after it, whether the
    nodes share a disk or not, and no two processes write it at once. An error is raised
    after the turns, so it leaves no rank waiting."""
    turn = 0 if is_rank0() else 1 if local_rank() == 0 else 2
    result = error = None
    for t in range(3):
        if t == turn:
            try:
                result = fn(*args)
            except Exception as e:
                error = e
        if world_size() > 1:
            dist.barrier()
    if error is not None:
        raise error
    return result


class PeerFailed(RuntimeError):
    """Another rank failed: its error, raised on a rank that torchrun stopped because of it."""


@contextlib.contextmanager
def failing_together():
    """A failing rank posts its error to torchrun's store before it exits. torchrun then stops
    the other processes with SIGTERM (the CLI turns it into KeyboardInterrupt), or their next
    collective breaks first; either way they raise an error, not an interrupt, so rank 0 ends
    the MLflow run FAILED, not KILLED."""
    if world_size() == 1:
        yield
        return
    store = dist.distributed_c10d._get_default_store()
    try:
        yield
    except KeyboardInterrupt:
        if not store.check([FAILED]):
            raise  # an interrupt of the whole job: Ctrl-C, a scheduler's SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise PeerFailed(store.get(FAILED).decode()) from None
    except Exception as e:
        signal.signal(
            signal.SIGTERM, signal.SIG_IGN
        )  # torchrun's teardown must not cut the report short
        if not store.check([FAILED]):
            store.set(FAILED, f"rank {rank()}: {type(e).__name__}: {e}")
        raise
