"""Whole components (a pipeline's ``unet``, ``text_encoder``, ``vae``...) onto devices: the fewest bytes on
the CPU, then the smallest largest-GPU load, solved exactly.

    >>> from devicemap.planners.components import place_components
    >>> placed = place_components({"unet": 5, "vae": 4, "text_encoder": 3, "a": 3, "b": 3}, {0: 100, 1: 100})
    >>> placed.largest_gpu_bytes, placed.cpu_bytes
    (9, 0)
    >>> sorted(placed.assignment.items())
    [('a', 1), ('b', 1), ('text_encoder', 1), ('unet', 0), ('vae', 0)]

diffusers' ``device_map="balanced"`` for pipelines deals the components, largest first, to the GPUs in the
order 0, 1, ..., n-1, n-1, ..., 0 and sends a component to the CPU as soon as the GPU whose turn it is
cannot hold it. On the instance above that loads GPU 0 with 5 + 3 + 3 = 11 bytes and GPU 1 with 7, where 9
is possible; with two 9-byte GPUs it sends 3 bytes to the CPU although everything fits.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import DoesNotFitError, PlacementError

Device = Hashable
"""A device key as the caller spells it: GPUs by index (``0``) or name (``"cuda:1"``), the CPU as ``"cpu"``."""

CPU = "cpu"

EXACT_LIMIT = 12
"""Up to this many components the placement is exact (branch and bound); beyond it, largest-first greedy."""

NODE_LIMIT = 1_000_000
"""Search nodes visited at most (about 3 s of CPython); past it the best placement found so far is returned,
marked not exact. Measured: 12 components of 1.0-1.4 kB on 4 GPUs of 3.0-3.3 kB, where some must go to the
CPU, take 450k-600k nodes (1.3 s); pipelines (<= 8 components) take milliseconds."""


@dataclass(frozen=True)
class ComponentPlacement:
    """Where each whole component goes, and what that puts on each device."""

    assignment: dict[str, Device]
    """``{component: device}`` for every component (``"cpu"`` for those no GPU holds)."""
    device_bytes: dict[Device, int]
    """Bytes placed on every device given (GPUs in the order given, then ``"cpu"``), zeros included."""
    cpu_bytes: int
    """Bytes on the CPU: the first thing minimised."""
    largest_gpu_bytes: int
    """The largest GPU load (the makespan): minimised second. 0 without GPUs."""
    exact: bool
    """Whether the placement is proven optimal (False: greedy beyond :data:`EXACT_LIMIT` or search cut at
    :data:`NODE_LIMIT`)."""


def _objective(assignment: tuple[int, ...], sizes: list[int], gpus: int) -> tuple[int, int]:
    loads = [0] * (gpus + 1)
    for size, slot in zip(sizes, assignment, strict=True):
        loads[slot] += size
    return loads[gpus], max(loads[:gpus], default=0)


def _greedy(sizes: list[int], caps: list[int], cpu_cap: float) -> tuple[int, ...] | None:
    """Largest first (``sizes`` is sorted so) onto the least-loaded GPU that holds it, else the CPU."""
    gpus = len(caps)
    loads = [0] * gpus
    cpu = 0
    slots: list[int] = []
    for size in sizes:
        fitting = [i for i in range(gpus) if loads[i] + size <= caps[i]]
        if fitting:
            best = min(fitting, key=lambda i: (loads[i], i))
            loads[best] += size
            slots.append(best)
        else:
            cpu += size
            if cpu > cpu_cap:
                return None
            slots.append(gpus)
    return tuple(slots)


def _search(
    sizes: list[int], caps: list[int], cpu_cap: float, seed: tuple[int, ...] | None
) -> tuple[tuple[int, ...] | None, bool]:
    """Branch and bound; returns the lexicographically smallest optimal slot tuple and whether it finished."""
    n, gpus = len(sizes), len(caps)
    suffix = [0] * (n + 1)
    for k in range(n - 1, -1, -1):
        suffix[k] = suffix[k + 1] + sizes[k]
    best: list[int] | None = list(seed) if seed is not None else None
    best_obj: tuple[float, float] = (
        _objective(seed, sizes, gpus) if seed is not None else (math.inf, math.inf)
    )
    loads = [0] * gpus
    current: list[int] = []
    cpu = 0
    nodes = 0
    finished = True

    def bound(k: int) -> tuple[float, float]:
        """A lower bound on the (cpu bytes, largest GPU load) of every completion of ``current``."""
        free = [max(0, caps[i] - loads[i]) for i in range(gpus)]
        largest_free = max(free, default=0)
        rest = suffix[k]
        must = sum(s for s in sizes[k:] if s > largest_free)  # no GPU can take these any more
        cpu_lb = cpu + max(must, rest - sum(free))
        ms_lb: float = max(loads, default=0)
        if gpus and cpu_lb == best_obj[0]:
            # A completion as good as the best keeps exactly best_cpu on the CPU: the GPUs absorb the rest.
            onto_gpus = sum(loads) + rest - (best_obj[0] - cpu)
            ms_lb = max(ms_lb, math.ceil(onto_gpus / gpus))
        return cpu_lb, ms_lb

    def visit(k: int) -> None:
        nonlocal best, best_obj, cpu, nodes, finished
        nodes += 1
        if nodes > NODE_LIMIT:
            finished = False
            return
        if k == n:
            obj = (cpu, max(loads, default=0))
            if best is None or (obj, current) < (best_obj, best):
                best, best_obj = list(current), obj
            return
        lb = bound(k)
        if best is not None and (lb > best_obj or (lb == best_obj and current > best[:k])):
            return
        size = sizes[k]
        tried: set[tuple[int, int]] = set()
        for i in range(gpus):
            if loads[i] + size > caps[i] or (caps[i], loads[i]) in tried:
                continue  # a GPU equal to one tried already gives a mirrored, lexicographically larger subtree
            tried.add((caps[i], loads[i]))
            loads[i] += size
            current.append(i)
            visit(k + 1)
            current.pop()
            loads[i] -= size
            if not finished:
                return
        if cpu + size <= cpu_cap:
            cpu += size
            current.append(gpus)
            visit(k + 1)
            current.pop()
            cpu -= size

    visit(0)
    return (tuple(best) if best is not None else None), finished


def place_components(
    sizes: Mapping[str, int],
    capacities: Mapping[Any, int | None],
    *,
    exact_limit: int = EXACT_LIMIT,
) -> ComponentPlacement:
    """Assign whole components to devices: as few bytes on the CPU as possible, then the smallest largest
    GPU load.

    ``sizes``: ``{component: bytes}``. ``capacities``: ``{device: bytes}``; every key but ``"cpu"`` is a
    GPU (any hashable key: ``0``, ``"cuda:1"``, ``"mps"``); ``"cpu"`` absent or ``None`` means a CPU without
    limit. A component is never split; a GPU holds components up to its capacity.

    Ties are broken deterministically: components are taken largest first (equal sizes by name), devices in
    the order given with the CPU last, and among optimal placements the lexicographically smallest tuple of
    device positions wins (earlier GPUs first). The result does not depend on the order of ``sizes``.

    Exact by branch and bound up to ``exact_limit`` components (default :data:`EXACT_LIMIT` = 12): depth-first
    over components largest first, each onto each GPU that holds it and then the CPU, seeded with the greedy
    placement; a node is cut when a lower bound on its (CPU bytes, largest GPU load) — the bytes the GPUs'
    free space cannot absorb, components larger than any free space, the current loads and, at the best CPU
    bytes, the average GPU load — is worse than the best found, and GPUs with the same capacity and load are
    tried once. Worst case ``O((g + 1) ** n)`` nodes for ``g`` GPUs and ``n`` components (pipelines have
    ``n <= 8``: milliseconds), capped at :data:`NODE_LIMIT` nodes, past which the best placement found so
    far is returned with ``exact=False``. Beyond ``exact_limit`` components: largest first onto the
    least-loaded GPU that holds it, else the CPU (``exact=False``).

    Raises :class:`~devicemap.DoesNotFitError` when even the CPU cannot hold what the GPUs cannot, and
    :class:`~devicemap.PlacementError` for a negative size or capacity.

    >>> place_components({"unet": 6, "vae": 2}, {0: 4, "cpu": None}).assignment
    {'unet': 'cpu', 'vae': 0}
    """
    for name, size in sizes.items():
        if size < 0:
            raise PlacementError(f"component {name!r} has a negative size ({size} bytes)")
    gpu_keys = [key for key in capacities if key != CPU]
    caps: list[int] = []
    for key in gpu_keys:
        cap = capacities[key]
        if cap is None or cap < 0:
            raise PlacementError(f"GPU {key!r} needs a capacity of 0 bytes or more, not {cap!r}")
        caps.append(int(cap))
    cpu_limit = capacities.get(CPU)
    if cpu_limit is not None and cpu_limit < 0:
        raise PlacementError(f"the CPU capacity cannot be negative ({cpu_limit} bytes)")
    cpu_cap: float = math.inf if cpu_limit is None else int(cpu_limit)

    order = sorted(sizes, key=lambda name: (-int(sizes[name]), name))
    ordered = [int(sizes[name]) for name in order]
    gpus = len(caps)

    seed = _greedy(ordered, caps, cpu_cap)
    if len(order) > exact_limit:
        slots, exact = seed, False
    else:
        slots, exact = _search(ordered, caps, cpu_cap, seed)
    if slots is None:
        raise DoesNotFitError(
            f"the components ({sum(ordered)} bytes) do not fit: the GPUs ({sum(caps)} bytes) and the CPU "
            f"({int(cpu_cap)} bytes) cannot hold them whole"
        )

    keys: list[Device] = [*gpu_keys, CPU]
    assignment = {name: keys[slot] for name, slot in zip(order, slots, strict=True)}
    device_bytes: dict[Device, int] = {key: 0 for key in keys}
    for name, slot in zip(order, slots, strict=True):
        device_bytes[keys[slot]] += int(sizes[name])
    cpu_bytes, largest = _objective(slots, ordered, gpus)
    return ComponentPlacement(
        assignment=assignment,
        device_bytes=device_bytes,
        cpu_bytes=cpu_bytes,
        largest_gpu_bytes=largest,
        exact=exact,
    )
