"""devicemap.install(): unchanged loader calls use devicemap's plans; uninstall() gives the libraries back.

Real loads use only "cpu" and "disk" (no GPU here); plans naming GPUs are checked by stopping the load
right after the map is computed (transformers' ``_load_pretrained_model``, accelerate's
``load_checkpoint_in_model``), which is what would move weights to the GPUs.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import pytest
import torch

import devicemap
from devicemap import integrations as dm_install
from devicemap.integrations import fallbacks
from repo import REPO
from tiny_models import tiny_llama_config

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

import accelerate.big_modeling as big_modeling  # noqa: E402
import transformers.modeling_utils as modeling_utils  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    T5Config,
)

from optional_libraries import import_bitsandbytes_for_transformers, import_with_torchao  # noqa: E402

Strategy = Literal["auto", "balanced", "balanced_low_0", "sequential"]
GPU_BUDGET: dict[int | str, int | str] = {0: "700KiB", 1: "700KiB", "cpu": "1GiB"}
CPU_DISK_BUDGET: dict[int | str, int | str] = {"cpu": "600KiB", "disk": "1GiB"}


@pytest.fixture(autouse=True)
def _always_uninstalled():
    dm_install.uninstall()
    yield
    dm_install.uninstall()


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """devicemap sees two GPUs on this CPU machine: plans naming GPUs 0 and 1 are checked by stopping the load
    before any weight moves (otherwise the hooks refuse a budget naming GPUs this machine lacks)."""
    monkeypatch.setattr(devicemap.inputs.memory, "accelerator_count", lambda: 2)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (tied embeddings) saved with random weights."""
    torch.manual_seed(0)
    config = tiny_llama_config(tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t5_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny T5 saved in fp16 (its ``wo`` weights load as fp32: ``_keep_in_fp32_modules``)."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=500, d_model=64, d_ff=128, num_layers=3, num_heads=4, d_kv=16)
    path = tmp_path_factory.mktemp("t5")
    AutoModelForSeq2SeqLM.from_config(config).to(torch.float16).save_pretrained(path)
    return path


def meta_model(path: Path, auto_class: Any = AutoModelForCausalLM, dtype: torch.dtype | None = None) -> Any:
    """The saved model's architecture on the meta device, ties live (as a user would plan it)."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return auto_class.from_config(config, dtype=dtype)


def empty_model(path: Path, tie: bool = True) -> Any:
    """The model as accelerate's users build it: ``init_empty_weights`` (weights on meta, buffers such as
    rotary frequencies real), which re-creates every parameter, so ties are not live until ``tie_weights``."""
    with accelerate.init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    if tie:
        model.tie_weights()
    return model


class _Stop(Exception):
    def __init__(self, device_map: dict[str, Any]):
        super().__init__("stopped after planning")
        self.device_map = dict(device_map)


def planned_by_from_pretrained(
    monkeypatch: pytest.MonkeyPatch, path: Path, strategy: Strategy
) -> dict[str, Any]:
    """The map unchanged ``from_pretrained`` code computes, taken just before any weight is loaded."""

    def stop(model: Any, state_dict: Any, files: Any, load_config: Any, *args: Any, **kwargs: Any) -> Any:
        raise _Stop(load_config.device_map)

    with monkeypatch.context() as patch:
        patch.setattr(modeling_utils.PreTrainedModel, "_load_pretrained_model", staticmethod(stop))
        with pytest.raises(_Stop) as stopped:
            AutoModelForCausalLM.from_pretrained(path, device_map=strategy, max_memory=dict(GPU_BUDGET))
    return stopped.value.device_map


def test_install_replaces_and_uninstall_restores_the_same_objects() -> None:
    before = modeling_utils._get_device_map, big_modeling.load_checkpoint_and_dispatch
    top_level = accelerate.load_checkpoint_and_dispatch
    patched = dm_install.install()
    assert "transformers.modeling_utils._get_device_map" in patched
    assert modeling_utils._get_device_map is not before[0]
    assert big_modeling.load_checkpoint_and_dispatch is not before[1]
    assert dm_install.install() == patched  # idempotent: nothing wrapped twice
    assert modeling_utils._get_device_map.__wrapped__ is before[0]  # type: ignore[attr-defined]
    dm_install.uninstall()
    assert (modeling_utils._get_device_map, big_modeling.load_checkpoint_and_dispatch) == before
    assert accelerate.load_checkpoint_and_dispatch is top_level
    assert not dm_install.is_installed()
    with dm_install.installed():
        assert modeling_utils._get_device_map is not before[0]
    assert modeling_utils._get_device_map is before[0]


@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential"])
@pytest.mark.usefixtures("two_gpus")
def test_from_pretrained_plans_gpus_with_devicemap(
    monkeypatch: pytest.MonkeyPatch, llama_path: Path, strategy: Strategy
) -> None:
    own = planned_by_from_pretrained(monkeypatch, llama_path, strategy)
    expected = devicemap.plan(meta_model(llama_path), dict(GPU_BUDGET), strategy=strategy).device_map
    with dm_install.installed():
        hooked = planned_by_from_pretrained(monkeypatch, llama_path, strategy)
    assert hooked == expected
    assert own != expected, "the budget must separate the two planners, or this test proves nothing"
    # Ties are not live when transformers plans (all_tied_weights_keys names them): the hook keeps them.
    assert hooked["lm_head"] == hooked["model.embed_tokens"]
    assert planned_by_from_pretrained(monkeypatch, llama_path, strategy) == own


def test_from_pretrained_real_offload_load(llama_path: Path, tmp_path: Path) -> None:
    tokens = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    whole = AutoModelForCausalLM.from_pretrained(llama_path)
    with torch.no_grad():
        reference = whole(tokens).logits
    expected = devicemap.plan(meta_model(llama_path), dict(CPU_DISK_BUDGET)).device_map
    assert {"cpu", "disk"} <= set(expected.values())
    with dm_install.installed():
        model = AutoModelForCausalLM.from_pretrained(
            llama_path, device_map="auto", max_memory=dict(CPU_DISK_BUDGET), offload_folder=tmp_path / "off"
        )
    assert model.hf_device_map == expected
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference)


def test_the_disk_is_there_as_the_library_planner_appends_it(llama_path: Path, tmp_path: Path) -> None:
    """accelerate's planner (behind transformers' and accelerate's loaders) appends an unbounded disk to any
    max_memory without one: a CPU budget too small for the model loads without devicemap, so it must with it
    (not a DoesNotFitError 'add "disk" to max_memory'). devicemap.plan() keeps its rule: disk only when
    asked."""
    tokens = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(llama_path)(tokens).logits
    cpu_only: dict[int | str, int | str] = {"cpu": "600KiB"}
    with pytest.raises(devicemap.DoesNotFitError, match='add "disk"'):
        devicemap.plan(meta_model(llama_path), dict(cpu_only))
    expected = devicemap.plan(meta_model(llama_path), {**cpu_only, "disk": 0}).device_map
    with dm_install.installed():
        model = AutoModelForCausalLM.from_pretrained(
            llama_path, device_map="auto", max_memory=dict(cpu_only), offload_folder=tmp_path / "off"
        )
        assert model.hf_device_map == expected
        loaded = accelerate.load_checkpoint_and_dispatch(
            empty_model(llama_path),
            str(llama_path / "model.safetensors"),
            device_map="auto",
            max_memory=dict(cpu_only),
            offload_folder=str(tmp_path / "off2"),
        )
        assert (
            loaded.hf_device_map
            == devicemap.plan(empty_model(llama_path), {**cpu_only, "disk": 0}).device_map
        )
        # accelerate writes disk weights only into offload_folder, and refuses a map with disk entries without
        # one: devicemap says so before reading a tensor, as a PlacementError.
        with pytest.raises(devicemap.OffloadFolderError, match="offload_folder="):
            accelerate.load_checkpoint_and_dispatch(
                empty_model(llama_path),
                str(llama_path / "model.safetensors"),
                device_map="auto",
                max_memory=dict(cpu_only),
            )
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference)
        assert torch.equal(loaded(tokens).logits, reference)


def test_keep_in_fp32_weights_are_planned_at_fp32(t5_path: Path, tmp_path: Path) -> None:
    # A CPU budget where sizing T5's ``wo`` at fp16 (transformers) or fp32 (as it loads) changes the map.
    budget: dict[int | str, int | str] = {"cpu": 240_000, "disk": "1GiB"}
    model = meta_model(t5_path, AutoModelForSeq2SeqLM, torch.float16)
    fp32 = {n: torch.float32 for n, _ in model.named_parameters() if ".wo." in n}
    expected = devicemap.plan(model, dict(budget), special_dtypes=fp32).device_map

    def load(folder: str) -> Any:
        return AutoModelForSeq2SeqLM.from_pretrained(
            t5_path,
            dtype=torch.float16,
            device_map="auto",
            max_memory=dict(budget),
            offload_folder=tmp_path / folder,
        )

    own = load("own").hf_device_map
    with dm_install.installed():
        hooked = load("hooked")
    assert hooked.hf_device_map == expected
    assert own != expected
    # No logits comparison here: transformers 5 serves disk-offloaded weights at the checkpoint's dtype, so
    # T5's ``wo`` computes in fp16 there under either planner's map (its own map differs from the unsplit
    # model just the same); the Llama tests compare logits.


@pytest.mark.usefixtures("two_gpus")
def test_quantized_from_pretrained_is_sized_as_the_quantizer_stores_it(
    monkeypatch: pytest.MonkeyPatch, llama_path: Path
) -> None:
    """bitsandbytes quantizes on the fly: the hook plans the model as it will be stored (devicemap's
    quantized sizes) where transformers uses a flat element size and keeps 10% free."""
    import_bitsandbytes_for_transformers()
    from transformers import BitsAndBytesConfig

    def planned(config: Any, budget: dict[int | str, int | str]) -> dict[str, Any]:
        def stop(model: Any, state_dict: Any, files: Any, load_config: Any, *args: Any, **kwargs: Any) -> Any:
            raise _Stop(load_config.device_map)

        with monkeypatch.context() as patch:
            patch.setattr(modeling_utils.PreTrainedModel, "_load_pretrained_model", staticmethod(stop))
            with pytest.raises(_Stop) as stopped:
                AutoModelForCausalLM.from_pretrained(
                    llama_path, quantization_config=config, device_map="auto", max_memory=dict(budget)
                )
        return stopped.value.device_map

    eight_bit = BitsAndBytesConfig(load_in_8bit=True)
    budget: dict[int | str, int | str] = {0: "300KiB", 1: "300KiB"}
    with pytest.raises(ValueError, match="dispatched on the CPU or the disk"):
        planned(eight_bit, budget)  # transformers' own map spills to the CPU, then bitsandbytes refuses it
    with dm_install.installed():
        hooked = planned(eight_bit, budget)
    assert (
        hooked
        == devicemap.plan(meta_model(llama_path), dict(budget), quantization_config=eight_bit).device_map
    )
    assert set(hooked.values()) == {0, 1}

    four_bit = BitsAndBytesConfig(load_in_4bit=True)
    budget = {0: "400KiB", 1: "400KiB"}
    own = planned(four_bit, budget)
    with dm_install.installed():
        hooked = planned(four_bit, budget)
    assert (
        hooked
        == devicemap.plan(meta_model(llama_path), dict(budget), quantization_config=four_bit).device_map
    )
    assert hooked != own


@pytest.mark.usefixtures("two_gpus")
def test_load_checkpoint_and_dispatch(
    monkeypatch: pytest.MonkeyPatch, llama_path: Path, tmp_path: Path
) -> None:
    checkpoint = str(llama_path / "model.safetensors")

    def planned(strategy: Strategy) -> dict[str, Any]:
        def stop(model: Any, checkpoint: Any, device_map: Any = None, **kwargs: Any) -> None:
            raise _Stop(device_map)

        with monkeypatch.context() as patch:
            patch.setattr(big_modeling, "load_checkpoint_in_model", stop)
            with pytest.raises(_Stop) as stopped:
                accelerate.load_checkpoint_and_dispatch(
                    empty_model(llama_path, tie=False),
                    checkpoint,
                    device_map=strategy,
                    max_memory=dict(GPU_BUDGET),
                    no_split_module_classes=["LlamaDecoderLayer"],
                )
        return stopped.value.device_map

    own = planned("balanced")
    expected = devicemap.plan(empty_model(llama_path), dict(GPU_BUDGET), strategy="balanced").device_map
    dm_install.install()
    hooked = planned("balanced")
    assert hooked == expected  # ties not live in the model given: all_tied_weights_keys names them
    assert hooked["lm_head"] == hooked["model.embed_tokens"]
    assert own != expected

    # A real load on CPU and disk through the same unchanged call.
    tokens = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(llama_path)(tokens).logits
    model = accelerate.load_checkpoint_and_dispatch(
        empty_model(llama_path),
        checkpoint,
        device_map="auto",
        max_memory=dict(CPU_DISK_BUDGET),
        offload_folder=str(tmp_path / "off"),
    )
    assert model.hf_device_map == devicemap.plan(empty_model(llama_path), dict(CPU_DISK_BUDGET)).device_map
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference)


def test_unrecognised_calls_fall_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from devicemap.integrations import transformers as hook_transformers

    calls: list[object] = []

    def library(model: Any, device_map: Any, max_memory: Any, hf_quantizer: Any) -> dict[str, Any]:
        calls.append(hf_quantizer)
        return {"": "cpu"}

    class Quantizer:
        pre_quantized = True

        class quantization_config:  # noqa: N801
            quant_method = "bitsandbytes_4bit"

    hooked = hook_transformers.make_get_device_map(library)
    model = torch.nn.Linear(2, 2)
    fallbacks._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert hooked(model, "auto", {"cpu": "1GiB"}, Quantizer()) == {"": "cpu"}
    assert len(calls) == 3
    assert [str(w.message) for w in caught if "devicemap" in str(w.message)] == [
        "devicemap: from_pretrained(device_map='auto'): pre-quantized bitsandbytes_4bit checkpoints are not "
        "planned through the loader yet"
    ]
    # A dict is the user's own map: passed through untouched, no warning...
    assert hooked(model, {"": "disk"}, None, None) == {"": "cpu"}
    # ...unless it names a GPU this machine lacks (transformers would fail in torch moving weights there).
    monkeypatch.setattr(devicemap.inputs.memory, "accelerator_count", lambda: 0)
    with pytest.raises(devicemap.UnknownDeviceError, match="puts '' on GPU 0, but this machine has 0 GPU"):
        hooked(model, {"": 0}, None, None)
    assert len(calls) == 4


def test_hooks_know_the_same_strategies_as_plan() -> None:
    from devicemap.integrations import common as hook_common

    assert all(hook_common.is_strategy(name) for name in devicemap.STRATEGIES)


def test_environment_variable() -> None:
    assert dm_install.environment_requests_install({"DEVICEMAP": "1"})
    assert dm_install.environment_requests_install({"DEVICEMAP": " TRUE "})
    assert not dm_install.environment_requests_install({"DEVICEMAP": "0"})
    assert not dm_install.environment_requests_install({})


@pytest.mark.filterwarnings("ignore:for base_model.*copying from a non-meta parameter:UserWarning")
def test_peft_replan_keeps_the_budget_and_budgets_the_adapter(
    llama_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    peft = import_with_torchao("peft")
    # PEFT re-saves disk-offloaded base weights relative to the working directory (its os.path.join of the
    # split absolute path drops the leading "/"): keep them out of the checkout.
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(4)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    unsplit = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(llama_path), lora)
    unsplit.save_pretrained(tmp_path / "adapter")
    tokens = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = unsplit(tokens).logits

    def load(tag: str) -> Any:
        base: Any = AutoModelForCausalLM.from_pretrained(
            llama_path, device_map="auto", max_memory=dict(CPU_DISK_BUDGET), offload_folder=tmp_path / tag
        )
        assert "disk" in base.hf_device_map.values()  # so PEFT removes the hooks and plans again
        return peft.PeftModel.from_pretrained(
            base, tmp_path / "adapter", offload_folder=tmp_path / f"{tag}-peft"
        )

    with dm_install.installed():
        model = load("hooked")
    # PEFT re-plans without a max_memory: the hook keeps the budget the base model was planned with and
    # sizes the whole PeftModel, adapter weights included.
    assert model.hf_device_map == devicemap.plan(model, dict(CPU_DISK_BUDGET)).device_map
    assert "disk" in model.hf_device_map.values()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference)
    # PEFT's own re-plan (accelerate's, over the whole machine) either fails on the disk-offloaded weights
    # (peft 0.21: "Cannot copy out of meta tensor") or gives another map.
    try:
        own = load("own").hf_device_map
    except NotImplementedError:
        return
    assert own != model.hf_device_map


@pytest.mark.usefixtures("two_gpus")
def test_diffusers_model_from_pretrained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    diffusers = import_with_torchao("diffusers")
    torch.manual_seed(6)
    config = {
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 4,
        "num_layers": 4,
        "attention_head_dim": 8,
        "num_attention_heads": 4,
        "caption_projection_dim": 32,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 16,
        "out_channels": 4,
    }
    model_class = diffusers.SD3Transformer2DModel
    model_class(**config).save_pretrained(tmp_path / "sd3")
    with torch.device("meta"):
        meta = model_class.from_config(model_class.load_config(tmp_path / "sd3"))
    budget: dict[int | str, int | str] = {0: "1200KiB", 1: "1200KiB", "cpu": "1GiB"}

    def planned(strategy: Strategy) -> dict[str, Any]:
        def stop(cls: Any, *args: Any, device_map: Any = None, **kwargs: Any) -> Any:
            raise _Stop(device_map)

        with monkeypatch.context() as patch:
            patch.setattr(diffusers.ModelMixin, "_load_pretrained_model", classmethod(stop))
            with pytest.raises(_Stop) as stopped:
                model_class.from_pretrained(tmp_path / "sd3", device_map=strategy, max_memory=dict(budget))
        return stopped.value.device_map

    strategies: tuple[Strategy, ...] = ("auto", "balanced_low_0", "sequential")
    for strategy in strategies:
        own = planned(strategy)
        with dm_install.installed():
            hooked = planned(strategy)
        assert hooked == devicemap.plan(meta, dict(budget), strategy=strategy).device_map
        assert own != hooked


def test_install_patches_libraries_imported_later(tmp_path: Path) -> None:
    """install() imports nothing itself; a library imported afterwards is patched as its import ends (what
    lets DEVICEMAP=1 run at interpreter start-up), re-exports included; uninstall() restores all."""
    script = """
import sys
import devicemap.integrations as dm_install
dm_install.install()
assert "transformers" not in sys.modules and "accelerate" not in sys.modules, "install imported a library"
import accelerate, accelerate.big_modeling as big_modeling
import transformers.modeling_utils as modeling_utils
hooked = big_modeling.load_checkpoint_and_dispatch
assert hooked.__wrapped__ is not hooked and accelerate.load_checkpoint_and_dispatch is hooked
assert modeling_utils._get_device_map.__module__ == "devicemap.integrations.transformers"
original = hooked.__wrapped__
dm_install.uninstall()
assert big_modeling.load_checkpoint_and_dispatch is original is accelerate.load_checkpoint_and_dispatch
assert modeling_utils._get_device_map.__module__ == "transformers.integrations.accelerate"
assert not dm_install.is_installed()
print("ok")
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("value", ["1", ""])
def test_startup_file_installs_only_when_asked(tmp_path: Path, value: str) -> None:
    """The ``devicemap_hooks.pth`` start-up line: with DEVICEMAP=1 a process that never imports devicemap gets
    the hooks when it imports transformers; with or without it, start-up imports neither devicemap nor torch."""
    import os
    import subprocess
    import sys

    shipped = REPO / "python" / "devicemap.data" / "purelib" / "devicemap_hooks.pth"
    assert shipped.read_text().strip() == dm_install.STARTUP_LINE
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "devicemap_hooks.pth").write_text(dm_install.STARTUP_LINE + "\n")
    script = (
        f"import site, sys; site.addsitedir({str(site_dir)!r}); "
        "print('devicemap' in sys.modules or 'torch' in sys.modules); import transformers.modeling_utils as m; "
        "print(m._get_device_map.__module__)"
    )
    env = {**os.environ, "DEVICEMAP": value}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    lines = done.stdout.split()
    assert lines[-2:] == (
        ["False", "devicemap.integrations.transformers"]
        if value
        else ["False", "transformers.integrations.accelerate"]
    ), done.stderr[-2000:]


STARTUP_PROBE = """
import sys
heavy = sorted(m for m in ("torch", "devicemap", "transformers", "accelerate") if m in sys.modules)
assert not heavy, f"start-up imported {heavy}"
import {first}
import devicemap.integrations as dm_install
from accelerate import load_checkpoint_and_dispatch
import transformers.modeling_utils as modeling_utils, peft.peft_model as peft_model
replaced = dm_install.patching._replacements
assert load_checkpoint_and_dispatch is replaced[("accelerate", "load_checkpoint_and_dispatch")]
assert modeling_utils._get_device_map is replaced[("transformers.modeling_utils", "_get_device_map")]
assert peft_model.infer_auto_device_map is replaced[("peft.peft_model", "infer_auto_device_map")]
print("ok")
"""


@pytest.mark.parametrize("first", ["accelerate", "transformers", "peft", "diffusers"])
def test_devicemap_1_installs_at_the_first_import_of_any_loader(first: str) -> None:
    """With DEVICEMAP=1 (the installed start-up file), start-up imports nothing heavy, and whichever loader is
    imported first (peft and diffusers import the others inside their own import) installs every hook:
    a name copied out of accelerate right after is already devicemap's."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DEVICEMAP": "1"}
    script = STARTUP_PROBE.replace("{first}", first)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_broken_devicemap_does_not_break_the_loaders_import(tmp_path: Path) -> None:
    """DEVICEMAP=1 with a devicemap that fails to import: the user's library still imports, with a warning
    saying the hooks are not installed."""
    import os
    import subprocess
    import sys

    shadow = tmp_path / "devicemap"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('simulated broken install')\n")
    env = {**os.environ, "DEVICEMAP": "1", "PYTHONPATH": str(tmp_path)}
    script = "import warnings; warnings.simplefilter('always'); import accelerate; print('imported')"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.stdout.strip().endswith("imported"), done.stderr[-3000:]
    assert "could not install the loader hooks" in done.stderr and "simulated broken install" in done.stderr


def test_the_installed_package_ships_the_startup_file() -> None:
    """`pip install devicemap` (here: the build `make build` installed) puts devicemap_hooks.pth and
    devicemap_startup.py in site-packages, so DEVICEMAP=1 reaches a program that never imports devicemap
    (and the installed start-up module is the one in the source tree)."""
    import os
    import subprocess
    import sys

    import devicemap_startup

    source = REPO / "python" / "devicemap.data" / "purelib" / "devicemap_startup.py"
    assert Path(devicemap_startup.__file__).read_text() == source.read_text(), "stale build: run `make build`"

    script = "import sys, transformers.modeling_utils as m; print('devicemap' in sys.modules, m._get_device_map.__module__)"
    for value, expected in (
        ("1", "True devicemap.integrations.transformers"),
        ("0", "False transformers.integrations.accelerate"),
    ):
        env = {**os.environ, "DEVICEMAP": value}
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
        )
        assert done.stdout.strip().endswith(expected), (value, done.stdout, done.stderr[-2000:])


CONCURRENT_IMPORT = """
import sys, threading, time
import devicemap.integrations as dm_install
importer = threading.Thread(target=lambda: __import__("transformers.modeling_utils"))
importer.start()
while "transformers.modeling_utils" not in sys.modules:  # its import has begun in the other thread
    time.sleep(0.0005)
dm_install.install()
importer.join()
for _ in range(200):  # the waiter patches as the import ends: give it a moment, never forever
    m = sys.modules["transformers.modeling_utils"]
    if m._get_device_map.__module__ == "devicemap.integrations.transformers":
        break
    time.sleep(0.05)
print(dm_install.is_installed(), m._get_device_map.__module__)
dm_install.uninstall()
print(m._get_device_map.__module__)
"""


def test_install_while_another_thread_imports_the_library() -> None:
    """install() while another thread is still importing transformers.modeling_utils (past the import
    finder already) still patches _get_device_map: is_installed() saying True means the hook is there."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", CONCURRENT_IMPORT], capture_output=True, text=True, timeout=300
    )
    assert done.stdout.split() == [
        "True",
        "devicemap.integrations.transformers",
        "transformers.integrations.accelerate",
    ], done.stderr[-3000:]
