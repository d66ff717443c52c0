"""Plan.prefill_streams made so: a CPU-run block computes passes from its threshold on its GPU (a
rehearsal's stand-in here) and shorter ones in place, with the unsplit model's outputs either way."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate import init_empty_weights

import devicemap
from devicemap.cost.hardware import Hardware
from devicemap.loading import prefill_streaming
from devicemap.plans import PrefillStream

transformers = pytest.importorskip("transformers")

# Without a fixed cost per hop (no engine hop either), attention stays on the GPU and experts with no room there run on the CPU.
HARDWARE = dataclasses.replace(
    Hardware.preset("rtx-4090", host="desktop-ddr5", engine="ideal"), link_latency=0.0
)


def tiny_moe() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        vocab_size=128,
    )
    return transformers.Qwen3MoeForCausalLM(config).eval()


def streamed_plan(model: torch.nn.Module, min_tokens: int) -> devicemap.Plan:
    experts = sum(p.numel() * 4 for n, p in model.named_parameters() if "experts" in n)
    total = sum(p.numel() * 4 for p in model.parameters())
    workload = devicemap.Workload(batch_size=1, seq_len=16)
    runtime = devicemap.plan(model, {0: 8 * total}, workload=workload).usage[0].runtime
    plan = devicemap.plan(
        model,
        {0: total - experts // 2 + runtime, "cpu": 4 * total},
        objective="speed",
        hardware=HARDWARE,
        workload=workload,
    )
    on_cpu = [b for b, d in plan.execution_map.items() if d == "cpu" and "experts" in b]
    assert on_cpu, plan.explain()
    plan.prefill_streams = {block: PrefillStream(0, min_tokens) for block in on_cpu}
    return plan


@pytest.mark.parametrize("load", ["dispatch", "load_checkpoint"])
def test_long_passes_stream_and_short_ones_run_in_place_with_the_same_logits(
    load: str, tmp_path, monkeypatch
) -> None:
    model = tiny_moe()
    prompt = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        expected = model(prompt, use_cache=True)
        step = expected.logits[:, -1:].argmax(-1)
        expected_next = model(step, past_key_values=expected.past_key_values, use_cache=True).logits
    plan = streamed_plan(model, min_tokens=8)
    copies: list[str] = []
    moved = prefill_streaming._moved
    monkeypatch.setattr(prefill_streaming, "_moved", lambda t, d: copies.append(str(d)) or moved(t, d))
    if load == "dispatch":
        placed = devicemap.dispatch(model, plan, rehearse=True)
    else:
        model.save_pretrained(tmp_path / "ckpt")
        with init_empty_weights():  # buffers (rotary inv_freq) stay real, as from_pretrained keeps them
            empty = transformers.Qwen3MoeForCausalLM(model.config).eval()
        placed = devicemap.load_checkpoint(empty, tmp_path / "ckpt", plan, rehearse=True, progress=False)
    with torch.no_grad():
        got = placed(prompt, use_cache=True)
        streamed = len(copies)
        got_next = placed(step, past_key_values=got.past_key_values, use_cache=True).logits
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got_next, expected_next)
    assert streamed > 0  # the 12-token prompt reached every streamed block's threshold
    assert len(copies) == streamed  # one decoded token did not
    for block in plan.prefill_streams:  # between passes the weights are the CPU's again
        assert all(p.device.type == "cpu" for p in placed.get_submodule(block).parameters())


def test_a_pass_that_raises_leaves_the_weights_where_they_were() -> None:
    from accelerate.hooks import add_hook_to_module

    class Failing(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    layer = Failing(4, 4)
    weight = layer.weight
    hook = prefill_streaming._hook("cpu", min_tokens=2)
    add_hook_to_module(layer, hook)
    with pytest.raises(RuntimeError, match="boom"):
        layer(torch.ones(3, 4))
    hook.pre_forward(layer, torch.ones(1, 4))  # the next pass puts the block's own weights back first
    assert layer.weight is weight
