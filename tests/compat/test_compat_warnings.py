"""devicemap.compat emits accelerate's warnings and log lines: same category, logger and text, under
the same conditions, on random models compared in the same process."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import warnings

import pytest
import torch
from accelerate.utils import get_balanced_memory as acc_balanced
from accelerate.utils import infer_auto_device_map as acc_infer
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from devicemap.compat import get_balanced_memory, infer_auto_device_map
from devicemap.compat.versions import installed_accelerate

from model_strategies import describe, max_memories, models, no_split_classes

EXAMPLES = int(os.environ.get("DEVICEMAP_EXAMPLES", "150"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
dtypes = st.sampled_from([None, "float16", torch.bfloat16])
# accelerate 1.0 - 1.1 have no fallback_allocation: leave the argument out there.
fallbacks = (
    st.booleans() if "fallback_allocation" in inspect.signature(acc_infer).parameters else st.just(None)
)


def fallback_kwargs(fallback):
    return {} if fallback is None else {"fallback_allocation": fallback}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def emitted(function, *args, **kwargs):
    """(result or exception type, [(category, text)], [(logger, level, text)]) of one call."""
    handler = _Records()
    accelerate_logger = logging.getLogger("accelerate")
    old_level = accelerate_logger.level
    accelerate_logger.addHandler(handler)
    accelerate_logger.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = function(*args, **kwargs)
            except Exception as err:  # accelerate's own crashes are filtered out by the callers
                result = type(err)
    finally:
        accelerate_logger.removeHandler(handler)
        accelerate_logger.setLevel(old_level)
    return result, [(w.category, str(w.message)) for w in caught], handler.records


def same_messages(ours, theirs):
    result, warned, logged = theirs
    assume(not isinstance(result, type))  # accelerate crashed: nothing to compare
    note(f"accelerate: {warned} {logged}")
    event(f"warnings: {len(warned)}, info lines: {sum(level == logging.INFO for _, level, _ in logged)}")
    assert ours[1] == warned
    assert ours[2] == logged


@SETTINGS
@given(data=st.data(), model=models(), no_split=no_split_classes, dtype=dtypes)
def test_infer_auto_device_map_emits_what_accelerate_emits(data, model, no_split, dtype):
    max_memory = data.draw(max_memories(model))
    note(describe(model))
    kwargs = dict(
        no_split_module_classes=no_split,
        dtype=dtype,
        offload_buffers=data.draw(st.booleans()),
        **fallback_kwargs(data.draw(fallbacks)),
    )
    theirs = emitted(acc_infer, model, max_memory=copy.deepcopy(max_memory), **kwargs)
    ours = emitted(infer_auto_device_map, model, max_memory=copy.deepcopy(max_memory), **kwargs)
    same_messages(ours, theirs)


@SETTINGS
@given(data=st.data(), model=models(), no_split=no_split_classes, low_zero=st.booleans())
def test_get_balanced_memory_emits_what_accelerate_emits(data, model, no_split, low_zero):
    max_memory = {k: v for k, v in data.draw(max_memories(model)).items() if k != "disk"}
    kwargs = dict(no_split_module_classes=no_split, low_zero=low_zero)
    theirs = emitted(acc_balanced, model, max_memory=copy.deepcopy(max_memory), **kwargs)
    ours = emitted(get_balanced_memory, model, max_memory=copy.deepcopy(max_memory), **kwargs)
    same_messages(ours, theirs)


def _buffered_model() -> torch.nn.Module:
    layers = []
    for _ in range(3):
        layer = torch.nn.Linear(16, 16)
        layer.register_buffer("mask", torch.ones(200, dtype=torch.bool))  # 25 bytes: printed as 25.0
        layers.append(layer)
    return torch.nn.Sequential(*layers)


# accelerate logs the devices it left empty from 1.2 on: those lines are expected only there.
LOGS_EMPTY_DEVICES = installed_accelerate().version >= (1, 2, 0)


@pytest.mark.parametrize(
    ("max_memory", "offload_buffers", "expected"),
    [
        # the whole model on the CPU, its 75.0 bytes of buffers fit no GPU: the UserWarning
        ({0: 50, "cpu": 10_000}, False, "requires 75.0 bytes of buffer"),
        # offloaded with the layers: no warning
        ({0: 50, "cpu": 10_000}, True, "no modules could be assigned" if LOGS_EMPTY_DEVICES else None),
        ({0: 1200, "cpu": 10_000}, False, "not available"),  # they fit next to GPU 0's reserve: no warning
        # GPU 0 holds nothing (layer + reserve)
        (
            {0: 10, 1: 1200, "cpu": 10_000},
            False,
            "  - 0: 2226.0 bytes required" if LOGS_EMPTY_DEVICES else None,
        ),
        ({0: 10_000, 3: 10_000}, False, "Device 3 is not available"),  # no GPU on this machine
    ],
)
def test_the_named_messages(max_memory, offload_buffers, expected):
    model = _buffered_model()
    theirs = emitted(acc_infer, model, max_memory=dict(max_memory), offload_buffers=offload_buffers)
    ours = emitted(infer_auto_device_map, model, max_memory=dict(max_memory), offload_buffers=offload_buffers)
    assert ours[1:] == theirs[1:]
    texts = [text for _, text in theirs[1]] + [text for _, _, text in theirs[2]]
    if expected is None:
        assert not any("no modules could be assigned" in text for text in texts)
        return
    assert any(expected in text for text in texts)
    assert any(c is UserWarning for c, _ in theirs[1]) == (expected.startswith("requires"))


def test_the_single_gpu_share_line(monkeypatch):
    import devicemap.compat as compat

    memory = {0: 10**9, "cpu": 10**10}
    monkeypatch.setattr(compat, "available_memory", lambda: dict(memory))
    monkeypatch.setattr("accelerate.utils.modeling.get_max_memory", lambda max_memory=None: dict(memory))
    model = _buffered_model()
    theirs = emitted(acc_balanced, model)
    ours = emitted(get_balanced_memory, model)
    assert ours[1:] == theirs[1:]
    assert any("90%" in text for _, _, text in theirs[2])


def test_untied_weights_warning(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    model.lm_head.weight = torch.nn.Parameter(
        model.lm_head.weight.detach().clone()
    )  # declared tied, not tied
    memory = {0: 10**6, "cpu": 10**8}
    theirs = emitted(acc_infer, model, max_memory=dict(memory))
    ours = emitted(infer_auto_device_map, model, max_memory=dict(memory))
    assert ours[1:] == theirs[1:]
    assert any("not tied" in text for _, _, text in theirs[2])


def test_untied_weights_warning_reads_the_decoder_text_config():
    """From accelerate 1.7 the check reads config.get_text_config(decoder=True) (where multimodal models
    keep tie_word_embeddings), before it read the config itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class SplitConfig(LlamaConfig):
        def get_text_config(self, decoder=None, encoder=None):
            return LlamaConfig(tie_word_embeddings=True)

    config = SplitConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    memory = {0: 10**6, "cpu": 10**8}
    theirs = emitted(acc_infer, model, max_memory=dict(memory))
    ours = emitted(infer_auto_device_map, model, max_memory=dict(memory))
    assert ours[1:] == theirs[1:]
    warned = any("not tied" in text for _, _, text in theirs[2])
    assert warned == (installed_accelerate().version >= (1, 7, 0))
