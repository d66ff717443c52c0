"""devicemap.compat must return exactly what accelerate returns, on hundreds of random models.

accelerate is the oracle: same model, same arguments, in the same process. Inputs on which accelerate
itself raises are not comparisons and are filtered out (counted by hypothesis as rejected examples).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from accelerate.utils import get_balanced_memory as acc_balanced
from accelerate.utils import infer_auto_device_map as acc_infer
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from devicemap import AccelerateCompatError
from devicemap.compat import get_balanced_memory, infer_auto_device_map

from model_strategies import describe, max_memories, models, no_split_classes

# DEVICEMAP_EXAMPLES=5000 pytest tests/test_compat_accelerate.py  for a longer hunt.
EXAMPLES = int(os.environ.get("DEVICEMAP_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
dtypes = st.sampled_from([None, "float16", torch.bfloat16, torch.float32])


def accelerate_or_reject(fn, *args, **kwargs):
    """accelerate's result; an input it crashes on is rejected (after checking devicemap reports
    accelerate's IndexError on tied parameters as AccelerateCompatError instead of guessing)."""
    try:
        return fn(*args, **kwargs)
    except IndexError:
        if fn is acc_infer:
            with pytest.raises(AccelerateCompatError):
                infer_auto_device_map(*args, **kwargs)
        assume(False)
    except (ValueError, AttributeError, KeyError, RuntimeError, TypeError):
        # e.g. fallback_allocation with fractional (bool) sizes: accelerate calls .upper() on a float
        assume(False)


@SETTINGS
@given(data=st.data(), model=models(), no_split=no_split_classes, dtype=dtypes)
def test_infer_auto_device_map_matches_accelerate(data, model, no_split, dtype):
    max_memory = data.draw(max_memories(model))
    note(describe(model))
    clean = data.draw(st.booleans())
    fallback = data.draw(st.booleans())
    kwargs = dict(
        no_split_module_classes=no_split, dtype=dtype, clean_result=clean, fallback_allocation=fallback
    )
    expected = accelerate_or_reject(acc_infer, model, max_memory=copy.deepcopy(max_memory), **kwargs)
    got = infer_auto_device_map(model, max_memory=copy.deepcopy(max_memory), **kwargs)
    event(f"devices used: {len(set(expected.values()))}")
    assert got == dict(expected)


@SETTINGS
@given(data=st.data(), model=models(), no_split=no_split_classes, dtype=dtypes, low_zero=st.booleans())
def test_get_balanced_memory_matches_accelerate(data, model, no_split, dtype, low_zero):
    max_memory = data.draw(max_memories(model, allow_disk=False))
    kwargs = dict(no_split_module_classes=no_split, dtype=dtype, low_zero=low_zero)
    expected = accelerate_or_reject(acc_balanced, model, max_memory=copy.deepcopy(max_memory), **kwargs)
    got = get_balanced_memory(model, max_memory=copy.deepcopy(max_memory), **kwargs)
    assert got == expected
    assert list(got) == list(expected)


@SETTINGS
@given(data=st.data(), model=models(), no_split=no_split_classes)
def test_balanced_pipeline_matches_accelerate(data, model, no_split):
    """What transformers does for device_map="balanced": budget, then placement."""
    max_memory = data.draw(max_memories(model, allow_disk=False))
    budget = accelerate_or_reject(
        acc_balanced, model, max_memory=copy.deepcopy(max_memory), no_split_module_classes=no_split
    )
    expected = accelerate_or_reject(
        acc_infer, model, max_memory=copy.deepcopy(budget), no_split_module_classes=no_split
    )
    ours_budget = get_balanced_memory(
        model, max_memory=copy.deepcopy(max_memory), no_split_module_classes=no_split
    )
    assert ours_budget == budget
    got = infer_auto_device_map(model, max_memory=ours_budget, no_split_module_classes=no_split)
    assert got == dict(expected)


def test_string_sizes_are_read_like_accelerate():
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 100))
    for memory in ({0: "50KB", "cpu": "1MiB"}, {0: "0.05MB", "cpu": "8Mb"}, {0: "40 KiB", "cpu": "1GB"}):
        assert infer_auto_device_map(model, max_memory=dict(memory)) == dict(
            acc_infer(model, max_memory=dict(memory))
        )


def test_unknown_device_key_is_rejected_like_accelerate():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="tpu"):
        acc_infer(model, max_memory={"tpu": 10})
    with pytest.raises(ValueError, match="tpu"):
        infer_auto_device_map(model, max_memory={"tpu": 10})
