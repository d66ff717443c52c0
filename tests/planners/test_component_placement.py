"""Whole-component placement (diffusers pipeline ``device_map="balanced"``): exact against brute force, better
than diffusers' greedy deal, and reached from unchanged ``DiffusionPipeline.from_pretrained`` code."""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import devicemap.planners.components as component_placement
from devicemap import integrations as dm_install
from devicemap.errors import DoesNotFitError, PlacementError
from devicemap.planners.components import CPU, place_components
from optional_libraries import import_with_torchao

GiB = 1024**3


@pytest.fixture(autouse=True)
def _always_uninstalled():
    dm_install.uninstall()
    yield
    dm_install.uninstall()


@pytest.fixture(autouse=True)
def _gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """devicemap sees 8 GPUs on this CPU machine: the hook refuses budgets naming GPUs a machine lacks, and
    these tests place components on GPUs without loading weights there."""
    import devicemap.inputs.memory

    monkeypatch.setattr(devicemap.inputs.memory, "accelerator_count", lambda: 8)


def brute_force(
    sizes: Mapping[str, int], capacities: Mapping[Hashable, int | None]
) -> dict[str, Hashable] | None:
    """Every assignment of whole components, the best by the documented order: CPU bytes, largest GPU load,
    then the smallest tuple of device positions (GPUs as given, CPU last) over components largest first."""
    gpus = [key for key in capacities if key != CPU]
    cpu_cap = capacities.get(CPU)
    order = sorted(sizes, key=lambda name: (-sizes[name], name))
    best: tuple[tuple[int, int, tuple[int, ...]], tuple[int, ...]] | None = None
    for slots in itertools.product(range(len(gpus) + 1), repeat=len(order)):
        loads = [0] * (len(gpus) + 1)
        for name, slot in zip(order, slots, strict=True):
            loads[slot] += sizes[name]
        if any(loads[i] > (capacities[g] or 0) for i, g in enumerate(gpus)):
            continue
        if cpu_cap is not None and loads[-1] > cpu_cap:
            continue
        key = (loads[-1], max(loads[:-1], default=0), slots)
        if best is None or key < best[0]:
            best = (key, slots)
    if best is None:
        return None
    devices = [*gpus, CPU]
    return {name: devices[slot] for name, slot in zip(order, best[1], strict=True)}


instances = st.tuples(
    st.dictionaries(st.sampled_from("abcdefg"), st.integers(0, 40), min_size=0, max_size=6),
    st.lists(st.integers(0, 70), min_size=0, max_size=3),
    st.one_of(st.none(), st.integers(0, 60)),
)


@settings(max_examples=400, deadline=None)
@given(instances)
def test_placement_equals_brute_force(instance: tuple[dict[str, int], list[int], int | None]) -> None:
    sizes, gpu_caps, cpu_cap = instance
    capacities: dict[Hashable, int | None] = {**dict(enumerate(gpu_caps)), CPU: cpu_cap}
    expected = brute_force(sizes, capacities)
    if expected is None:
        with pytest.raises(DoesNotFitError):
            place_components(sizes, capacities)
        return
    placed = place_components(sizes, capacities)
    assert placed.exact
    assert placed.assignment == expected
    loads = {key: sum(sizes[n] for n, d in expected.items() if d == key) for key in capacities}
    assert placed.device_bytes == loads
    assert placed.cpu_bytes == loads[CPU]
    assert placed.largest_gpu_bytes == max((loads[g] for g in range(len(gpu_caps))), default=0)
    # The input order does not matter.
    assert place_components(dict(reversed(list(sizes.items()))), capacities) == placed


def diffusers_greedy(sizes: dict[str, int], gpu_caps: dict[int, int]) -> dict[str, Any]:
    """diffusers' own ``_assign_components_to_devices`` on its sorted inputs, flattened to ``{component: device}``."""
    plu = pytest.importorskip("diffusers.pipelines.pipeline_loading_utils")
    assign = plu._assign_components_to_devices
    assert not dm_install.is_installed()
    by_size = dict(sorted(sizes.items(), key=lambda item: item[1], reverse=True))
    by_cap = dict(sorted(gpu_caps.items(), key=lambda item: item[1], reverse=True))
    mapping = assign(by_size, by_cap, device_mapping_strategy="balanced")
    return {name: device for device, names in mapping.items() for name in names}


def loads_of(assignment: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[Any, int]:
    loads: dict[Any, int] = {}
    for name, device in assignment.items():
        loads[device] = loads.get(device, 0) + sizes[name]
    return loads


SIZES = {
    "transformer": 5 * GiB,
    "text_encoder_3": 4 * GiB,
    "text_encoder": 3 * GiB,
    "vae": 3 * GiB,
    "text_encoder_2": 3 * GiB,
}


def test_smaller_largest_gpu_load_than_diffusers_greedy() -> None:
    gpus = {0: 100 * GiB, 1: 100 * GiB}
    greedy = diffusers_greedy(SIZES, gpus)
    greedy_loads = loads_of(greedy, SIZES)
    placed = place_components(SIZES, {**gpus, CPU: None})
    # diffusers deals 0, 1, 1, 0, 0: GPU 0 gets 5 + 3 + 3 = 11 GiB, GPU 1 7 GiB; 9 + 9 is possible.
    assert greedy_loads == {0: 11 * GiB, 1: 7 * GiB}
    assert placed.largest_gpu_bytes == 9 * GiB
    assert max(greedy_loads.values()) != placed.largest_gpu_bytes
    assert placed.device_bytes == {0: 9 * GiB, 1: 9 * GiB, CPU: 0}


def test_fewer_cpu_bytes_than_diffusers_greedy() -> None:
    gpus = {0: 9 * GiB, 1: 9 * GiB}
    greedy_loads = loads_of(diffusers_greedy(SIZES, gpus), SIZES)
    placed = place_components(SIZES, {**gpus, CPU: None})
    # GPU 0 has 1 GiB left when the last 3 GiB component's turn comes back to it: diffusers sends it to the CPU.
    assert greedy_loads.get(CPU) == 3 * GiB
    assert placed.cpu_bytes == 0
    assert placed.largest_gpu_bytes == 9 * GiB


def test_beyond_the_exact_limit_greedy_is_used_and_marked() -> None:
    sizes = {f"c{i:02}": size for i, size in enumerate([5, 4, 3, 3, 3])}
    placed = place_components(sizes, {0: 100, 1: 100}, exact_limit=4)
    assert not placed.exact
    # Largest first onto the least-loaded GPU: 5 -> 0, 4 -> 1, 3 -> 1, 3 -> 0, 3 -> 1: 8 and 10, not 9.
    assert placed.device_bytes == {0: 8, 1: 10, CPU: 0}
    assert place_components(sizes, {0: 100, 1: 100}).largest_gpu_bytes == 9


def test_the_search_cap_returns_the_best_found_marked_not_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = {f"c{i:02}": 7 + 3 * i for i in range(10)}
    full = place_components(sizes, {0: 10**6, 1: 10**6, 2: 10**6})
    assert full.exact
    monkeypatch.setattr(component_placement, "NODE_LIMIT", 5)
    cut = place_components(sizes, {0: 10**6, 1: 10**6, 2: 10**6})
    assert not cut.exact
    assert cut.largest_gpu_bytes >= full.largest_gpu_bytes


def test_bad_input() -> None:
    with pytest.raises(PlacementError, match="negative size"):
        place_components({"unet": -1}, {0: 10})
    with pytest.raises(PlacementError, match="capacity"):
        place_components({"unet": 1}, {0: -10})
    with pytest.raises(DoesNotFitError, match="do not fit"):
        place_components({"unet": 10, "vae": 10}, {0: 10, CPU: 5})
    assert place_components({}, {0: 10}).assignment == {}
    assert place_components({"unet": 3}, {}).assignment == {"unet": CPU}


def test_hook_falls_back_to_diffusers_with_one_warning() -> None:
    from devicemap.integrations.diffusers import make_assign_components

    calls: list[tuple[Any, Any, str]] = []

    def original(sizes: Any, memory: Any, device_mapping_strategy: str = "balanced") -> Any:
        calls.append((sizes, memory, device_mapping_strategy))
        return {"own": list(sizes)}

    hooked = make_assign_components(original)
    assert hooked({"unet": 5, "vae": 3}, {0: 6, 1: 6}) == {0: ["unet"], 1: ["vae"]}
    assert not calls
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert hooked({"unet": 5}, {0: 6, "disk": 100}) == {"own": ["unet"]}
        assert hooked({"unet": 5}, {0: 6}, device_mapping_strategy="auto") == {"own": ["unet"]}
    assert len(calls) == 2
    assert [str(w.message) for w in caught if "devicemap" in str(w.message)]


# A tiny Stable Diffusion pipeline saved locally: UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer.


@pytest.fixture(scope="module")
def pipeline_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    diffusers = import_with_torchao("diffusers")
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("sd")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=2,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
    )
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=100,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    tokenizer = transformers.CLIPTokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16
    )
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path / "pipe")
    return path / "pipe"


def load_pipeline(
    monkeypatch: pytest.MonkeyPatch, path: Path, max_memory: dict[Any, Any]
) -> tuple[Any, dict[str, Any]]:
    """Unchanged ``DiffusionPipeline.from_pretrained(path, device_map="balanced", max_memory=...)``; each
    component's device map is recorded and the component loaded on the CPU (there is no GPU here)."""
    import diffusers
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    seen: dict[str, Any] = {}
    load_sub_model: Any = pipeline_utils.load_sub_model

    def on_cpu(*args: Any, device_map: Any = None, name: str = "", **kwargs: Any) -> Any:
        seen[name] = device_map
        return load_sub_model(*args, device_map=None, name=name, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline_utils, "load_sub_model", on_cpu)
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            path, device_map="balanced", max_memory=dict(max_memory)
        )
    return pipe, seen


def test_pipeline_balanced_uses_devicemap_after_install(
    monkeypatch: pytest.MonkeyPatch, pipeline_path: Path
) -> None:
    from accelerate.utils import compute_module_sizes

    own_pipe, _ = load_pipeline(monkeypatch, pipeline_path, {0: GiB, 1: GiB, CPU: GiB})
    # Sized as diffusers sizes them (accelerate's compute_module_sizes at the pipeline dtype, fp32 here).
    sizes = {
        name: compute_module_sizes(getattr(own_pipe, name), dtype=torch.float32)[""]
        for name in ("unet", "vae", "text_encoder")
    }
    big, middle, small = sorted(sizes.values(), reverse=True)
    # GPU 0 holds the largest and the smallest exactly, GPU 1 the middle one and half the smallest: diffusers
    # deals largest -> 0, middle -> 1, smallest -> 1 (no room) -> CPU; every component fits on the GPUs.
    gpus = {0: big + small, 1: middle + small // 2}
    budget: dict[Any, int] = {**gpus, CPU: GiB}

    own, own_seen = load_pipeline(monkeypatch, pipeline_path, budget)
    with dm_install.installed() as patched:
        assert "diffusers.pipelines.pipeline_loading_utils._assign_components_to_devices" in patched
        hooked, hooked_seen = load_pipeline(monkeypatch, pipeline_path, budget)
    again, _ = load_pipeline(monkeypatch, pipeline_path, budget)

    expected = place_components(sizes, {**gpus, CPU: None})
    assert expected.cpu_bytes == 0
    assert hooked.hf_device_map == expected.assignment
    assert {name: hooked_seen[name] for name in sizes} == {
        name: {"": d} for name, d in expected.assignment.items()
    }
    assert own.hf_device_map == diffusers_greedy(sizes, gpus)
    assert loads_of(own.hf_device_map, sizes).get(CPU) == small
    assert own.hf_device_map != hooked.hf_device_map
    assert again.hf_device_map == own.hf_device_map
    assert own_seen["text_encoder"] == {"": CPU}
