"""devicemap.compat follows the installed accelerate release: the release is read once, each behaviour
that changed within accelerate 1.x switches at the release that changed it. These tests pretend other
releases are installed (the comparisons with a real accelerate of each release are the hypothesis tests
of test_compat_accelerate.py / test_compat_warnings.py, run over releases by tests/compat_matrix.py)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

import devicemap.compat as compat
from devicemap import AccelerateCompatError
from devicemap.compat import get_balanced_memory, get_max_memory, infer_auto_device_map
from devicemap.compat.versions import NEWEST_CHECKED, AccelerateRelease, installed_accelerate


@pytest.fixture
def release(monkeypatch):
    """``release("1.13.0")`` makes devicemap.compat behave as with that accelerate installed."""

    def pretend(text: str) -> AccelerateRelease:
        found = AccelerateRelease.parse(text)
        monkeypatch.setattr(compat, "installed_accelerate", lambda: found)
        return found

    return pretend


def test_release_numbers_are_read_as_packaging_prints_them():
    assert AccelerateRelease.parse("1.16.0").version == (1, 16, 0)
    assert AccelerateRelease.parse("1.2").version == (1, 2, 0)
    assert AccelerateRelease.parse("1.17.0.dev0").version == (1, 17, 0)
    assert AccelerateRelease.parse("1.3.0rc1").version == (1, 3, 0)
    assert AccelerateRelease.parse("0.34.2").core_version == (1, 0, 0)  # below the floor: as 1.0
    with pytest.raises(ValueError):
        AccelerateRelease.parse("main")


def test_the_installed_release_is_read_once():
    import importlib.metadata

    assert installed_accelerate() is installed_accelerate()
    assert installed_accelerate() == AccelerateRelease.parse(importlib.metadata.version("accelerate"))
    assert NEWEST_CHECKED >= (1, 16, 0)


@pytest.mark.parametrize(
    ("predicate", "first"),
    [
        ("has_fallback_allocation", (1, 2, 0)),
        ("reads_decoder_text_config", (1, 7, 0)),
        ("no_split_takes_any_iterable", (1, 14, 0)),
        ("counts_mps", (1, 6, 0)),
        ("counts_integer_keys_directly", (1, 15, 0)),
        ("backend_decides_device_type", (1, 16, 0)),
        ("low_zero_reads_listed_gpus", (1, 16, 0)),
        ("integrated_cuda_shares_ram", (1, 15, 0)),
    ],
)
def test_each_behaviour_starts_at_its_release(predicate, first):
    major, minor, _ = first
    before = AccelerateRelease((major, minor - 1, 9))
    assert not getattr(before, predicate)
    assert getattr(AccelerateRelease(first), predicate)
    assert getattr(AccelerateRelease((1, 99, 0)), predicate)


def test_the_deprecated_warn_ends_at_1_8():
    assert AccelerateRelease((1, 7, 0)).warns_with_deprecated_logger_warn
    assert not AccelerateRelease((1, 8, 0)).warns_with_deprecated_logger_warn


def _blocks() -> torch.nn.Module:
    block = type("Block", (torch.nn.Module,), {})

    def make() -> torch.nn.Module:
        b = block()
        b.a = torch.nn.Linear(8, 8)  # 288 bytes
        b.b = torch.nn.Linear(8, 8)
        return b

    return torch.nn.Sequential(make(), make())


def test_no_split_classes_as_a_set_count_from_1_14(release):
    model = _blocks()  # two Blocks of 576 bytes, each two 288-byte Linears
    memory = {0: 900, "cpu": 10_000}
    split = {"0": 0, "1": "cpu"}  # what accelerate 1.13 and 1.16 return with no class kept whole
    whole = {"": "cpu"}  # ... and with Block kept whole (GPU 0 keeps a Block's room free)
    release("1.13.0")  # a set is one entry that matches no class
    assert infer_auto_device_map(model, max_memory=dict(memory), no_split_module_classes={"Block"}) == split
    release("1.14.0")  # list({"Block"})
    assert infer_auto_device_map(model, max_memory=dict(memory), no_split_module_classes={"Block"}) == whole
    for version in ("1.13.0", "1.14.0"):  # a str is one class everywhere, a tuple a list
        release(version)
        for classes in ("Block", ("Block",)):
            assert (
                infer_auto_device_map(model, max_memory=dict(memory), no_split_module_classes=classes)
                == whole
            )
        assert infer_auto_device_map(model, max_memory=dict(memory)) == split


def test_fallback_allocation_needs_1_2(release):
    model = _blocks()
    release("1.1.1")
    with pytest.raises(TypeError, match="fallback_allocation"):
        infer_auto_device_map(model, max_memory={0: 100, "cpu": 10_000}, fallback_allocation=True)
    assert infer_auto_device_map(model, max_memory={0: 100, "cpu": 10_000}, fallback_allocation=False)
    release("1.2.0")
    assert infer_auto_device_map(model, max_memory={0: 100, "cpu": 10_000}, fallback_allocation=True)


def test_low_zero_reads_the_listed_gpus_from_1_16(release):
    model = _blocks()  # 1152 bytes
    memory = {0: 10_000, 2: 10_000, 5: 400, "cpu": 10_000}
    release("1.15.0")  # reads GPUs 1 and 2: KeyError in accelerate
    with pytest.raises(AccelerateCompatError, match="GPU 1"):
        get_balanced_memory(model, max_memory=dict(memory), low_zero=True)
    release("1.16.0")  # GPUs 2 and 5: GPU 0 keeps what they cannot hold (as accelerate 1.16 returns)
    assert get_balanced_memory(model, max_memory=dict(memory), low_zero=True) == {
        0: 0,
        2: 936,
        5: 400,
        "cpu": 10_000,
    }


def test_the_untied_weights_warning_went_through_logger_warn_before_1_8(release, tiny_llama, caplog):
    import copy

    model = copy.deepcopy(tiny_llama)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # declared, not tied
    for version, deprecation in (("1.7.0", True), ("1.8.0", False)):
        release(version)
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, "accelerate"):
            warnings.simplefilter("always")
            infer_auto_device_map(model, max_memory={0: 10**6, "cpu": 10**8})
        assert any("not tied" in r.getMessage() for r in caplog.records)
        assert (
            any(w.category is DeprecationWarning and "'warn'" in str(w.message) for w in caught)
            == deprecation
        )


def test_machine_memory_follows_accelerate(monkeypatch, release):
    """get_max_memory() without arguments: RAM as "mps" only on Apple silicon; no "cpu" beside an
    integrated CUDA GPU from 1.15."""
    from types import SimpleNamespace

    monkeypatch.setattr(compat, "available_memory", lambda: {"mps": 64, "cpu": 64})
    assert get_max_memory() == {"mps": 64}

    monkeypatch.setattr(compat, "available_memory", lambda: {0: 8, "cpu": 64})
    monkeypatch.setattr(compat, "_accelerator", lambda: SimpleNamespace(type="cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(is_integrated=True))
    release("1.14.0")
    assert get_max_memory() == {0: 8, "cpu": 64}
    release("1.15.0")
    assert get_max_memory() == {0: 8}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(is_integrated=False))
    assert get_max_memory() == {0: 8, "cpu": 64}


def test_gpu_keys_are_counted_through_torch_device_before_1_15(monkeypatch, release):
    """Before 1.15 get_balanced_memory asks torch.device(key) for the type of every key; torch builds
    without an accelerator refuse integer keys there, and accelerate crashes."""
    model = _blocks()
    memory = {0: 10_000, 1: 10_000, "cpu": 10_000}
    real_device = torch.device

    def refusing(key, *args):
        if isinstance(key, int):
            raise RuntimeError("Cannot access accelerator device when none is available.")
        return real_device(key, *args)

    expected = get_balanced_memory(model, max_memory=dict(memory))
    monkeypatch.setattr(torch, "device", refusing)
    release("1.14.0")
    with pytest.raises(AccelerateCompatError, match="torch.device|cannot read device"):
        get_balanced_memory(model, max_memory=dict(memory))
    release("1.15.0")
    assert get_balanced_memory(model, max_memory=dict(memory)) == expected


@pytest.mark.parametrize(
    ("name", "sizes"),
    [  # bits per element under accelerate 1.7, 1.8, 1.14, 1.16 (None: accelerate raises ValueError)
        ("float16", [16, 16, 16, 16]),
        ("bool", [1, 1, 1, 1]),
        ("float8_e4m3fn", [8, 8, 8, 8]),
        ("float8_e5m2", [0, 8, 8, 8]),
        ("float8_e4m3fnuz", [None, None, 8, 8]),
        ("uint4", [0, 0, 0, 8]),
        ("quint4x2", [0, 0, 0, 8]),
        ("complex32", [32, 32, 32, 32]),
    ],
)
def test_dtype_sizes_follow_the_release(name, sizes):
    if not hasattr(torch, name):
        pytest.skip(f"torch {torch.__version__} has no {name}")
    dtype = getattr(torch, name)
    for version, expected in zip([(1, 7, 0), (1, 8, 0), (1, 14, 0), (1, 16, 0)], sizes, strict=True):
        if expected is None:
            with pytest.raises(AccelerateCompatError, match="cannot size"):
                AccelerateRelease(version).element_bits(dtype)
        else:
            assert AccelerateRelease(version).element_bits(dtype) == expected, version
