"""The catalog's shapes as data (devicemap.catalog.trees) give exactly what the models transformers builds
give: the same size trees for every dtype the command accepts (and accelerate's sizing of them, for the
compat port), the same runtime memory, FLOPs and decoder layers; and the shipped files are what
scripts/export_catalog_trees.py writes with the installed libraries."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import devicemap
from devicemap import catalog
from devicemap.catalog import tree_export, trees
from devicemap.cli import inputs as cli_inputs
from devicemap.compat.versions import AccelerateRelease, installed_accelerate
from devicemap.inputs import dtype_names
from devicemap.inputs.dtypes import dtype_bits, memory_bits, target_bits, to_dtype
from devicemap.sizing.compute import flops_per_token
from devicemap.sizing.workload import Workload, runtime_memory
from repo import REPO

ROOT = REPO
SCRIPT = ROOT / "scripts" / "export_catalog_trees.py"
RERUN = "rerun `.venv/bin/python scripts/export_catalog_trees.py` and commit the files it writes"
# The weight dtypes the command accepts (cli_inputs.DTYPES) and None (the model's own), spelled as it may.
DTYPES = [None, "float16", "bf16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "int8", "uint8"]
RELEASES = [installed_accelerate(), AccelerateRelease((1, 3, 0)), AccelerateRelease((1, 10, 0))]


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """Every bundled model, built once for the whole module (about as long as the catalog tests take)."""
    return {name: catalog.build_meta_model(name) for name in catalog.names()}


def _generated_with_other_versions(name: str) -> str | None:
    """Why a difference is expected: the shipped file was made by other torch/transformers versions."""
    recorded = trees._load(name)["generated_with"]  # type: ignore[index]
    installed = tree_export.versions()
    if recorded == installed:
        return None
    return f"{name}'s data was made with {recorded}, these tests run {installed}"


def test_every_bundled_model_ships_its_shape():
    for name in catalog.names():
        assert trees.shape(name) is not None, f"no data for {name}: {RERUN}"
    assert sorted(p.name.removesuffix(".json.gz") for p in trees._folder().iterdir()) == catalog.names()


@pytest.mark.parametrize("name", catalog.names())
def test_the_shipped_data_is_what_the_script_writes(models, name):
    fresh = tree_export.shape_data(models[name], catalog.load_config(name))
    shipped = trees._load(name)
    if not tree_export.same_shape(fresh, shipped):  # type: ignore[arg-type]
        reason = _generated_with_other_versions(name)
        if reason is not None:
            pytest.skip(f"{reason}, which build it otherwise")
        pytest.fail(f"python/devicemap/catalog/trees/{name}.json.gz is stale: {RERUN}")


@pytest.mark.parametrize("name", catalog.names())
def test_trees_are_the_trees_of_the_built_models(models, name):
    model, shape = models[name], trees.shape(name)
    assert shape is not None
    for dtype in DTYPES:
        weights = dtype and cli_inputs.dtype("--dtype", dtype)
        expected = devicemap.ModuleTree.from_module(model, dtype=weights)
        tree = shape.tree(weights)
        if tree.core.columns() != expected.core.columns():
            reason = _generated_with_other_versions(name)
            if reason is not None:
                pytest.skip(reason)
            pytest.fail(f"{name} sized as {dtype}: the data tree differs from the model's ({RERUN})")
        assert tree.no_split_module_classes == expected.no_split_module_classes
        assert tree.total_bytes == expected.total_bytes and tree.tied_groups == expected.tied_groups
        for release in RELEASES:  # accelerate's sizes, for devicemap.compat's port
            sized = dict(dtype=weights, accelerate_tie_order=True, element_bits=release.element_bits)
            expected = devicemap.ModuleTree.from_module(model, **sized)  # type: ignore[arg-type]
            assert shape.accelerate_tree(weights, release).core.columns() == expected.core.columns()


@pytest.mark.parametrize("name", catalog.names())
def test_what_planning_reads_of_the_model_is_recorded(models, catalog_data_as_built, name):
    catalog_data_as_built(name)
    model, shape = models[name], trees.shape(name)
    assert shape is not None
    assert shape.parameter_count == sum(p.numel() for p in model.parameters())
    assert shape.flops == flops_per_token(model)
    assert shape.no_split_module_classes == devicemap.ModuleTree.from_module(model).no_split_module_classes
    assert shape.module_class_names == sorted({type(m).__name__ for m in model.modules()})
    workload = Workload(batch_size=2, seq_len=1024)
    for dtype in (None, "bfloat16", "float8_e4m3fn"):
        tree = shape.tree(dtype)
        assert shape.runtime(workload, tree, dtype) == runtime_memory(model, tree, workload, dtype)
    kv = Workload(batch_size=1, seq_len=4096, kv_dtype="float16", logits_tokens=None)
    assert shape.runtime(kv, tree, None) == runtime_memory(model, tree, kv, None)


def test_a_shape_is_used_only_with_the_config_it_was_made_from(monkeypatch):
    configs = dict(catalog.configs._configs())
    changed = {**configs["llama-3.2-1b"], "num_hidden_layers": 2}
    monkeypatch.setattr(trees, "_configs", lambda: {**configs, "llama-3.2-1b": changed})
    trees.shape.cache_clear()
    try:
        assert trees.shape("llama-3.2-1b") is None  # the command then builds the model from the config
        assert trees.shape("llama-3-8b") is not None
    finally:
        trees.shape.cache_clear()


def test_wrong_dtypes_are_refused_as_the_model_refuses_them():
    shape = trees.shape("llama-3.2-1b")
    assert shape is not None
    for wrong in ("float4_e2m1fn_x2", "int4", "bfloat17"):
        with pytest.raises(devicemap.InvalidOptionError) as expected:
            devicemap.ModuleTree.from_module(torch.nn.Linear(2, 2), dtype=wrong)
        with pytest.raises(devicemap.InvalidOptionError) as raised:
            shape.tree(wrong)
        assert str(raised.value) == str(expected.value)


def test_the_dtype_table_agrees_with_torch():
    for name in dtype_names.names():
        info = dtype_names.known(name)
        resolved = to_dtype(name)
        assert info is not None and str(resolved) == f"torch.{info.name}", name
        assert (info.bits, info.memory_bits, info.itemsize) == (
            dtype_bits(resolved),
            memory_bits(resolved),
            resolved.itemsize,
        )
        assert info.floating == resolved.is_floating_point
        assert dtype_names.known(f"torch.{name}") == info
    for name in cli_inputs.DTYPES:  # every --dtype the command takes is answered without torch
        assert dtype_names.known(name) is not None and target_bits(name) == dtype_names.known(name).bits  # type: ignore[union-attr]
    assert dtype_names.known(torch.float16) is None and dtype_names.known("complex64") is None


def test_the_script_writes_the_shipped_file(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("export_catalog_trees", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # in-process: torch and transformers are loaded already
    assert script.main(["llama-3.2-1b", "--out", str(tmp_path)]) == 0
    assert "1 file(s) written" in capsys.readouterr().out
    written = tree_export.decode((tmp_path / "llama-3.2-1b.json.gz").read_bytes())
    reason = _generated_with_other_versions("llama-3.2-1b")
    assert tree_export.same_shape(written, trees._load("llama-3.2-1b")) or reason, RERUN  # type: ignore[arg-type]
    assert script.export(["llama-3.2-1b"], tmp_path) == []  # an unchanged file is left alone
