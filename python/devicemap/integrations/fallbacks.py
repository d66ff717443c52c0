"""One warning per process and reason when a hook hands a call back to the library's own planner."""

from __future__ import annotations

import threading
import warnings

_lock = threading.Lock()
_warned: set[str] = set()


def warn_once(reason: str) -> None:
    """Warn once per process and reason that a call falls back to the library's own planner."""
    with _lock:
        if reason in _warned:
            return
        _warned.add(reason)
    warnings.warn(f"devicemap: {reason}", RuntimeWarning, stacklevel=3)
