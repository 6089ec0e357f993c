"""Data: the sources (sources), the prepared format training and stats read (prepared), and the
device-resident batches they are served in (loader)."""

from .loader import Loader
from .prepared import (
    Prepared,
    draw_label_seed,
    ensure_prepared,
    load_prepared,
    prepare,
    prepare_for,
)
from .sources import Split, random_pixels

__all__ = [
    "Loader",
    "Prepared",
    "Split",
    "draw_label_seed",
    "ensure_prepared",
    "load_prepared",
    "prepare",
    "prepare_for",
    "random_pixels",
]
