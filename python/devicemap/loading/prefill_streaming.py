"""Blocks run on the CPU that compute long passes (prefill) on a GPU: ``Plan.prefill_streams`` made so.

A block stored and run on the CPU gets, after its own accelerate hook (which brings its inputs to the
CPU), one more hook. For a pass of fewer tokens than the stream's threshold (decoding) it does nothing.
For a longer pass it copies the block's weights and buffers and its inputs to the GPU, lets the block
compute there, brings the outputs back to the CPU and drops the GPU copies, so between passes the block
takes no GPU memory beyond what the plan kept free for it (llama.cpp does the same for CPU-stored
experts at batches of 32 tokens and more). Tokens of a pass: the elements of the first tensor argument
over its last dimension (``batch x sequence`` hidden states, or ``tokens`` rows routed to experts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..plans import PrefillStream


def attach_prefill_streaming(
    model: torch.nn.Module, streams: Mapping[str, PrefillStream], device_of: Any
) -> None:
    """Add the streaming hook to every block of ``streams``; ``device_of(gpu_index)`` is the torch device
    (a rehearsal's stand-in) the stream computes on."""
    from accelerate.hooks import add_hook_to_module

    for name, stream in streams.items():
        module = model.get_submodule(name)
        add_hook_to_module(module, _hook(device_of(stream.device), stream.min_tokens), append=True)


def _hook(device: Any, min_tokens: int) -> Any:
    from accelerate.hooks import ModelHook
    from accelerate.utils import send_to_device

    class PrefillStreamingHook(ModelHook):  # type: ignore[misc]  # accelerate is untyped
        """Computes passes of at least ``min_tokens`` tokens on ``device`` (module docstring)."""

        def __init__(self) -> None:
            self.saved: list[tuple[dict[str, Any], str, Any]] = []
            self.home: Any = None

        def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            self._restore()  # a pass that raised left its copies in place
            if _tokens(args, kwargs) < min_tokens:
                return args, kwargs
            copies: dict[int, Any] = {}  # a tensor tied within the block is copied once
            for owner in module.modules():
                for table in (owner._parameters, owner._buffers):
                    for key, tensor in list(table.items()):
                        if tensor is None:
                            continue
                        if id(tensor) not in copies:
                            copies[id(tensor)] = _moved(tensor, device)
                        self.saved.append((table, key, tensor))
                        table[key] = copies[id(tensor)]
            self.home = _first_tensor_device(args, kwargs)
            return send_to_device(args, device), send_to_device(kwargs, device)

        def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
            if not self.saved:
                return output
            self._restore()
            return send_to_device(output, self.home)

        def _restore(self) -> None:
            for table, key, tensor in reversed(self.saved):
                table[key] = tensor
            self.saved = []

    return PrefillStreamingHook()


def _moved(tensor: Any, device: Any) -> Any:
    import torch

    copy = tensor.data.to(device)
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
    return copy


def _tensors(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
    import torch

    return [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]


def _tokens(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """Tokens of a pass: the first tensor's elements over its last dimension."""
    tensors = _tensors(args, kwargs)
    if not tensors or tensors[0].dim() == 0:
        return 0
    first = tensors[0]
    return int(first.numel() // max(1, first.shape[-1]))


def _first_tensor_device(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    tensors = _tensors(args, kwargs)
    return tensors[0].device if tensors else "cpu"
