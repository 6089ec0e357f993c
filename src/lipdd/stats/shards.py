"""Joining the result files of independent --skip jobs (`lipdd stats --merge`): one checkpoint
sharded across jobs ends in the files one job over all the samples writes."""

from __future__ import annotations

import json
from pathlib import Path

from .. import files, upstream
from ..errors import ConfigError

# Fields of a result file with one entry per sample (or per batch), in sample order.
PER_SAMPLE = ("stats", "batch_means", "sample_ids", "targets", "ground_truths")


def merge_shards(out_dir: Path) -> list[Path]:
    """Join every set of shard files NAME-id-UID.json in `out_dir` (runs with --skip, e.g. one job
    per GPU) into the file one run over all their samples writes: NAME.json when the first shard
    starts at sample 0, else NAME-id-<its UID>.json; per-sample (and per-batch) lists concatenated,
    nsamples updated. The merged shards are removed; a NAME with one shard is left as it is.
    Returns the merged files."""
    sets: dict[str, list[Path]] = {}
    for path in sorted(out_dir.glob("*-id-*.json")):
        if shard := upstream.shard_of(path.name):
            sets.setdefault(shard[0], []).append(path)
    if not sets and not any(out_dir.glob("*-checkpoint-*.json")):
        raise ConfigError(f"stats.merge: no result files in {out_dir}")
    written = []
    for stem, paths in sets.items():
        shards = sorted(
            ((json.loads(p.read_text()), p) for p in paths), key=lambda r: r[0]["metadata"]["skip"]
        )
        if len(shards) == 1:
            continue
        first, last = shards[0][0]["metadata"], shards[-1][0]["metadata"]
        for (a, pa), (b, pb) in zip(shards, shards[1:]):
            ma, mb = a["metadata"], b["metadata"]
            differ = sorted(
                k
                for k in ma.keys() | mb.keys()
                if k not in ("nsamples", "skip") and ma.get(k) != mb.get(k)
            )
            if differ:
                k = differ[0]
                raise ConfigError(
                    f"stats.merge: {pa.name} and {pb.name} differ in {k} ({ma.get(k)!r} vs "
                    f"{mb.get(k)!r}); they are not shards of one result"
                )
            end = ma["skip"] + ma["nsamples"]
            if end != mb["skip"]:
                raise ConfigError(
                    f"stats.merge: {pa.name} holds samples {ma['skip']}..{end - 1} but {pb.name} "
                    f"starts at {mb['skip']}; shards must be contiguous and must not overlap "
                    "(each job: --skip=START --num-samples=COUNT of its own range)"
                )
        merged = {
            k: [x for r, _ in shards for x in r[k]]
            for k in PER_SAMPLE
            if all(k in r for r, _ in shards)
        }
        merged["metadata"] = {**first, "nsamples": last["skip"] + last["nsamples"] - first["skip"]}
        uid = first["skip"] // first["batch_size"]
        path = files.write_json(
            out_dir / (f"{stem}-id-{uid}.json" if uid else f"{stem}.json"), merged
        )
        for _, p in shards:
            if p != path:
                p.unlink()
        written.append(path)
    return written
