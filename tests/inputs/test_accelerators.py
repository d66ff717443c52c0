"""Every accelerator, not only CUDA: device keys as accelerate takes them (``"xpu:0"``, ``"npu:1"``,
``"hpu"``, ``torch.device`` objects, ints), free memory read through ``torch.accelerator`` (mocked here:
this machine has none), and apply moving weights to the machine's own device type."""

from __future__ import annotations

import pytest
import torch

import devicemap
from devicemap.inputs import memory
from devicemap.loading import apply


@pytest.fixture()
def model():
    with torch.device("meta"):
        return torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])


@pytest.mark.parametrize(
    "gpu0, gpu1",
    [
        ("xpu:0", "xpu:1"),
        ("npu:0", "npu:1"),
        ("mlu:0", "mlu:1"),
        (torch.device("xpu", 0), torch.device("xpu", 1)),
        ("cuda:0", "cuda:1"),
    ],
    ids=["xpu", "npu", "mlu", "torch.device", "cuda"],
)
def test_accelerator_keys_plan_like_gpu_indices(model, gpu0, gpu1):
    by_index = devicemap.plan(model, {0: "1.2MiB", 1: "1.2MiB", "cpu": "1GiB"})
    by_name = devicemap.plan(model, {gpu0: "1.2MiB", gpu1: "1.2MiB", "cpu": "1GiB"})
    assert by_name.device_map == by_index.device_map
    assert {0, 1} <= set(by_name.device_map.values())


def test_a_single_device_accelerator_without_an_index_is_device_0(model):
    assert devicemap.plan(model, {"hpu": "1GiB"}).device_map == {"": 0}
    assert devicemap.plan(model, {0: "1GiB"}, pins={"0": "hpu"}).device_map == {"": 0}


def test_the_same_device_under_two_names_is_refused(model):
    with pytest.raises(devicemap.UnknownDeviceError, match="twice"):
        devicemap.plan(model, {"xpu:0": "1GiB", 0: "1GiB"})


def test_an_unknown_device_type_names_the_accepted_forms(model):
    with pytest.raises(devicemap.UnknownDeviceError, match='"xpu:N"'):
        devicemap.plan(model, {"tpu:0": "1GiB"})


class FakeAcceleratorOfTorch26:
    """torch.accelerator (torch 2.6 to 2.8, no get_memory_info yet) on a machine with two XPUs: 3 GiB
    and 5 GiB free."""

    free = {0: 3 * 2**30, 1: 5 * 2**30}

    def is_available(self) -> bool:
        return True

    def current_accelerator(self) -> torch.device:
        return torch.device("xpu")

    def device_count(self) -> int:
        return len(self.free)


class FakeAccelerator(FakeAcceleratorOfTorch26):
    """torch.accelerator of newer torch on that machine: it reads free memory itself."""

    def get_memory_info(self, index: int) -> tuple[int, int]:
        return self.free[index], 16 * 2**30


@pytest.fixture()
def two_xpus(monkeypatch):
    monkeypatch.setattr(torch, "accelerator", FakeAccelerator(), raising=False)  # torch < 2.6 has none


class FakeXpuBackend:
    """torch.xpu on that machine: what torch's backend modules tell (``mem_get_info`` per device)."""

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return len(FakeAccelerator.free)

    def mem_get_info(self, index: int) -> tuple[int, int]:
        return FakeAccelerator.free[index], 16 * 2**30


@pytest.fixture(params=["torch.accelerator", "torch.accelerator without get_memory_info", "torch < 2.6"])
def two_xpus_any_torch(request, monkeypatch):
    """The two XPUs as each supported torch shows them."""
    monkeypatch.setattr(torch, "xpu", FakeXpuBackend())
    if request.param == "torch.accelerator":
        monkeypatch.setattr(torch, "accelerator", FakeAccelerator(), raising=False)
    elif request.param == "torch.accelerator without get_memory_info":
        monkeypatch.setattr(torch, "accelerator", FakeAcceleratorOfTorch26(), raising=False)
    else:
        monkeypatch.delattr(torch, "accelerator", raising=False)
        for name in ("npu", "mlu", "sdaa", "musa"):  # backends an extension might have added
            monkeypatch.delattr(torch, name, raising=False)


def test_free_memory_of_every_supported_torch(two_xpus_any_torch, model):
    found = devicemap.available_memory()
    assert found[0] == 3 * 2**30 and found[1] == 5 * 2**30 and "cpu" in found
    assert memory.accelerator_type() == "xpu" and memory.accelerator_count() == 2
    assert apply._target(1) == "xpu:1"


def test_free_memory_is_read_through_torch_accelerator(two_xpus, model):
    found = devicemap.available_memory()
    assert found[0] == 3 * 2**30 and found[1] == 5 * 2**30 and "cpu" in found
    assert memory.accelerator_type() == "xpu" and memory.accelerator_count() == 2
    # max_memory=None plans on what the accelerator reports free
    assert set(devicemap.plan(model).device_map.values()) <= {0, 1}


def test_apply_moves_weights_to_the_machines_device_type(two_xpus):
    assert apply._target(1) == "xpu:1"
    assert apply._target("cpu") == "cpu"


def test_without_an_accelerator_gpu_indices_mean_cuda():
    assert memory.accelerator_type() == "cuda"
    assert apply._target(0) == "cuda:0"


def test_apple_mps_on_torch_before_torch_accelerator(monkeypatch):
    """torch < 2.6 has no torch.accelerator: Apple's GPU is found through torch.backends.mps, as
    accelerate finds it, and shares the RAM (no GPU index)."""
    monkeypatch.delattr(torch, "accelerator", raising=False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    found = devicemap.available_memory()
    assert set(found) == {"mps", "cpu"} and found["mps"] > 0
    assert memory.accelerator_count() == 0 and memory.accelerator_type() == "cuda"
