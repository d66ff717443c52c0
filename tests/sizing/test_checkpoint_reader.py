"""The header reader's fast path (typed, borrowing, shards read in parallel) gives what the checkpoint
holds however its JSON is spelled: escaped names, shard names spelled two ways, an index listing tensors
in any order, many shards. Each checkpoint is compared with the same tensors written plainly."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import devicemap
from devicemap import _core
from devicemap.sizing.checkpoint import checkpoint_tree

GPUS = {0: "3KiB", 1: "3KiB", "cpu": "1GiB"}
CONFIG = {"num_hidden_layers": 4, "tie_word_embeddings": True}


def tensors(layers: int = 4) -> dict[str, tuple[str, list[int]]]:
    """Non-ASCII and plain names, several dtypes, a tied embedding, quantization state under a weight."""
    named = {"módel.embed_tokens.weight": ("BF16", [16, 8])}
    for i in range(layers):
        named[f"módel.layers.{i}.self_attn.q_proj.weight"] = ("BF16", [8, 8])
        named[f"módel.layers.{i}.mlp.experts.{i % 2}.w1.weight"] = ("F32", [4, 8])
        named[f"módel.layers.{i}.mlp.down.weight"] = ("U8", [32])
        named[f"módel.layers.{i}.mlp.down.weight.absmax"] = ("F32", [2])
        named[f"módel.layers.{i}.norm.weight"] = ("BOOL", [8])
    named["módel.nörm.weight"] = ("F32", [8])
    return named


def write_shard(path: Path, named: dict[str, tuple[str, list[int]]], ascii_json: bool) -> None:
    width = {"BF16": 2, "F32": 4, "U8": 1, "BOOL": 1}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in named.items():
        size = width[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, ensure_ascii=ascii_json).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def write_checkpoint(folder: Path, shards: int, ascii_json: bool, spell_dot: bool = False) -> Path:
    """``shards`` files (one file without index when 1); the index lists tensors in reverse order, and
    with ``spell_dot`` names every other tensor's shard as ``./file``."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    named = list(tensors().items())
    if shards == 1:
        write_shard(folder / "model.safetensors", dict(named), ascii_json)
        return folder
    weight_map = {}
    per_shard = -(-len(named) // shards)
    for s in range(shards):
        part = dict(named[s * per_shard : (s + 1) * per_shard])
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_shard(folder / file, part, ascii_json)
        for k, name in enumerate(part):
            weight_map[name] = f"./{file}" if spell_dot and k % 2 else file
    index = {"metadata": {"total_size": 0}, "weight_map": dict(reversed(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, ensure_ascii=ascii_json))
    return folder


def tree_facts(folder: Path) -> list[tuple[str, int, str]]:
    tree = checkpoint_tree(folder)
    core = tree.core
    return [(core.name(i), core.subtree_bits(i), core.class_name(i)) for i in range(len(core))]


def plan_facts(folder: Path) -> tuple[dict, list]:
    plan = devicemap.plan_checkpoint(folder, max_memory=GPUS)
    return plan.device_map, [(u.device, u.weights) for u in plan.usage]


@pytest.mark.parametrize(("shards", "spell_dot"), [(1, False), (3, False), (3, True), (17, True)])
def test_escaped_json_and_shard_spellings_give_the_same_tree_plan_and_rows(tmp_path, shards, spell_dot):
    plain = write_checkpoint(tmp_path / "plain", 1, ascii_json=False)
    other = write_checkpoint(tmp_path / "other", shards, ascii_json=True, spell_dot=spell_dot)
    assert b"\\u00f3" in next(other.glob("*.safetensors")).read_bytes()  # the names really are escaped
    assert tree_facts(other) == tree_facts(plain)
    assert plan_facts(other) == plan_facts(plain)
    rows = _core.checkpoint_tensors(other)
    assert sorted(r[0] for r in rows) == sorted(tensors())
    assert len({r[0] for r in rows}) == len(rows)
    for name, dtype, shape, file, begin, end in rows:
        assert (dtype, shape) == tensors()[name]
        assert Path(file).parent == other and Path(file).is_file() and begin <= end


def test_a_tensor_the_index_puts_in_another_shard_is_named(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", 3, ascii_json=True)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = "módel.nörm.weight"
    index["weight_map"][moved] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        devicemap.CheckpointError, match=f'tensor "{moved}" listed in the index is not in shard'
    ):
        devicemap.plan_checkpoint(folder, max_memory=GPUS)
