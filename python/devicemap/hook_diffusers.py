"""diffusers: ``ModelMixin.from_pretrained`` / ``from_single_file`` with a strategy-string ``device_map``.

Both call the module global ``_determine_device_map(model, device_map, max_memory, torch_dtype,
keep_in_fp32_modules, hf_quantizer)`` (imported into ``diffusers.models.modeling_utils`` and
``diffusers.loaders.single_file_model``) on the meta model, then load with the dict it returns. The
replacement plans with devicemap: weights sized at ``torch_dtype``, ``keep_in_fp32_modules`` (matched as
substrings of parameter names, as diffusers does) at fp32, no-split classes from the model.

Pipeline-level ``device_map="balanced"`` (whole components spread over GPUs) is not hooked yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .hook_common import Unrecognised, is_strategy, keep_in_fp32_dtypes, plan_for_loader


def make_determine(original: Callable[..., Any]) -> Callable[..., Any]:
    """The replacement for diffusers' ``_determine_device_map``."""
    from .hooks import warn_once

    def _determine_device_map(
        model: Any,
        device_map: Any,
        max_memory: Any,
        torch_dtype: Any,
        keep_in_fp32_modules: Any = None,
        hf_quantizer: Any = None,
    ) -> Any:
        fp32 = list(keep_in_fp32_modules or [])
        if not is_strategy(device_map):
            return original(model, device_map, max_memory, torch_dtype, fp32, hf_quantizer)
        try:
            planned = plan_for_loader(
                model,
                max_memory,
                device_map,
                no_split_module_classes=model._get_no_split_modules(device_map),
                dtype=torch_dtype,
                special_dtypes=keep_in_fp32_dtypes(model, fp32),
                quantizer=hf_quantizer,
            )
        except Unrecognised as reason:
            warn_once(f"diffusers from_pretrained(device_map={device_map!r}): {reason}")
            return original(model, device_map, max_memory, torch_dtype, fp32, hf_quantizer)
        return dict(planned.device_map)

    _determine_device_map.__wrapped__ = original  # type: ignore[attr-defined]
    return _determine_device_map
