"""Never worse than the library it replaces, on every transformers architecture.

Every architecture transformers maps to a model class (``CONFIG_MAPPING`` and the AutoModel mappings; an
LM head first, where the tied embeddings are) is built from its default config on the meta device and
planned under the device specs of :func:`architecture_sweep.settings` (a small GPU 0, a tight CPU, a
disk; capacities derived from the model's size) with each strategy. Each answer is judged independently
of devicemap's own byte counts (:mod:`sweep_oracle`, written from the meta model's tensors):

* a plan must fit every device: its weights, the buffers of offloaded blocks (accelerate's hooks keep
  them on the execution device with ``offload_buffers=False``) and the largest block it stages, with the
  tied tensors that block loads;
* a refusal must be justified: the weights exceed every device together, or no simple plan runs
  (accelerate's own map, everything on the CPU, the model-order fill with staging room on one device,
  each with every simple choice of execution device).

The default run checks a fixed subset (about one architecture in ``DEVICEMAP_SWEEP_EVERY``, 8 by default,
chosen by a hash of the name, plus those of :data:`architecture_sweep.ALWAYS`); ``DEVICEMAP_SWEEP=all``
checks every one (``benches/bench_architecture_sweep.py`` does too, and prints the table). Architectures
transformers itself cannot build from the default config are skipped, counted and reported with its error.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

import devicemap

from architecture_sweep import ALWAYS, CannotBuild, Report, architectures, build, check_architecture, subset
from sweep_oracle import ModelTensors, find_runnable, in_order, loads, runs_within

EVERY = int(os.environ.get("DEVICEMAP_SWEEP_EVERY", "8"))
ALL = os.environ.get("DEVICEMAP_SWEEP") == "all"
ARCHITECTURES = architectures() if ALL else subset(architectures(), EVERY)
REPORT = Report()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("model_type", "class_name"), ARCHITECTURES, ids=[a for a, _ in ARCHITECTURES])
def test_architecture_plans_fit_and_refusals_are_justified(model_type, class_name):
    start = time.perf_counter()
    try:
        model = build(model_type, class_name)
    except CannotBuild as err:  # transformers' own failure to build its default config
        REPORT.skip(model_type, err)
        pytest.skip(f"transformers cannot build {model_type} from its default config: {err}")
    REPORT.built.append(model_type)
    outcomes = check_architecture(model, model_type, REPORT)
    REPORT.seconds += time.perf_counter() - start
    wrong = [f"{o.setting}/{o.strategy}: {o.refusal}" for o in outcomes if o.wrong_refusal]
    over = [f"{o.setting}/{o.strategy}: {o.over_fill}" for o in outcomes if o.over_fill]
    errors = [f"{o.setting}/{o.strategy}: {o.error}" for o in outcomes if o.error]
    assert not wrong, wrong
    assert not over, over
    assert not errors, errors


def test_the_subset_is_fixed_and_covers_the_reported_architectures():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    every = architectures()
    assert len(every) > 400  # transformers 5.0 maps 422 model types to a class, later 5.x more
    assert subset(every, EVERY) == subset(list(reversed(every)), EVERY)[::-1]
    chosen = {a for a, _ in subset(every, EVERY)}
    assert {"albert", "big_bird", "blenderbot-small", "openai-gpt"} <= chosen
    # wavtokenizer is newer than transformers 5.0: always checked where this transformers has it
    assert ALWAYS & {a for a, _ in every} <= chosen
    assert "wavtokenizer" in chosen or "wavtokenizer" not in CONFIG_MAPPING_NAMES


# --- the oracle itself ------------------------------------------------------------------------------------


def small_stack(n: int = 4, width: int = 16) -> torch.nn.Module:
    """``n`` Linear layers, each with a 64-byte buffer, and a tied head reusing layer 0's weight."""
    layers = []
    for _ in range(n):
        layer = torch.nn.Linear(width, width, bias=False)
        layer.register_buffer("scale", torch.zeros(16), persistent=False)
        layers.append(layer)
    model = torch.nn.Sequential(*layers)
    head = torch.nn.Linear(width, width, bias=False)
    head.weight = layers[0].weight
    model.add_module("head", head)
    return model


def test_the_accounting_counts_buffers_of_offloaded_blocks_where_they_run_and_tied_weights_staged():
    model = small_stack()
    mt = ModelTensors.of(model)
    weight = 16 * 16 * 4
    assert mt.total() == 4 * weight + 4 * 64
    device_map = {"0": 0, "1": "cpu", "2": "cpu", "3": "disk", "head": 0}
    runs = {"1": 0, "2": "cpu", "3": "cpu"}
    found = loads(mt, device_map, runs, {0: 10**6, "cpu": 10**6, "disk": 0})
    assert found.weights == {0: weight, "cpu": 2 * weight, "disk": weight}
    # buffers: block 0 on GPU 0, block 1 runs on GPU 0, blocks 2 and 3 run on the CPU
    assert found.kept_buffers == {0: 2 * 64, "cpu": 2 * 64}
    assert found.staging == {0: weight, "cpu": weight}  # block 1 streamed to GPU 0, block 3 loaded on the CPU
    # the tied head, offloaded with layer 0 and staged on GPU 0, loads the shared weight
    tied = loads(
        mt, {"0": "cpu", "1": 0, "2": 0, "3": 0, "head": "cpu"}, {"0": 0, "head": 0}, {0: 10**6, "cpu": 10**6}
    )
    assert tied.staging == {0: weight} and tied.weights["cpu"] == weight
    # a byte short anywhere is an over-fill
    need = weight + 2 * 64 + weight
    assert runs_within(mt, device_map, runs, {0: need, "cpu": 10**6, "disk": 0})
    assert not runs_within(mt, device_map, runs, {0: need - 1, "cpu": 10**6, "disk": 0})


def test_the_oracle_finds_a_plan_when_one_exists_and_none_when_the_model_cannot_run():
    model = small_stack()
    mt = ModelTensors.of(model)
    weight = 16 * 16 * 4
    assert in_order(mt, {0: 2 * weight, "cpu": 10 * weight}, {}) is not None
    found = find_runnable(mt, {0: weight + 64, 1: weight + 64, "cpu": 2 * weight + 128})
    assert found is not None
    name, device_map, execution = found
    assert runs_within(mt, device_map, execution, {0: weight + 64, 1: weight + 64, "cpu": 2 * weight + 128})
    # every device smaller than one layer: nothing can compute a layer
    assert find_runnable(mt, {0: weight - 1, "cpu": weight - 1, "disk": 0}) is None


def test_a_refused_plan_devicemap_made_before_issue_19_is_now_made_and_fits():
    """The architecture shape behind the sweep's refusals (bert, ernie, data2vec-text): tied embedding and
    decoder, a GPU 0 smaller than a layer, a CPU that holds every layer but the LM head's transform."""
    from transformers import BertConfig, BertForMaskedLM

    with torch.device("meta"):
        model = BertForMaskedLM(
            BertConfig(
                vocab_size=4000,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                max_position_embeddings=64,
            )
        )
    mt = ModelTensors.of(model)
    tree = devicemap.ModuleTree.from_module(model)
    # the tie group: word embedding = decoder weight, decoder bias = cls.predictions.bias
    group = tree.module_bytes("bert.embeddings") + tree.module_bytes("cls.predictions.bias")
    layer = tree.module_bytes("bert.encoder.layer.0")
    transform = tree.module_bytes("cls.predictions.transform")
    memory = {0: layer - 1, 1: group + layer + transform, "cpu": 3 * layer + transform // 2}
    # The map accelerate makes on bert's default config in that setting runs: the whole `cls` module goes
    # with the tied embedding to GPU 1, the layers the CPU holds run there. A model-order fill does not.
    accelerate_like = {"bert.embeddings": 1, "cls": 1, "bert.encoder.layer.0": 1} | {
        f"bert.encoder.layer.{i}": "cpu" for i in (1, 2, 3)
    }
    assert runs_within(mt, accelerate_like, {f"bert.encoder.layer.{i}": "cpu" for i in (1, 2, 3)}, memory)
    assert find_runnable(mt, memory) is None
    for strategy in ("auto", "balanced", "balanced_low_0", "sequential"):
        plan = devicemap.plan(model, memory, strategy=strategy)
        assert runs_within(mt, plan.device_map, plan.execution_map, memory), strategy
        assert plan.assignments["cls.predictions.transform.dense"] in (0, 1)


def test_the_sweep_table(capsys):
    """Runs after the architectures above (tests run in file order): the table of this run, printed past
    pytest's capture (numbers for the README), and its totals agree with the per-architecture tests."""
    if not REPORT.outcomes:
        pytest.skip("no architecture of the sweep ran in this session")
    with capsys.disabled():
        print(
            f"\n\narchitecture sweep ({'every architecture' if ALL else f'about 1 in {EVERY} architectures'}):\n{REPORT.table()}\n"
        )
    assert not any(o.wrong_refusal or o.over_fill or o.error for o in REPORT.outcomes)
