"""The placement options, parsed once into typed values before any work.

``plan``, ``plan_checkpoint``, the pipeline stages and the CLI all take the same options; each checks them
here, so a wrong one is named (option, value, what is accepted) before a model is sized, and the solver
receives values it does not need to check again. The names the core parses (``_core.STRATEGIES``,
``_core.BALANCES``) are the accepted values; ``Strategy`` and ``Balance`` are the same names as types, for
type checkers (a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from .. import _core
from ..errors import InvalidOptionError, InvalidSizeError, UnknownDeviceError, UnknownModuleError
from .arguments import check_choice, check_class_names, check_flag, check_mapping
from .memory import Size, bytes_to_bits, device_key, parse_size

Strategy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
"""``auto`` (one GPU: sequential; several: balanced), ``balanced``, ``balanced_low_0``, ``sequential``."""
Balance = Literal["memory", "compute"]
"""What balanced strategies equalise: bytes, or FLOPs per token."""
Objective = Literal["memory", "speed"]
"""What ``plan()`` optimises: the memory plan of ``strategy``, or the least predicted decode time."""

STRATEGIES: tuple[Strategy, ...] = tuple(_core.STRATEGIES)  # type: ignore[arg-type]
BALANCES: tuple[Balance, ...] = tuple(_core.BALANCES)  # type: ignore[arg-type]
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)


@dataclass(frozen=True)
class PlacementOptions:
    """Checked options of one placement, in the form the solver takes."""

    strategy: Strategy = "auto"
    no_split_module_classes: tuple[str, ...] | None = None
    """``None``: the model's own ``_no_split_modules``."""
    pins: tuple[tuple[str, str], ...] = ()
    """``(module name, device key as the core spells it)``."""
    offload_buffers: bool = False
    balance: Balance = "memory"
    gpu0_reserve_bits: int = 0
    execution_device: str | None = None
    """Where offloaded blocks execute, as the core spells the key (``"1"``, ``"cpu"``); ``None``: the
    planner chooses (GPU 0 stages them when it can)."""
    objective: Objective = "memory"

    @classmethod
    def parse(
        cls,
        *,
        strategy: object = "auto",
        no_split_module_classes: object = None,
        pins: object = None,
        offload_buffers: object = False,
        balance: object = "memory",
        gpu0_reserve: Size | None = None,
        execution_device: object = None,
        objective: object = "memory",
    ) -> PlacementOptions:
        """Check every option as a user passed it; raise a devicemap error naming the first wrong one."""
        checked_strategy = check_choice("strategy", strategy, STRATEGIES)
        checked_balance = check_choice("balance", balance, BALANCES)
        checked_objective = check_choice("objective", objective, OBJECTIVES)
        classes = check_class_names("no_split_module_classes", no_split_module_classes)
        pin_map = check_mapping("pins", pins, "{'lm_head': 0}") or {}
        pin_list: list[tuple[str, str]] = []
        for name, device in pin_map.items():
            if not isinstance(name, str):
                raise UnknownModuleError(f"pin key {name!r} must be a module name string such as 'lm_head'")
            pin_list.append((name, str(device_key(device))))
        reserve_bits = 0
        if gpu0_reserve is not None:
            try:
                reserve_bits = bytes_to_bits(parse_size(gpu0_reserve))
            except InvalidSizeError as err:
                raise InvalidSizeError(f"gpu0_reserve: {err}") from None
        executor = None
        if execution_device is not None:
            key = device_key(execution_device)
            if key == "disk":
                raise UnknownDeviceError(
                    f"execution_device {execution_device!r} cannot execute offloaded blocks: use a GPU index "
                    "(0, 1, ...), an accelerator device such as 'cuda:1', or 'cpu'"
                )
            executor = str(key)
        if checked_objective == "speed":
            # The speed objective picks each block's device and where it runs: these would be ignored.
            ignored = [
                f"{name}={value!r}"
                for name, value, default in (
                    ("strategy", checked_strategy, "auto"),
                    ("balance", checked_balance, "memory"),
                    ("execution_device", executor, None),
                )
                if value != default
            ]
            if ignored:
                raise InvalidOptionError(
                    f"objective='speed' chooses each block's device and where it runs itself, so "
                    f"{', '.join(ignored)} would be ignored: drop it, or use objective='memory' to plan with it"
                )
        return cls(
            strategy=checked_strategy,
            no_split_module_classes=None if classes is None else tuple(classes),
            pins=tuple(pin_list),
            offload_buffers=check_flag("offload_buffers", offload_buffers),
            balance=checked_balance,
            gpu0_reserve_bits=reserve_bits,
            execution_device=executor,
            objective=checked_objective,
        )

    def classes_for(self, tree_classes: Iterable[str]) -> list[str]:
        """The no-split classes to apply: the user's, else the tree's own."""
        return list(tree_classes if self.no_split_module_classes is None else self.no_split_module_classes)
