"""Compute cost per module, for ``balance="compute"``: FLOPs per token ~ 2 x the parameters a token
actually uses. Embedding lookups cost nothing; in mixture-of-experts layers only the routed share
(``num_experts_per_tok / num_experts``) of the experts counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..inputs.model_config import config_value, text_config

if TYPE_CHECKING:
    import torch


def expert_share(config: Any | None) -> tuple[int, float]:
    if config is None:
        return 0, 1.0
    c = text_config(config)
    experts = config_value(c, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    active = config_value(c, "num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k")
    if not experts or not active:
        return 0, 1.0
    return int(experts), min(1.0, float(active) / float(experts))


def is_routed_experts(local_name: str, module: torch.nn.Module, experts: int) -> bool:
    """The routed experts of an MoE layer: a list of ``experts`` modules, or a fused ``*Experts`` module,
    held under a name mentioning experts (shared experts always run and are not scaled)."""
    import torch

    if "expert" not in local_name.lower() or "shared" in local_name.lower():
        return False
    if isinstance(module, torch.nn.ModuleList):
        return experts > 1 and len(module) == experts
    return type(module).__name__.endswith("Experts")


def flops_per_token(model: torch.nn.Module) -> list[tuple[str, int]]:
    """``[(module name, FLOPs per token)]`` for every module holding parameters directly. A module
    registered under several names counts once, under its first (as ``named_modules`` lists it), so
    shared and cyclic module graphs are walked in linear time."""
    import torch

    experts, share = expert_share(getattr(model, "config", None))
    result: list[tuple[str, int]] = []
    stack: list[tuple[str, torch.nn.Module, float]] = [("", model, 1.0)]
    visited: set[int] = set()
    while stack:
        name, module, scale = stack.pop()
        if id(module) in visited:
            continue
        visited.add(id(module))
        if experts and is_routed_experts(name.rsplit(".", 1)[-1], module, experts):
            scale *= share
        params = [p for p in module._parameters.values() if p is not None]
        if params and not isinstance(module, torch.nn.Embedding):
            flops = int(2 * sum(p.numel() for p in params) * scale)
            if flops:
                result.append((name, flops))
        # Pushed in reverse so they pop in definition order: the first name of a shared module wins.
        for child_name, child in reversed(module._modules.items()):
            if child is not None and id(child) not in visited:
                stack.append((f"{name}.{child_name}" if name else child_name, child, scale))
    return result
