"""Differential harness for the loader hooks: unchanged code that works without devicemap must not
fail with it.

Every case runs the same loader call twice on small random models saved here: **plain** (devicemap not
installed) and **installed** (inside ``devicemap.installed()``); one test runs two of them again in a child
process started with ``DEVICEMAP=1``. The rule checked for every case:

- plain loads -> installed loads too, with equal outputs on a fixed input (``torch.equal``), a placement that
  covers every tensor on devices this machine has (CPU, disk, GPUs that exist), and no GPU holding more bytes
  than plain put there or the GPU's ``max_memory`` budget allowed (no GPU here: the bytes are counted from the
  loaded model's ``hf_device_map``);
- plain fails -> installed either loads (with the outputs of the model loaded whole on the CPU) or raises a
  :class:`devicemap.PlacementError`, never another exception type.

A load whose outputs are meta tensors (weights never loaded) is a failure. A case that no run can load for an
upstream limit, the same for plain and installed, skips naming it (``tests/optional_libraries.py``): a library
the case needs cannot import with this torch, transformers cannot swap quantized layers in with this torch, or
transformers cannot run the map both runs planned, the whole model on disk.

The cases are a table (:data:`CASES`): a loader path and the options it is called with. The module writes a
summary table at the end (printed; also to ``$DEVICEMAP_DIFFERENTIAL_TABLE`` when set): the README's table under
"Use it from the code you already have" is this output.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import devicemap
from devicemap import integrations as dm_install
from devicemap.inputs.memory import accelerator_count
from devicemap.integrations import fallbacks
from optional_libraries import (
    import_bitsandbytes_for_transformers,
    import_torchao_quantization,
    import_with_torchao,
    transformers_whole_disk_problem,
)
from tiny_models import tiny_llama_config

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

TOKENS = torch.tensor([[1, 5, 9, 200, 7, 3, 42, 11]])
DECODER_TOKENS = torch.tensor([[0, 4, 8, 15]])
TINY_CPU = "600KiB"  # the tied Llama (1.1 MiB in fp32) keeps its embedding and a few layers; the rest is disk


# ---------------------------------------------------------------------------------------------------------
# Saved models (random weights, built from configs, saved locally)


@dataclass
class Saved:
    root: Path
    paths: dict[str, Path] = field(default_factory=dict)
    counter: int = 0

    def folder(self, tag: str) -> Path:
        """A fresh folder (offload folders: never shared between runs)."""
        self.counter += 1
        return self.root / f"{tag}-{self.counter}"


def _llama_config(tied: bool) -> Any:
    return tiny_llama_config(tie_word_embeddings=tied)


def _save_sd_pipeline(path: Path) -> None:
    """A tiny Stable Diffusion pipeline: UNet, VAE, CLIP text encoder and tokenizer, DDIM scheduler."""
    import diffusers

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
    diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=diffusers.DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path / "pipe")


SD3_CONFIG = {
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


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    root = tmp_path_factory.mktemp("differential")
    found = Saved(root)
    for name, tied in (("llama", True), ("llama-untied", False)):
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(_llama_config(tied)).save_pretrained(root / name)
        found.paths[name] = root / name
    torch.manual_seed(0)
    t5 = transformers.T5Config(vocab_size=500, d_model=64, d_ff=128, num_layers=3, num_heads=4, d_kv=16)
    transformers.AutoModelForSeq2SeqLM.from_config(t5).save_pretrained(root / "t5")
    found.paths["t5"] = root / "t5"
    return found


@pytest.fixture(scope="module")
def diffusers_models(saved: Saved) -> Saved:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.SD3Transformer2DModel(**SD3_CONFIG).save_pretrained(saved.root / "sd3")
    saved.paths["sd3"] = saved.root / "sd3"
    (saved.root / "sd").mkdir()
    _save_sd_pipeline(saved.root / "sd")
    saved.paths["pipe"] = saved.root / "sd" / "pipe"
    return saved


@pytest.fixture(scope="module")
def adapter(saved: Saved) -> Saved:
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(saved.paths["llama"]), lora)
    model.save_pretrained(saved.root / "adapter")
    saved.paths["adapter"] = saved.root / "adapter"
    return saved


# ---------------------------------------------------------------------------------------------------------
# One call: what it loaded, or what it raised


@dataclass
class Loaded:
    output: torch.Tensor | None
    device_map: dict[str, Any] | None
    device_bytes: dict[Any, int]


@dataclass
class Run:
    loaded: Loaded | None = None
    error: Exception | None = None
    warnings: list[str] = field(default_factory=list)
    planned: list[Any] = field(default_factory=list)
    """The maps transformers' from_pretrained got from ``_get_device_map`` (devicemap's hook when installed)."""

    def describe(self) -> str:
        if self.error is not None:
            return f"{type(self.error).__name__}: {str(self.error).splitlines()[0][:160]}"
        assert self.loaded is not None
        return f"loaded {self.loaded.device_map}"


def _owner(name: str, device_map: Mapping[str, Any]) -> Any:
    """The device ``device_map`` gives tensor ``name`` (the longest key that is a dotted prefix of it)."""
    parts = name.split(".")
    for depth in range(len(parts), -1, -1):
        key = ".".join(parts[:depth])
        if key in device_map:
            return device_map[key]
    return None


def placed_bytes(model: Any, device_map: Mapping[str, Any] | None) -> dict[Any, int]:
    """Bytes of the loaded model's tensors per device: by its ``hf_device_map`` when it has one, else where each
    tensor is (a single-device load)."""
    found: dict[Any, int] = {}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if device_map:
            device = _owner(name, device_map)
        else:
            device = tensor.device.type if tensor.device.type != "cuda" else tensor.device.index
        size = tensor.numel() * tensor.element_size()
        found[device] = found.get(device, 0) + size
    return found


def _loaded_model(model: Any, output: torch.Tensor) -> Loaded:
    if output.is_meta:
        raise RuntimeError("the model ran with its weights on the meta device: its outputs are meta tensors")
    device_map = getattr(model, "hf_device_map", None)
    device_map = dict(device_map) if isinstance(device_map, Mapping) else None
    return Loaded(output.detach().float().clone(), device_map, placed_bytes(model, device_map))


def _lm_output(model: Any) -> torch.Tensor:
    with torch.no_grad():
        if getattr(model.config, "is_encoder_decoder", False):
            return model(input_ids=TOKENS % 500, decoder_input_ids=DECODER_TOKENS).logits
        return model(TOKENS).logits


# ---------------------------------------------------------------------------------------------------------
# The cases: a loader path and its options, as data


@dataclass(frozen=True)
class Case:
    path: str
    """The loader path (a row of the summary table)."""
    model: str
    """Which saved model."""
    options: tuple[tuple[str, Any], ...]
    """The call's options as data; ``offload_folder=True`` means a fresh folder of this run's own."""

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def label(self) -> str:
        parts = [f"{self.model}"]
        for key, value in self.options:
            shown = (
                "<folder>"
                if value is True and key in ("offload_folder", "offload_dir")
                else str(value).replace("torch.", "")
            )
            parts.append(f"{key}={shown}")
        return " ".join(parts)


def _case(path: str, model: str, **options: Any) -> Case:
    return Case(path, model, tuple(options.items()))


STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

# max_memory forms: given as data, a fresh copy for every call (accelerate converts strings in place).
MEMORY_FORMS: dict[str, dict[str, Any]] = {
    "none": {},
    "cpu only": {"max_memory": {"cpu": "1GiB"}},
    "cpu tiny + offload_folder": {"max_memory": {"cpu": TINY_CPU}, "offload_folder": True},
    "cpu tiny, no offload_folder": {"max_memory": {"cpu": TINY_CPU}},
    "ints": {"max_memory": {"cpu": 700_000, "disk": 10**9}, "offload_folder": True},
    "strings with units": {"max_memory": {"cpu": "0.7MB", "disk": "1GB"}, "offload_folder": True},
    "cuda:0 key": {"max_memory": {"cuda:0": "1GiB", "cpu": "1GiB"}},
    "GPU 0 the model fits on": {"max_memory": {0: "1GiB", "cpu": "1GiB"}},
    "GPU 0 too small for the first layer": {"max_memory": {0: "100KiB", "cpu": "1GiB"}},
}

EVERY_STRATEGY = (
    "none",
    "cpu only",
    "cpu tiny + offload_folder",
    "cpu tiny, no offload_folder",
    "GPU 0 too small for the first layer",
)
"""The forms tried with every strategy string (the others with "auto" only): those whose plan differs by
strategy, or where the library's own planner decides whether the call loads."""

EDGE_BUDGETS: tuple[dict[str, Any], ...] = (
    {"max_memory": {"cpu": "10KiB"}, "offload_folder": True},  # smaller than any layer: all on disk
    {"max_memory": {0: "100KiB"}},  # a missing GPU too small for anything, no CPU key
    {"max_memory": {}},
    {
        "max_memory": {"cpu": "20 GB"}
    },  # accelerate reads it (spaces around the number), devicemap.plan does not
    {"max_memory": {"cpu": "20XB"}},  # a size neither reads
    {"device_map_string": "cuda"},
)

HAND_MAP = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.layers.3": "cpu",
    "model.layers.4": "disk",
    "model.layers.5": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}

QUANTIZERS = ("bnb-4bit", "bnb-8bit", "bnb-8bit fp32 cpu offload", "torchao int8 weight-only")

TRANSFORMERS = "transformers from_pretrained"
ACCELERATE = "accelerate load_checkpoint_and_dispatch"
INFER = "accelerate infer_auto_device_map vs devicemap.compat"
DIFFUSERS_MODEL = "diffusers ModelMixin.from_pretrained"
DIFFUSERS_PIPELINE = 'diffusers pipeline device_map="balanced"'
PEFT = "PEFT PeftModel.from_pretrained"


def _cases() -> list[Case]:
    cases: list[Case] = []
    for strategy in STRATEGIES:
        for name, form in MEMORY_FORMS.items():
            if strategy == "auto" or name in EVERY_STRATEGY:
                cases.append(_case(TRANSFORMERS, "llama", device_map=strategy, **copy.deepcopy(form)))
    for options in EDGE_BUDGETS:
        options = copy.deepcopy(options)
        cases.append(
            _case(TRANSFORMERS, "llama", device_map=options.pop("device_map_string", "auto"), **options)
        )
    for device_map in (HAND_MAP, {"": "cpu"}, "cpu", 0, {"": "disk"}):
        cases.append(_case(TRANSFORMERS, "llama", device_map=device_map, offload_folder=True))
    tiny = {"max_memory": {"cpu": TINY_CPU}, "offload_folder": True}
    cases += [
        _case(TRANSFORMERS, "llama", device_map="auto", offload_state_dict=True, **tiny),
        _case(TRANSFORMERS, "llama", device_map="auto", offload_buffers=True, **tiny),
        _case(TRANSFORMERS, "llama", device_map="auto", dtype=torch.float16, **tiny),
        _case(TRANSFORMERS, "llama", device_map="auto", torch_dtype=torch.bfloat16, **tiny),
        _case(TRANSFORMERS, "llama", device_map="sequential", dtype="auto", **tiny),
        _case(TRANSFORMERS, "llama-untied", device_map="auto"),
        _case(TRANSFORMERS, "llama-untied", device_map="auto", **tiny),
        _case(TRANSFORMERS, "llama-untied", device_map="balanced", max_memory={"cpu": "300KiB"}),
        _case(TRANSFORMERS, "t5", device_map="auto"),
        _case(TRANSFORMERS, "t5", device_map="auto", max_memory={"cpu": "300KiB"}, offload_folder=True),
        _case(TRANSFORMERS, "t5", device_map="sequential", max_memory={"cpu": "200KiB"}, offload_folder=True),
        _case(
            TRANSFORMERS,
            "t5",
            device_map="balanced",
            dtype=torch.float16,
            max_memory={"cpu": "150KiB"},
            offload_folder=True,
        ),
    ]
    for quantizer in QUANTIZERS:
        for options in (
            {},
            {"max_memory": {"cpu": "1GiB"}},
            tiny,
            {"max_memory": {"cpu": "200KiB"}, "offload_folder": True},
        ):
            cases.append(
                _case(
                    TRANSFORMERS,
                    "llama",
                    device_map="auto",
                    quantization_config=quantizer,
                    **copy.deepcopy(options),
                )
            )
    for strategy in STRATEGIES:
        for form in ("none", "cpu only", "cpu tiny + offload_folder", "cpu tiny, no offload_folder"):
            cases.append(_case(ACCELERATE, "llama", device_map=strategy, **copy.deepcopy(MEMORY_FORMS[form])))
    cases += [
        _case(
            ACCELERATE, "llama", device_map="auto", **copy.deepcopy(MEMORY_FORMS["GPU 0 the model fits on"])
        ),
        _case(
            ACCELERATE,
            "llama",
            device_map="auto",
            **copy.deepcopy(MEMORY_FORMS["GPU 0 too small for the first layer"]),
        ),
        _case(ACCELERATE, "llama", device_map="auto", **copy.deepcopy(MEMORY_FORMS["cuda:0 key"])),
        _case(ACCELERATE, "llama", device_map="auto", offload_buffers=True, **tiny),
        _case(ACCELERATE, "llama", device_map="balanced", dtype=torch.float16, **tiny),
        _case(ACCELERATE, "llama", device_map="auto", no_split_module_classes=["LlamaDecoderLayer"], **tiny),
        _case(
            ACCELERATE,
            "llama",
            device_map="sequential",
            max_memory={"cpu": 700_000, "disk": 10**9},
            offload_folder=True,
        ),
        _case(ACCELERATE, "llama", device_map={"": "cpu"}),
        _case(ACCELERATE, "llama", device_map=HAND_MAP, offload_folder=True),
        _case(ACCELERATE, "llama-untied", device_map="auto", **tiny),
    ]
    for options in (
        {"max_memory": {"cpu": "1GiB"}},
        {"max_memory": {0: "300KiB", 1: "300KiB", "cpu": "1GiB"}},
        {"max_memory": {"cpu": TINY_CPU}, "no_split_module_classes": ["LlamaDecoderLayer"]},
    ):
        cases.append(_case(INFER, "llama", **copy.deepcopy(options)))
    for strategy in STRATEGIES:
        for options in ({}, {"max_memory": {"cpu": "1500KiB"}, "offload_folder": True}):
            cases.append(_case(DIFFUSERS_MODEL, "sd3", device_map=strategy, **copy.deepcopy(options)))
    cases += [
        _case(DIFFUSERS_MODEL, "sd3", device_map="auto", max_memory={"cpu": "1MiB"}),
        _case(DIFFUSERS_MODEL, "sd3", device_map="auto", max_memory={"cpu": "200KiB"}, offload_folder=True),
        _case(DIFFUSERS_MODEL, "sd3", device_map="auto", max_memory={"cpu": "200KiB"}),
        _case(DIFFUSERS_MODEL, "sd3", device_map="auto", max_memory={0: "1GiB", "cpu": "1GiB"}),
        _case(
            DIFFUSERS_MODEL,
            "sd3",
            device_map="auto",
            torch_dtype=torch.float16,
            max_memory={"cpu": "800KiB"},
            offload_folder=True,
        ),
        _case(DIFFUSERS_MODEL, "sd3", device_map={"": "cpu"}),
        _case(DIFFUSERS_PIPELINE, "pipe", device_map="balanced"),
        _case(DIFFUSERS_PIPELINE, "pipe", device_map="balanced", max_memory={"cpu": "1GiB"}),
        _case(
            DIFFUSERS_PIPELINE,
            "pipe",
            device_map="balanced",
            max_memory={0: "1GiB", 1: "1GiB", "cpu": "1GiB"},
        ),
        _case(DIFFUSERS_PIPELINE, "pipe", device_map="balanced", max_memory={0: "1KiB", "cpu": "1GiB"}),
    ]
    for peft_options in (
        {"offload_folder": True},
        {"device_map": "sequential", "offload_folder": True},
        {"device_map": "balanced_low_0", "offload_folder": True},
        {"max_memory": {"cpu": TINY_CPU}, "offload_folder": True},
        {},
    ):
        cases.append(_case(PEFT, "llama", base_max_memory={"cpu": TINY_CPU}, **peft_options))
    cases.append(_case(PEFT, "llama", base_max_memory={"cpu": "1GiB"}))
    return cases


CASES = _cases()


# ---------------------------------------------------------------------------------------------------------
# Running a case


def _quantization_config(name: str) -> Any:
    if name == "bnb-4bit":
        return transformers.BitsAndBytesConfig(load_in_4bit=True)
    if name == "bnb-8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    if name == "bnb-8bit fp32 cpu offload":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    if name == "torchao int8 weight-only":
        from torchao.quantization import Int8WeightOnlyConfig

        return transformers.TorchAoConfig(Int8WeightOnlyConfig())
    raise AssertionError(name)


def _resolve(case: Case, saved: Saved, tag: str) -> dict[str, Any]:
    """The call's keyword arguments: fresh copies, folders of this run's own, real quantizer configs."""
    kwargs = copy.deepcopy(case.kwargs)
    for key in ("offload_folder", "offload_dir"):
        if kwargs.get(key) is True:
            kwargs[key] = str(saved.folder(f"{tag}-offload"))
    if "quantization_config" in kwargs:
        kwargs["quantization_config"] = _quantization_config(kwargs["quantization_config"])
    return kwargs


def _auto_class(model: str) -> Any:
    return transformers.AutoModelForSeq2SeqLM if model == "t5" else transformers.AutoModelForCausalLM


def _empty_llama(path: Path) -> Any:
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    model.tie_weights()
    return model


def _sd3_output(model: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    dtype = next(p.dtype for p in model.parameters())
    inputs = {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=generator),
        "pooled_projections": torch.randn(1, 16, generator=generator),
        "timestep": torch.tensor([3.0]),
    }
    with torch.no_grad():
        return model(**{k: v.to(dtype) for k, v in inputs.items()}).sample


def _pipeline_output(pipe: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return pipe(
            "a b", num_inference_steps=2, generator=generator, output_type="pt", height=16, width=16
        ).images


def _pipeline_bytes(pipe: Any) -> dict[Any, int]:
    found: dict[Any, int] = {}
    device_map = pipe.hf_device_map if isinstance(pipe.hf_device_map, Mapping) else {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            device = device_map.get(name, "cpu")
            size = sum(t.numel() * t.element_size() for t in [*component.parameters(), *component.buffers()])
            found[device] = found.get(device, 0) + size
    return found


def call(case: Case, saved: Saved, tag: str) -> Loaded:
    """Make the case's call as unchanged user code would (library functions looked up at call time)."""
    kwargs = _resolve(case, saved, tag)
    path = saved.paths[case.model]
    if case.path == TRANSFORMERS:
        model = _auto_class(case.model).from_pretrained(path, **kwargs)
        return _loaded_model(model, _lm_output(model))
    if case.path == ACCELERATE:
        model = accelerate.load_checkpoint_and_dispatch(
            _empty_llama(path), str(path / "model.safetensors"), **kwargs
        )
        return _loaded_model(model, _lm_output(model))
    if case.path == INFER:
        meta = _empty_llama(path)
        if tag == "plain":
            from accelerate.utils import infer_auto_device_map
        else:
            from devicemap.compat import infer_auto_device_map
        device_map = dict(infer_auto_device_map(meta, **kwargs))
        return Loaded(None, device_map, placed_bytes(meta, device_map))
    if case.path == DIFFUSERS_MODEL:
        import diffusers

        model = diffusers.SD3Transformer2DModel.from_pretrained(path, **kwargs)
        return _loaded_model(model, _sd3_output(model))
    if case.path == DIFFUSERS_PIPELINE:
        import diffusers

        pipe = diffusers.DiffusionPipeline.from_pretrained(path, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        device_map = pipe.hf_device_map if isinstance(pipe.hf_device_map, Mapping) else None
        return Loaded(_pipeline_output(pipe), device_map and dict(device_map), _pipeline_bytes(pipe))
    if case.path == PEFT:
        import peft

        base = transformers.AutoModelForCausalLM.from_pretrained(
            path,
            device_map="auto",
            max_memory=kwargs.pop("base_max_memory"),
            offload_folder=str(saved.folder(f"{tag}-base")),
        )
        model = peft.PeftModel.from_pretrained(base, saved.paths["adapter"], **kwargs)
        return _loaded_model(model, _lm_output(model))
    raise AssertionError(case.path)


def reference(case: Case, saved: Saved) -> torch.Tensor | None:
    """The outputs of the same model loaded whole on the CPU (what a plain-fails/installed-loads case must give)."""
    kwargs = {k: v for k, v in case.kwargs.items() if k in ("dtype", "torch_dtype", "quantization_config")}
    whole = Case(case.path, case.model, tuple(kwargs.items()))
    path = saved.paths[case.model]
    if case.path in (TRANSFORMERS, ACCELERATE):
        resolved = _resolve(whole, saved, "reference")
        model = _auto_class(case.model).from_pretrained(path, device_map={"": "cpu"}, **resolved)
        return _lm_output(model).float()
    if case.path == DIFFUSERS_MODEL:
        import diffusers

        resolved = _resolve(whole, saved, "reference")
        return _sd3_output(diffusers.SD3Transformer2DModel.from_pretrained(path, **resolved)).float()
    if case.path == DIFFUSERS_PIPELINE:
        import diffusers

        pipe = diffusers.DiffusionPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        return _pipeline_output(pipe).float()
    if case.path == PEFT:
        import peft

        base = transformers.AutoModelForCausalLM.from_pretrained(path)
        return _lm_output(peft.PeftModel.from_pretrained(base, saved.paths["adapter"])).float()
    return None


@contextlib.contextmanager
def _planned_maps(case: Case, found: list[Any]) -> Iterator[None]:
    """For a transformers from_pretrained case: the maps ``transformers.modeling_utils._get_device_map``
    returns (the library's planner, or devicemap's hook in its place) are appended to ``found``."""
    if case.path != TRANSFORMERS:
        yield
        return
    import transformers.modeling_utils as modeling_utils

    current = modeling_utils._get_device_map

    def recording(*args: Any, **kwargs: Any) -> Any:
        device_map = current(*args, **kwargs)
        found.append(dict(device_map) if isinstance(device_map, Mapping) else device_map)
        return device_map

    modeling_utils._get_device_map = recording
    try:
        yield
    finally:
        modeling_utils._get_device_map = current


def attempt(case: Case, saved: Saved, tag: str) -> Run:
    run = Run()
    fallbacks._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _planned_maps(case, run.planned):
                run.loaded = call(case, saved, tag)
        except Exception as err:  # the harness classifies every failure
            run.error = err
    run.warnings = sorted({str(w.message) for w in caught if str(w.message).startswith("devicemap:")})
    return run


# ---------------------------------------------------------------------------------------------------------
# The checks


def _gpu_budget(case: Case, gpu: int) -> int | None:
    budget = case.kwargs.get("max_memory") or {}
    for key, size in budget.items():
        try:
            if devicemap.inputs.memory.device_key(key) == gpu:
                return devicemap.parse_size(size)
        except devicemap.PlacementError:
            continue
    return None


def check_placement(case: Case, plain: Loaded | None, installed: Loaded) -> None:
    """Installed puts tensors only on devices this machine has and no more bytes on a GPU than plain did or
    the GPU's budget allows; the map covers every tensor."""
    visible = accelerator_count()
    for device, size in installed.device_bytes.items():
        assert device is not None, f"tensors with no device in {installed.device_map}"
        if device in ("cpu", "disk", "meta"):
            continue
        gpu = devicemap.inputs.memory.device_key(device)
        assert isinstance(gpu, int) and gpu < visible, f"placed on GPU {device!r}, which this machine lacks"
        allowed = max((plain.device_bytes.get(device, 0) if plain else 0), _gpu_budget(case, gpu) or 0)
        assert size <= allowed, f"GPU {device}: {size} bytes, plain {plain and plain.device_bytes}"


def _whole_disk(device_map: Any) -> bool:
    return isinstance(device_map, Mapping) and bool(device_map) and set(device_map.values()) == {"disk"}


def upstream_limit(plain: Run, installed: Run) -> str | None:
    """Why neither run can load, when an upstream limit stops both the same way: both fail with the same
    error after transformers' from_pretrained got a map putting the whole model on disk in each (the
    library's planner and devicemap's agree there is nowhere else for it), and this transformers cannot run
    such a map (:func:`optional_libraries.transformers_whole_disk_problem`). None otherwise: the rules apply."""
    if plain.loaded is not None or installed.loaded is not None or plain.describe() != installed.describe():
        return None
    if not all(run.planned and all(_whole_disk(m) for m in run.planned) for run in (plain, installed)):
        return None
    problem = transformers_whole_disk_problem()
    return None if problem is None else f"{problem}; both runs planned {plain.planned[-1]}"


def compare(case: Case, saved: Saved, plain: Run, installed: Run) -> None:
    if plain.loaded is not None:
        assert installed.loaded is not None, (
            f"plain loads, installed does not: {installed.describe()}\n  plain: {plain.describe()}"
        )
        if plain.loaded.output is None:  # a planner compared with its drop-in: the same map
            assert installed.loaded.device_map == plain.loaded.device_map
            return
        check_placement(case, plain.loaded, installed.loaded)
        assert installed.loaded.output is not None
        difference = (installed.loaded.output - plain.loaded.output).abs().max().item()
        assert torch.equal(installed.loaded.output, plain.loaded.output), (
            f"outputs differ by {difference}: plain {plain.loaded.device_map} installed {installed.loaded.device_map}"
        )
        return
    if installed.loaded is not None:
        check_placement(case, None, installed.loaded)
        expected = reference(case, saved)
        if expected is not None:
            assert installed.loaded.output is not None
            assert torch.equal(installed.loaded.output, expected), "installed loads, with the wrong outputs"
        return
    assert isinstance(installed.error, devicemap.PlacementError), (
        f"plain fails ({plain.describe()}), installed raises {installed.describe()}: not a PlacementError"
    )


# ---------------------------------------------------------------------------------------------------------
# The summary table


@dataclass
class Row:
    case: Case
    plain: Run
    installed: Run
    seconds: float

    @property
    def maps_differ(self) -> bool:
        """Both loaded, with different maps: devicemap planned where the library would have."""
        plain, installed = self.plain.loaded, self.installed.loaded
        return plain is not None and installed is not None and plain.device_map != installed.device_map

    @property
    def outcome(self) -> str:
        if self.plain.loaded is not None:
            return "both load" if self.installed.loaded is not None else "REGRESSION"
        if self.installed.loaded is not None:
            return "plain fails, installed loads"
        if isinstance(self.installed.error, devicemap.PlacementError):
            return "both fail, installed with PlacementError"
        return "BOTH FAIL, installed not PlacementError"


ROWS: list[Row] = []


PATH_OPTIONS = {
    TRANSFORMERS: "every strategy string x max_memory none / cpu / cpu tiny with and without offload_folder / a "
    "missing GPU too small for a layer; with auto: ints, units, 'cuda:0', a missing GPU the model fits on, {}, "
    "'20 GB', '20XB', a missing GPU alone, 'cuda'; dict maps (hand-written with disk, {'': 'cpu'}, 'cpu', 0, "
    "{'': 'disk'}); offload_state_dict, offload_buffers, dtype, torch_dtype, dtype='auto'; bitsandbytes 4/8-bit, "
    "8-bit with fp32 CPU offload, torchao int8 at 4 budgets; untied Llama; T5 (fp16 included)",
    ACCELERATE: "every strategy string x max_memory none / cpu / cpu tiny with and without offload_folder; cpu "
    "smaller than any layer, missing GPUs, 'cuda:0', offload_buffers, dtype, no_split_module_classes, ints; "
    "dict maps; untied Llama",
    INFER: "cpu, two GPUs, cpu tiny with no_split_module_classes (maps compared)",
    DIFFUSERS_MODEL: "SD3 transformer: every strategy string x none / cpu+disk with offload_folder; cpu-only fit "
    "without a folder, cpu tiny with and without a folder, torch_dtype=float16, a missing GPU, {'': 'cpu'}",
    DIFFUSERS_PIPELINE: "UNet + VAE + CLIP text encoder: none, cpu only, two missing GPUs, a missing tiny GPU",
    PEFT: "LoRA on a base with CPU and disk entries: PEFT's default re-plan, sequential, balanced_low_0, "
    "max_memory, no offload_folder; a base without offload",
}


def summary(rows: list[Row]) -> str:
    paths: dict[str, list[Row]] = {}
    for row in rows:
        paths.setdefault(row.case.path, []).append(row)
    lines = [
        "| path | options tried | cases | plain loads | installed loads | plain loads, installed does not "
        "| plain fails, installed loads | both fail, installed with PlacementError | installed fails otherwise "
        "| both load, devicemap's map differs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path, found in paths.items():
        outcomes = [row.outcome for row in found]
        options = PATH_OPTIONS.get(path.removeprefix("DEVICEMAP=1: "), "")
        if path.startswith("DEVICEMAP=1"):
            options = "cpu tiny + offload_folder, in a child process that never imports devicemap"
        lines.append(
            f"| {path} | {options} | {len(found)} | {sum(r.plain.loaded is not None for r in found)} "
            f"| {sum(r.installed.loaded is not None for r in found)} | {outcomes.count('REGRESSION')} "
            f"| {outcomes.count('plain fails, installed loads')} "
            f"| {outcomes.count('both fail, installed with PlacementError')} "
            f"| {outcomes.count('BOTH FAIL, installed not PlacementError')} "
            f"| {sum(r.maps_differ for r in found)} |"
        )
    lines.append("")
    lines.append("| path | options | outcome | plain | installed | devicemap's warnings | seconds |")
    lines.append("|---|---|---|---|---|---|---:|")
    for row in rows:
        plain = "loads" if row.plain.loaded is not None else row.plain.describe()[:100]
        installed = "loads" if row.installed.loaded is not None else row.installed.describe()[:100]
        if row.maps_differ:
            installed += " (another map)"
        warned = "; ".join(w.removeprefix("devicemap: ")[:90] for w in row.installed.warnings)
        lines.append(
            f"| {row.case.path} | {row.case.label} | {row.outcome} | {plain} | {installed} | {warned} "
            f"| {row.seconds:.1f} |"
        )
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _table(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the module: the summary table on the terminal (past pytest's capture), and the summary with every
    case to ``$DEVICEMAP_DIFFERENTIAL_TABLE`` when set."""
    started = time.perf_counter()
    yield
    if not ROWS:
        return
    took = f"{len(ROWS)} cases in {time.perf_counter() - started:.0f} s"
    table = summary(ROWS)
    target = os.environ.get("DEVICEMAP_DIFFERENTIAL_TABLE")
    if target:
        Path(target).write_text(f"{table}\n\n{took}\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for line in [*table.split("\n\n")[0].splitlines(), took]:
                reporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """The models are tiny: torch's thread pool only fights the other processes of a small shared machine
    (one thread makes the whole module about five times faster here); outputs do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _always_uninstalled() -> Iterator[None]:
    dm_install.uninstall()
    yield
    dm_install.uninstall()


def _needs(case: Case, request: pytest.FixtureRequest) -> Saved:
    if case.path in (DIFFUSERS_MODEL, DIFFUSERS_PIPELINE):
        import_with_torchao("diffusers")
        return request.getfixturevalue("diffusers_models")
    if case.path == PEFT:
        import_with_torchao("peft")
        return request.getfixturevalue("adapter")
    if case.kwargs.get("quantization_config", "").startswith("bnb"):
        import_bitsandbytes_for_transformers()
    if case.kwargs.get("quantization_config", "").startswith("torchao"):
        import_torchao_quantization()
    return request.getfixturevalue("saved")


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", CASES, ids=[f"{c.path.split()[0]}-{c.label}" for c in CASES])
def test_installed_never_fails_where_plain_loads(
    case: Case, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = _needs(case, request)
    if case.path == PEFT:
        # PEFT (0.21) re-saves disk-offloaded base weights to a path relative to the working directory (it
        # rebuilds the absolute path with os.path.join, dropping its leading "/"): keep them out of the checkout.
        cwd = saved.folder("peft-cwd")
        cwd.mkdir()
        monkeypatch.chdir(cwd)
    started = time.perf_counter()
    plain = attempt(case, saved, "plain")
    with dm_install.installed():
        installed = attempt(case, saved, "installed")
    limit = upstream_limit(plain, installed)
    if limit is not None:
        pytest.skip(f"neither run can load: {limit}")
    ROWS.append(Row(case, plain, installed, time.perf_counter() - started))
    compare(case, saved, plain, installed)


# ---------------------------------------------------------------------------------------------------------
# DEVICEMAP=1: the same calls from a program that never imports devicemap

CHILD = r"""
import json, sys, torch, accelerate, transformers
import transformers.modeling_utils as modeling_utils
assert modeling_utils._get_device_map.__module__ == "devicemap.integrations.transformers", "not installed"
path, out, cpu, tokens = sys.argv[1], sys.argv[2], sys.argv[3], torch.tensor(json.loads(sys.argv[4]))
model = transformers.AutoModelForCausalLM.from_pretrained(
    path, device_map="auto", max_memory={"cpu": cpu}, offload_folder=out + "-off1")
with torch.no_grad():
    first = model(tokens).logits
with accelerate.init_empty_weights():
    empty = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
empty.tie_weights()
model2 = accelerate.load_checkpoint_and_dispatch(
    empty, path + "/model.safetensors", device_map="auto", max_memory={"cpu": cpu}, offload_folder=out + "-off2")
with torch.no_grad():
    second = model2(tokens).logits
torch.save({"maps": [model.hf_device_map, model2.hf_device_map], "logits": [first, second]}, out)
"""


@pytest.mark.filterwarnings("ignore")
def test_environment_variable_installs_for_a_program_that_never_imports_devicemap(saved: Saved) -> None:
    out = saved.root / "child.pt"
    env = {**os.environ, "DEVICEMAP": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(saved.paths["llama"]),
            str(out),
            TINY_CPU,
            json.dumps(TOKENS.tolist()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    child = torch.load(out)
    expected = [
        _case(TRANSFORMERS, "llama", device_map="auto", max_memory={"cpu": TINY_CPU}, offload_folder=True),
        _case(ACCELERATE, "llama", device_map="auto", max_memory={"cpu": TINY_CPU}, offload_folder=True),
    ]
    for index, case in enumerate(expected):
        plain = attempt(case, saved, "plain")
        with dm_install.installed():
            installed = attempt(case, saved, "installed")
        assert installed.loaded is not None, installed.describe()
        child_run = Run(
            Loaded(child["logits"][index].float(), dict(child["maps"][index]), installed.loaded.device_bytes)
        )
        ROWS.append(
            Row(
                Case(f"DEVICEMAP=1: {case.path}", case.model, case.options),
                plain,
                child_run,
                time.perf_counter() - started,
            )
        )
        assert child_run.loaded is not None
        assert child_run.loaded.device_map == installed.loaded.device_map
        compare(case, saved, plain, child_run)
