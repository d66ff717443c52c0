"""Whether this run explores new examples or replays the fixed ones.

``make test`` draws the same examples on every run, so a newcomer's first run and CI's agree: hypothesis is
derandomized with no example database, proptest gets a fixed seed (``.cargo/config.toml``) and every other
random draw in the tests takes :func:`seed`. ``DEVICEMAP_EXPLORE=1`` turns on random exploration (new examples
each run, hypothesis' example database kept, a random proptest seed printed by the Makefile); add
``DEVICEMAP_EXAMPLES`` / ``DEVICEMAP_FUZZ_EXAMPLES`` for longer runs.
"""

from __future__ import annotations

import os
import random

EXPLORE = os.environ.get("DEVICEMAP_EXPLORE", "").strip().lower() in ("1", "true", "yes", "on")
"""``DEVICEMAP_EXPLORE=1``: draw new random examples on every run."""


def seed() -> int:
    """0 in a deterministic run; a fresh random seed (report it with any failure) when exploring."""
    return random.randrange(2**32) if EXPLORE else 0
