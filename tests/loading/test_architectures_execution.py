"""The "huge embedding or small GPU 0" cases, on real transformers architectures.

Staging every offloaded block on GPU 0 (GPU-0-only staging) needs GPU 0 to hold the largest offloaded
block; it cannot when a big-vocabulary embedding is larger than every GPU, or when a small GPU 0 sits
beside a roomy GPU 1, and would refuse with ``DoesNotFitError`` ("0 executes the offloaded layers and
needs X free to stage them"). devicemap stages such blocks on another GPU or runs them on the CPU.

For every architecture below (big-vocabulary LMs first: Gemma 256k, Qwen 152k, BLOOM / mT5 / XLM-R 250k,
...), two device specs are checked:

* ``embedding``: GPUs each 0.8 x the model's largest tensor (the embedding, or a layer's largest matrix),
  a roomy CPU (and disk);
* ``small_gpu0``: GPU 0 far smaller than the layers, GPU 1 half the model, a roomy CPU;

and, for the small version with real weights, also ``disk``: one GPU of 0.8 x the largest tensor, a CPU
of 1.5 x it and a disk (models with an untied head then go to disk whole, and the CPU keeps room to run
the embedding from there).

That GPU-0-only staging fails in each of them is proved from tensor sizes alone, for any plan (see
:func:`gpu0_cannot_stage`): a tensor larger than every GPU is offloaded in every plan, or more bytes must
leave the GPUs than all tensors smaller than GPU 0 add up to; either way some offloaded block is larger
than GPU 0, which GPU-0-only staging has to stage there. (``execution_device=0`` is no stand-in for it: a
forced GPU still lets blocks it cannot stage run on the CPU, so it does not raise.)

1. The DEFAULT config of each architecture on the meta device gets a plan for both specs, accelerate's
   ``check_device_map`` accepts it, staging room is reserved only on the GPUs that stage, and the blocks
   GPU 0 cannot stage run on another GPU or on the CPU.
2. A small version of each (hidden 64, 2 layers, vocabulary 16000 so the embedding is larger than the
   small GPUs), random seeded weights saved with ``save_pretrained``, loaded with
   ``load_checkpoint(..., rehearse=True)`` for each of the three specs: every hook computes where the
   plan says (the CPU itself, or the rehearsal's stand-in GPU; equal logits alone cannot tell in a
   rehearsal) and the logits equal the unsplit model's.

Architectures whose default config transformers itself cannot build are skipped with transformers'
error; at least 30 must be checked (asserted).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import check_device_map
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

import devicemap

from plan_checks import check_hooks_follow_the_plan

CAUSAL, SEQ2SEQ, MASKED = "causal", "seq2seq", "masked"
AUTO = {CAUSAL: AutoModelForCausalLM, SEQ2SEQ: AutoModelForSeq2SeqLM, MASKED: AutoModelForMaskedLM}

# (model_type, head). The comment gives the default vocabulary where it is what makes the case.
ARCHITECTURES = [
    ("gemma", CAUSAL),  # 256k
    ("gemma2", CAUSAL),  # 256k
    ("gemma3_text", CAUSAL),  # 262k
    ("vaultgemma", CAUSAL),  # 256k
    ("qwen2", CAUSAL),  # 152k
    ("qwen3", CAUSAL),  # 152k
    ("qwen2_moe", CAUSAL),  # 152k, mixture of experts
    ("llama", CAUSAL),
    ("mistral", CAUSAL),
    ("mixtral", CAUSAL),  # mixture of experts
    ("bloom", CAUSAL),  # 250k
    ("xglm", CAUSAL),  # 256k
    ("cohere", CAUSAL),  # 256k
    ("cohere2", CAUSAL),  # 256k
    ("phi3", CAUSAL),
    ("phi", CAUSAL),
    ("olmo", CAUSAL),
    ("olmo2", CAUSAL),
    ("falcon", CAUSAL),
    ("gpt_neox", CAUSAL),
    ("gpt2", CAUSAL),
    ("opt", CAUSAL),
    ("stablelm", CAUSAL),
    ("starcoder2", CAUSAL),
    ("granite", CAUSAL),
    ("helium", CAUSAL),
    ("glm4", CAUSAL),  # 151k
    ("exaone4", CAUSAL),  # 102k
    ("smollm3", CAUSAL),  # 128k
    ("mpt", CAUSAL),
    ("codegen", CAUSAL),
    ("persimmon", CAUSAL),  # 262k
    ("internlm3", CAUSAL),
    ("apertus", CAUSAL),  # 131k
    ("ernie4_5", CAUSAL),  # 103k
    ("mt5", SEQ2SEQ),  # 250k
    ("umt5", SEQ2SEQ),  # 256k
    ("t5", SEQ2SEQ),
    ("m2m_100", SEQ2SEQ),  # 128k (NLLB's dense architecture)
    ("mbart", SEQ2SEQ),  # 250k
    ("marian", SEQ2SEQ),
    ("bart", SEQ2SEQ),
    ("pegasus", SEQ2SEQ),
    ("xlm-roberta", MASKED),  # 250k
    ("rembert", MASKED),  # 250k
    ("bert", MASKED),
    ("deberta-v2", MASKED),  # 128k
    ("electra", MASKED),
    ("camembert", MASKED),
    # Default configs transformers 5.24 cannot build (skipped with its error, kept to say so):
    ("ministral", CAUSAL),
    ("nemotron", CAUSAL),
    ("hunyuan_v1_dense", CAUSAL),
]

IDS = [model_type for model_type, _ in ARCHITECTURES]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run fastest on one thread, and a busy 2-core machine wastes less on spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- sizes and GPU-0-only staging ------------------------------------------------------------------


def tensor_bytes(model: torch.nn.Module) -> list[int]:
    """Bytes of every parameter and buffer, each shared tensor once."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen.setdefault(id(tensor), tensor.numel() * tensor.element_size())
    return list(seen.values())


def gpu_capacities(memory: dict) -> list[int]:
    return [size for key, size in memory.items() if isinstance(key, int)]


def gpu0_cannot_stage(tensors: list[int], total: int, memory: dict) -> bool:
    """Whether every plan offloads a block larger than GPU 0, which GPU-0-only staging (GPU 0 stages
    every offloaded block, keeping room for the largest) therefore refuses.

    A tensor is never split: one larger than every GPU is offloaded in every plan. Otherwise at least
    ``total - sum(GPUs)`` bytes are offloaded; if all tensors no larger than GPU 0 add up to less, some
    offloaded block holds a tensor larger than GPU 0.
    """
    gpus = gpu_capacities(memory)
    if max(tensors) > max(gpus):
        return True
    return total - sum(gpus) > sum(t for t in tensors if t <= gpus[0])


def scenarios(tensors: list[int], total: int) -> dict[str, dict]:
    largest = max(tensors)
    gpu = largest * 8 // 10
    return {
        "embedding": {0: gpu, 1: gpu, 2: gpu, 3: gpu, "cpu": 2 * total, "disk": 0},
        "small_gpu0": {0: max(total // 1000, 1), 1: total // 2, "cpu": 2 * total},
        # one GPU, a CPU that can run the largest tensor's block but not hold the model, the rest on disk
        "disk": {0: gpu, "cpu": largest * 3 // 2, "disk": 0},
    }


def offloaded_runs(plan: devicemap.Plan) -> dict[str, object]:
    return {b: plan.execution_map[b] for b, d in plan.assignments.items() if d in ("cpu", "disk")}


def check_plan_runs(model: torch.nn.Module, plan: devicemap.Plan, memory: dict, scenario: str) -> None:
    """accelerate accepts the map; capacities hold; staging room is kept exactly where blocks are staged;
    the blocks GPU 0 could not stage run elsewhere."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check_device_map(model, plan.device_map)
    assert set(plan.execution_map) == set(plan.assignments)
    for block, device in plan.assignments.items():
        if device not in ("cpu", "disk"):
            assert plan.execution_map[block] == device, block
    for usage in plan.usage:
        assert usage.capacity is None or usage.used <= usage.capacity, usage
    runs = offloaded_runs(plan)
    assert runs, "the model does not fit on the GPUs: something is offloaded"
    stagers = {d for d in runs.values() if d != "cpu"}
    for usage in plan.usage:
        if isinstance(usage.device, int) and usage.device not in stagers:
            assert usage.reserve == 0, (usage.device, plan.reserve_bytes)
    for block, device in runs.items():
        if device != "cpu":
            assert plan.reserve_bytes.get(device, 0) >= plan.block_bytes(block), (block, device)
        else:
            assert "runs on the CPU" in next(o.reason for o in plan.offloaded if o.name == block)
    gpus = gpu_capacities(memory)
    too_big = [b for b in runs if plan.block_bytes(b) > max(gpus)]
    assert all(runs[b] == "cpu" for b in too_big), {b: runs[b] for b in too_big}
    if scenario != "small_gpu0":
        assert too_big, "the largest tensor's block is larger than every GPU"
    # GPU 0 stages only blocks it has room for, not all of them.
    assert all(plan.block_bytes(b) <= gpus[0] for b, d in runs.items() if d == 0)
    assert set(runs.values()) != {0}


# --- 1. default configs on the meta device -----------------------------------------------------------


def build_default(model_type: str, head: str) -> torch.nn.Module:
    try:
        config = AutoConfig.for_model(model_type)
        with torch.device("meta"):
            return AUTO[head].from_config(config)
    except Exception as err:  # transformers' own failure to build its default config
        pytest.skip(
            f"transformers cannot build {model_type} from its default config: {type(err).__name__}: {err}"
        )


@pytest.mark.parametrize(("model_type", "head"), ARCHITECTURES, ids=IDS)
def test_default_config_gets_a_plan_gpu0_could_not_stage(model_type, head):
    model = build_default(model_type, head)
    tensors = tensor_bytes(model)
    total = devicemap.ModuleTree.from_module(model).total_bytes
    for scenario in ("embedding", "small_gpu0"):
        memory = scenarios(tensors, total)[scenario]
        assert gpu0_cannot_stage(tensors, total, memory), scenario  # GPU-0-only staging refuses it
        plan = devicemap.plan(model, memory)
        check_plan_runs(model, plan, memory, scenario)


UNBUILDABLE = {"ministral", "nemotron", "hunyuan_v1_dense"}
# transformers 5.0 (the oldest supported) also fails phi, stablelm and exaone4 (their configs lack
# pad_token_id), apertus (copies a meta tensor) and does not know internlm3
UNBUILDABLE_IN_5_0 = UNBUILDABLE | {"phi", "stablelm", "exaone4", "apertus", "internlm3"}


def test_at_least_30_architectures_are_checked():
    import transformers
    from packaging.version import Version

    oldest = Version(transformers.__version__).release[:2] == (5, 0)
    built, failed = [], []
    for model_type, head in ARCHITECTURES:
        try:
            with torch.device("meta"):
                AUTO[head].from_config(AutoConfig.for_model(model_type))
            built.append(model_type)
        except Exception:
            failed.append(model_type)
    # a transformers upgrade that fixes them: drop them from this set
    assert set(failed) == (UNBUILDABLE_IN_5_0 if oldest else UNBUILDABLE)
    assert len(built) >= 30, built


def test_the_old_rule_check_is_not_vacuous():
    """gpu0_cannot_stage says no when GPU 0 can stage every block a plan may offload."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(small_config("llama"))
    tensors = tensor_bytes(model)
    total = devicemap.ModuleTree.from_module(model).total_bytes
    largest = max(tensors)
    assert gpu0_cannot_stage(tensors, total, {0: largest - 1, 1: largest - 1, "cpu": 2 * total})
    assert not gpu0_cannot_stage(tensors, total, {0: largest - 1, 1: total, "cpu": 2 * total})  # all fit on 1
    roomy_gpu0 = {0: 2 * largest + 4096, 1: largest // 2, "cpu": 2 * total}
    assert not gpu0_cannot_stage(tensors, total, roomy_gpu0)
    plan = devicemap.plan(model, roomy_gpu0)  # GPU-0-only staging's plan: GPU 0 stages everything offloaded
    assert set(offloaded_runs(plan).values()) == {0}


# --- 2. small versions with real weights: rehearsed logits equal the unsplit model's -------------------

SMALL = {
    "vocab_size": 16000,
    "hidden_size": 64,
    "d_model": 64,
    "n_embd": 64,
    "embedding_size": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "d_ff": 128,
    "n_inner": 128,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_attention_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "d_kv": 16,
    "rotary_dim": 16,
    "layer_types": None,
    "max_position_embeddings": 128,
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")
INPUT_LENGTH, DECODER_LENGTH = 7, 5


def small_config(model_type: str):
    base = AutoConfig.for_model(model_type)
    known = set(base.to_dict()) | set(getattr(base, "attribute_map", {}))
    overrides = {k: v for k, v in SMALL.items() if k in known}
    for key in TOKEN_IDS:  # special tokens inside the smaller vocabulary
        value = getattr(base, key, None)
        if isinstance(value, int) and value >= SMALL["vocab_size"]:
            overrides[key] = 1
    return AutoConfig.for_model(model_type, **overrides)


def inputs(config) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (1, INPUT_LENGTH), generator=generator)
    found = {"input_ids": ids}
    if config.is_encoder_decoder:
        found["decoder_input_ids"] = ids[:, :DECODER_LENGTH]
    return found


@functools.cache
def saved_small(model_type: str, head: str, folder: Path) -> tuple[object, torch.Tensor]:
    """The small model saved to ``folder`` and its unsplit logits."""
    config = small_config(model_type)
    torch.manual_seed(0)
    model = AUTO[head].from_config(config).eval()
    model.save_pretrained(folder)
    with torch.no_grad():
        expected = model(**inputs(config)).logits
    return config, expected


def empty_model(head: str, config) -> torch.nn.Module:
    with init_empty_weights():  # weights on meta, buffers (rotary frequencies, position ids) computed
        model = AUTO[head].from_config(config).eval()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("small_architectures")


# transformers does not save these models' sinusoidal position tables (``_keys_to_ignore_on_save``) and
# recomputes them in from_pretrained; devicemap.load_checkpoint refuses such a checkpoint as incomplete
# (a load_checkpoint limitation unrelated to execution placement, recorded by the xfail test below), so
# they are loaded by transformers and placed with devicemap.dispatch.
DISPATCHED = {"marian"}


def rehearsed(model_type: str, head: str, config, folder: Path, plan: devicemap.Plan, offload: Path):
    if model_type in DISPATCHED:
        model = AUTO[head].from_pretrained(folder).eval()
        return devicemap.dispatch(model, plan, rehearse=True, offload_dir=offload)
    empty = empty_model(head, config)
    return devicemap.load_checkpoint(empty, folder, plan, rehearse=True, offload_dir=offload, progress=False)


# accelerate's check_device_map warns about tensor-level keys (final_logits_bias), which it emits itself
@pytest.mark.filterwarnings("ignore:The following device_map keys do not match:UserWarning")
@pytest.mark.parametrize(("model_type", "head"), ARCHITECTURES, ids=IDS)
def test_small_version_rehearsed_gives_the_unsplit_logits(model_type, head, checkpoints, tmp_path):
    build_default(model_type, head)  # skip what transformers cannot build, as above
    folder = checkpoints / model_type
    config, expected = saved_small(model_type, head, folder)
    meta = empty_model(head, config)
    tensors = tensor_bytes(meta)
    total = devicemap.ModuleTree.from_module(meta).total_bytes
    for scenario, memory in scenarios(tensors, total).items():
        assert gpu0_cannot_stage(tensors, total, memory), scenario
        plan = devicemap.plan(meta, memory)
        check_plan_runs(meta, plan, memory, scenario)
        model = rehearsed(model_type, head, config, folder, plan, tmp_path / scenario)
        check_hooks_follow_the_plan(model, plan)
        with torch.no_grad():
            logits = model(**inputs(config)).logits
        assert logits.shape == expected.shape, scenario
        assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6), (
            scenario,
            (logits - expected).abs().max().item(),
        )


@pytest.mark.xfail(
    strict=True,
    raises=devicemap.CheckpointError,
    reason="load_checkpoint does not know transformers leaves _keys_to_ignore_on_save out of checkpoints",
)
@pytest.mark.parametrize("model_type", sorted(DISPATCHED))
def test_load_checkpoint_of_a_model_saved_without_its_position_tables(model_type, checkpoints):
    head = dict(ARCHITECTURES)[model_type]
    folder = checkpoints / model_type
    config, _ = saved_small(model_type, head, folder)
    plan = devicemap.plan(empty_model(head, config), {"cpu": "1GiB"})
    devicemap.load_checkpoint(empty_model(head, config), folder, plan, progress=False)
