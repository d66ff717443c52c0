"""Checkpoint benchmarks, in one process.

    .venv/bin/python benches/bench_checkpoint.py [--quick]

1. Header-only planning: a synthetic 160-shard checkpoint with 60k+ tensors (headers written for
   real, tensor data left as sparse holes, so nothing big touches the disk) planned with
   ``devicemap.plan_checkpoint``.
2. Loading with half the layers on disk: ``accelerate.load_checkpoint_and_dispatch`` against
   ``devicemap.load_checkpoint`` on the same checkpoint and the same device map (CPU executes,
   disk holds half the layers). accelerate copies every disk weight into its offload folder; devicemap
   serves them in place from the checkpoint's own files. Both models' logits are compared.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import tempfile
import time
from pathlib import Path

import torch

import devicemap


def write_sparse_shards(folder: Path, layers: int, experts: int, shards: int, width: int = 256) -> int:
    """A mixture-of-experts checkpoint: real headers, data as holes. Returns the tensor count."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for layer in range(layers):
        names += [
            f"model.layers.{layer}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        ]
        names += [
            f"model.layers.{layer}.mlp.experts.{e}.{w}.weight"
            for e in range(experts)
            for w in ("w1", "w2", "w3")
        ]
    weight_map = {}
    per_shard = -(-len(names) // shards)
    for s in range(shards):
        part = names[s * per_shard : (s + 1) * per_shard]
        header, offset = {}, 0
        for name in part:
            size = width * width * 2
            header[name] = {"dtype": "BF16", "shape": [width, width], "data_offsets": [offset, offset + size]}
            offset += size
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        raw = json.dumps(header).encode()
        with open(folder / file, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)) + raw)
            handle.truncate(8 + len(raw) + offset)  # sparse: no data written
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(
        json.dumps({"num_hidden_layers": layers, "tie_word_embeddings": False})
    )
    return len(names)


def bench_headers(quick: bool) -> None:
    layers, experts, shards = (8, 64, 16) if quick else (80, 250, 160)
    with tempfile.TemporaryDirectory() as tmp:
        count = write_sparse_shards(Path(tmp), layers, experts, shards)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            plan = devicemap.plan_checkpoint(tmp, max_memory={g: "40GiB" for g in range(4)} | {"cpu": "1TiB"})
            best = min(best, time.perf_counter() - start)
        print(
            f"header-only plan of {shards} shards, {count:,} tensors: {best * 1e3:.0f} ms "
            f"({len(plan.device_map)} device_map entries)"
        )


def build_model(layers: int, hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def empty_model(config):
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        return LlamaForCausalLM(config).eval()


def bench_load(quick: bool) -> None:
    from accelerate import load_checkpoint_and_dispatch

    layers, hidden = (4, 256) if quick else (12, 1024)
    model = build_model(layers, hidden)
    ids = torch.randint(0, 8192, (1, 16))
    with torch.no_grad():
        reference = model(ids).logits
    work = Path(tempfile.mkdtemp())
    try:
        # One file: accelerate's load_state_dict fails on a shard whose every weight maps to disk
        # (safetensors "device disk is invalid"); devicemap handles sharded ones too (see tests).
        model.save_pretrained(work / "ckpt", max_shard_size="10GB")
        total = devicemap.ModuleTree.from_module(model).total_bytes
        plan = devicemap.plan_checkpoint(work / "ckpt", max_memory={"cpu": int(total * 0.6), "disk": 0})
        layer_devices = [d for name, d in plan.assignments.items() if name.startswith("model.layers.")]
        on_disk = sum(1 for d in layer_devices if d == "disk")
        times = {}
        for label in ("accelerate", "devicemap"):
            shutil.rmtree(work / "offload", ignore_errors=True)
            empty = empty_model(model.config)
            start = time.perf_counter()
            if label == "accelerate":
                loaded = load_checkpoint_and_dispatch(
                    empty,
                    str(work / "ckpt"),
                    device_map=plan.device_map,
                    offload_folder=str(work / "offload"),
                )
            else:
                loaded = devicemap.load_checkpoint(
                    empty, work / "ckpt", plan, offload_dir=work / "offload", progress=False
                )
            loaded_at = time.perf_counter() - start
            with torch.no_grad():  # the first forward touches every weight (mmap'd pages included)
                logits = loaded(ids).logits
            times[label] = (loaded_at, time.perf_counter() - start)
            torch.testing.assert_close(logits, reference)
        size = total / 2**20
        (acc_load, acc_total), (dm_load, dm_total) = times["accelerate"], times["devicemap"]
        print(
            f"{size:.0f} MiB checkpoint, {on_disk} of {len(layer_devices)} layers on disk, CPU executes:\n"
            f"  load:                 accelerate {acc_load:.2f} s, devicemap {dm_load:.2f} s "
            f"({acc_load / dm_load:.0f}x)\n"
            f"  load + first forward: accelerate {acc_total:.2f} s, devicemap {dm_total:.2f} s "
            f"({acc_total / dm_total:.1f}x); logits equal to the unsplit model"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    bench_headers(args.quick)
    bench_load(args.quick)


if __name__ == "__main__":
    main()
