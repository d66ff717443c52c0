"""devicemap.compat must return exactly what accelerate returns, on hundreds of random models.

accelerate is the oracle: whichever release is installed (or first on PYTHONPATH: see
``tests/compat_matrix.py`` to run this over several releases), same model, same arguments, in the same
process. Inputs on which accelerate itself raises are not comparisons and are filtered out (counted by
hypothesis as rejected examples), after checking devicemap reports accelerate's crash as
AccelerateCompatError where devicemap documents it does.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings

import pytest
import torch
from accelerate.utils import get_balanced_memory as acc_balanced
from accelerate.utils import infer_auto_device_map as acc_infer
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from devicemap import AccelerateCompatError
from devicemap.compat import get_balanced_memory, infer_auto_device_map
from devicemap.compat.versions import installed_accelerate

from model_strategies import describe, max_memories, models, no_split_classes

# DEVICEMAP_EXAMPLES=5000 pytest tests/compat/test_compat_accelerate.py  for a longer hunt.
EXAMPLES = int(os.environ.get("DEVICEMAP_EXAMPLES", "300"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
dtypes = st.sampled_from([None, "float16", torch.bfloat16, torch.float32])
# accelerate 1.0 - 1.1 have no fallback_allocation (devicemap then refuses True, see the test below).
HAS_FALLBACK = "fallback_allocation" in inspect.signature(acc_infer).parameters
fallbacks = st.booleans() if HAS_FALLBACK else st.just(None)


def fallback_kwargs(fallback):
    return {} if fallback is None else {"fallback_allocation": fallback}


def accelerate_or_reject(fn, *args, **kwargs):
    """accelerate's result; an input it crashes on is rejected, after checking devicemap reports the
    crashes it documents (IndexError or AttributeError on tied parameters, KeyError for low_zero's GPU
    numbering) as AccelerateCompatError instead of guessing."""
    ours = {acc_infer: infer_auto_device_map, acc_balanced: get_balanced_memory}[fn]
    try:
        return fn(*args, **kwargs)
    except (IndexError, AttributeError, KeyError) as err:
        # fallback_allocation with fractional (bool) sizes: accelerate calls .upper() on a float limit;
        # devicemap places those (not a documented crash)
        documented = not isinstance(err, AttributeError) or "named_children" in str(err)
        event(f"accelerate raises {type(err).__name__}{'' if documented else ' (not reproduced)'}")
        if documented:
            with pytest.raises(AccelerateCompatError):
                ours(*args, **kwargs)
        assume(False)
    except (ValueError, RuntimeError, TypeError):
        assume(False)


@SETTINGS
@given(data=st.data(), model=models(), no_split=no_split_classes, dtype=dtypes)
def test_infer_auto_device_map_matches_accelerate(data, model, no_split, dtype):
    max_memory = data.draw(max_memories(model))
    note(describe(model))
    clean = data.draw(st.booleans())
    fallback = data.draw(fallbacks)
    kwargs = dict(
        no_split_module_classes=no_split, dtype=dtype, clean_result=clean, **fallback_kwargs(fallback)
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


def _blocks() -> torch.nn.Module:
    block = type("Block", (torch.nn.Module,), {})

    def make() -> torch.nn.Module:
        b = block()
        b.a = torch.nn.Linear(8, 8)
        b.b = torch.nn.Linear(8, 8)
        return b

    return torch.nn.Sequential(make(), make(), make())


@pytest.mark.parametrize(
    "classes",
    [
        lambda: {"Block"},
        lambda: frozenset({"Block"}),
        lambda: {"Block": True},
        lambda: (c for c in ["Block"]),
        lambda: "Block",
        lambda: ("Block",),
        lambda: ["Block", 3],
        lambda: None,
    ],
    ids=["set", "frozenset", "dict", "generator", "str", "tuple", "list-with-int", "none"],
)
def test_no_split_module_classes_of_any_type_read_like_accelerate(classes):
    """accelerate 1.14 changed how a value that is not a list or tuple is read."""
    model = _blocks()
    for memory in ({0: 1300, "cpu": 10_000}, {0: 1300, 1: 1300, "cpu": 10_000}):
        expected = dict(acc_infer(model, max_memory=dict(memory), no_split_module_classes=classes()))
        assert (
            infer_auto_device_map(model, max_memory=dict(memory), no_split_module_classes=classes())
            == expected
        )
        try:
            budget = acc_balanced(model, max_memory=dict(memory), no_split_module_classes=classes())
        except TypeError:  # before 1.14 an unhashable value crashes set(no_split_module_classes)
            continue
        assert (
            get_balanced_memory(model, max_memory=dict(memory), no_split_module_classes=classes()) == budget
        )


@pytest.mark.parametrize("gpus", [(0, 1, 2), (0, 2, 5), (1, 2), (0, 3)])
def test_low_zero_with_any_gpu_numbers_like_accelerate(gpus):
    """accelerate 1.16 reads the GPUs listed after the first for low_zero; before, GPUs 1 .. n-1."""
    model = _blocks()
    memory = {**{g: 1000 for g in gpus}, "cpu": 10_000}
    try:
        expected = acc_balanced(model, max_memory=dict(memory), low_zero=True)
    except KeyError:
        with pytest.raises(AccelerateCompatError):
            get_balanced_memory(model, max_memory=dict(memory), low_zero=True)
        return
    assert get_balanced_memory(model, max_memory=dict(memory), low_zero=True) == expected


RARE_DTYPES = [
    "float8_e4m3fn",
    "float8_e5m2",  # 0 bytes before accelerate 1.8
    "float8_e4m3fnuz",  # ValueError before 1.14
    "float8_e8m0fnu",
    "uint4",  # sub-byte and packed dtypes: 0 bytes before 1.16, torch's element size from 1.16
    "int2",
    "float4_e2m1fn_x2",
    "quint4x2",
    "bits2x4",
    "complex32",
]


def _calls(function, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = function(*args, **kwargs)
    return dict(result), [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("name", [n for n in RARE_DTYPES if hasattr(torch, n)])
@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns creating complex32 and quantized tensors
def test_tensors_of_rare_dtypes_are_sized_like_accelerate(name):
    """accelerate's dtype_byte_size changed in 1.8, 1.14 and 1.16: buffers of such dtypes change maps,
    budgets and the offloaded-buffers warning."""
    dtype = getattr(torch, name)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(3)])  # 288 bytes each
    for i, layer in enumerate(model):
        layer.register_buffer("extra", torch.empty(400 * (i + 1), dtype=dtype))
    for memory in ({0: 700, "cpu": 5000}, {0: 2000, 1: 2000}):
        try:
            expected = _calls(acc_infer, model, max_memory=dict(memory))
        except ValueError:
            with pytest.raises(AccelerateCompatError, match="cannot size"):
                infer_auto_device_map(model, max_memory=dict(memory))
            continue
        assert _calls(infer_auto_device_map, model, max_memory=dict(memory)) == expected
        budget = acc_balanced(model, max_memory=dict(memory))
        assert get_balanced_memory(model, max_memory=dict(memory)) == budget


def test_string_sizes_are_read_like_accelerate():
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 100))
    for memory in ({0: "50KB", "cpu": "1MiB"}, {0: "0.05MB", "cpu": "8Mb"}, {0: "40 KiB", "cpu": "1GB"}):
        assert infer_auto_device_map(model, max_memory=dict(memory)) == dict(
            acc_infer(model, max_memory=dict(memory))
        )


@pytest.mark.skipif(HAS_FALLBACK, reason="the installed accelerate has fallback_allocation")
def test_fallback_allocation_is_refused_where_accelerate_lacks_it():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    memory = {0: 100, "cpu": 1000}
    with pytest.raises(TypeError, match="fallback_allocation"):
        acc_infer(model, max_memory=dict(memory), fallback_allocation=True)
    with pytest.raises(TypeError, match="fallback_allocation"):
        infer_auto_device_map(model, max_memory=dict(memory), fallback_allocation=True)
    # False asks for nothing the release lacks: accepted (accelerate refuses any value)
    assert infer_auto_device_map(model, max_memory=dict(memory), fallback_allocation=False) == dict(
        acc_infer(model, max_memory=dict(memory))
    )


def test_the_version_devicemap_follows_is_the_one_imported():
    """devicemap reads the release from the package metadata; it must be the accelerate imported here
    (a PYTHONPATH copy without its .dist-info would make them disagree)."""
    import accelerate

    from devicemap.compat.versions import AccelerateRelease

    assert installed_accelerate() == AccelerateRelease.parse(accelerate.__version__)


def test_unknown_device_key_is_rejected_like_accelerate():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="tpu"):
        acc_infer(model, max_memory={"tpu": 10})
    with pytest.raises(ValueError, match="tpu"):
        infer_auto_device_map(model, max_memory={"tpu": 10})
