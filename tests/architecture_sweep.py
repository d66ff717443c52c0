"""The architecture sweep: every transformers architecture that builds from its default
config, planned by devicemap under a few memory settings with each strategy, each plan checked by the
independent accounting of :mod:`sweep_oracle` and each refusal by its search for a runnable plan.

Used by ``tests/planners/test_architecture_sweep.py`` (a fixed subset, or every architecture with
``DEVICEMAP_SWEEP=all``) and ``benches/bench_architecture_sweep.py`` (every architecture, a table).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

import devicemap

from sweep_oracle import ModelTensors, accelerate_map, find_runnable, loads, weights_exceed_everything

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

# Model classes tried per model type, first that the type has: heads with tied embeddings first (tie
# groups are where refusals go wrong), then the base model.
MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_MAPPING_NAMES",
)


def settings(mt: ModelTensors) -> dict[str, dict[Any, int]]:
    """Device specs derived from the model's size (``T`` all tensors, ``L`` the largest one).

    * ``small_gpu0``: GPU 0 a twentieth of the model beside a GPU 1 of a third, a CPU of half plus the
      largest tensor, no disk: GPU 0 is too small to stage most blocks, another GPU or the CPU must, and
      the CPU is tight (the setting that tests tied-embedding models' refusals; a model whose largest
      tensor is small does not fit at all, a refusal the oracle proves);
    * ``small_gpu0_roomy``: GPU 0 half the largest tensor, GPU 1 half the model, a CPU of the whole model;
    * ``tight_cpu``: two GPUs of a third of the model each and a CPU of a third plus the largest tensor,
      no disk: everything must fit exactly, staging and kept buffers included;
    * ``disk``: two GPUs of a quarter each, a CPU of a quarter (at least twice the largest tensor, so it
      can run a block it loads from disk), the rest on disk;
    * ``tiny_gpus``: two GPUs each a third of the largest tensor, a CPU of half the model and a disk: the
      largest blocks can be staged by no GPU and run on the CPU.
    """
    total, largest = mt.total(), mt.largest()
    return {
        "small_gpu0": {0: total // 20, 1: total // 3, "cpu": total // 2 + largest},
        "small_gpu0_roomy": {0: max(largest // 2, 1), 1: total // 2, "cpu": total},
        "tight_cpu": {0: total // 3, 1: total // 3, "cpu": total // 3 + largest},
        "disk": {0: total // 4, 1: total // 4, "cpu": max(total // 4, 2 * largest), "disk": 0},
        "tiny_gpus": {0: largest // 3, 1: largest // 3, "cpu": total // 2, "disk": 0},
    }


def architectures() -> list[tuple[str, str]]:
    """(model type, model class name) for every model type transformers maps to a model class."""
    from transformers.models.auto import configuration_auto, modeling_auto

    found = []
    for model_type in sorted(configuration_auto.CONFIG_MAPPING_NAMES):
        for mapping in MAPPINGS:
            names = getattr(modeling_auto, mapping, {})
            if model_type in names:
                name = names[model_type]
                found.append((model_type, name if isinstance(name, str) else name[0]))
                break
    return found


def subset(arches: list[tuple[str, str]], every: int) -> list[tuple[str, str]]:
    """A fixed, deterministic share of the architectures (about one in ``every``, chosen by a hash of
    the name, so the same ones every run and on every machine), plus every one named in ``always``."""
    return [
        a for a in arches if a[0] in ALWAYS or int(hashlib.sha256(a[0].encode()).hexdigest(), 16) % every == 0
    ]


# Architectures the default run always checks: shapes known to expose wrong refusals and over-fills (tied
# embeddings beside a small GPU 0, bool attention masks, ...).
ALWAYS = frozenset(
    {
        "albert",
        "altclip",
        "big_bird",
        "blenderbot-small",
        "openai-gpt",
        "wavtokenizer",
        "wavtokenizer_encoder",
        "bert",
        "ernie",
        "data2vec-text",
        "bark",
        "gpt_neo",
        "t5",
        "llama",
    }
)


class CannotBuild(Exception):
    """transformers built none of the model classes it maps the model type to from the default config
    (each class's error in the message)."""

    def __init__(self, errors: list[tuple[str, BaseException]]):
        self.errors = errors
        super().__init__("; ".join(f"{name}: {type(err).__name__}: {str(err)[:200]}" for name, err in errors))

    @property
    def missing_package(self) -> bool:
        """Whether a class failed for want of an optional package (timm, ...) rather than its config."""
        return any(isinstance(err, ImportError) for _, err in self.errors)


def model_classes(model_type: str) -> tuple[list[type], list[tuple[str, BaseException]]]:
    """The classes transformers maps the model type to, in :data:`MAPPINGS` order (resolved through the
    Auto mappings, which also find classes the top-level namespace does not export), and the errors of
    the mappings that name a class transformers cannot load."""
    from transformers.models.auto import configuration_auto, modeling_auto

    config_class = configuration_auto.CONFIG_MAPPING[model_type]
    found: list[type] = []
    errors: list[tuple[str, BaseException]] = []
    for mapping in MAPPINGS:
        if model_type not in getattr(modeling_auto, mapping, {}):
            continue
        try:
            classes = getattr(modeling_auto, mapping.removesuffix("_NAMES"))[config_class]
        except Exception as err:  # the mapping names a class transformers does not have or cannot import
            errors.append((getattr(modeling_auto, mapping)[model_type], err))
            continue
        for cls in classes if isinstance(classes, (list, tuple)) else [classes]:
            if cls not in found:
                found.append(cls)
    return found, errors


def build(model_type: str, class_name: str | None = None) -> torch.nn.Module:
    """The default config's model on the meta device: the first mapped class (an LM head first) that
    transformers builds from it; :class:`CannotBuild` with every class's error when none does."""
    import transformers

    try:
        config = transformers.AutoConfig.for_model(model_type)
        classes, errors = model_classes(model_type)
    except Exception as err:
        raise CannotBuild([("config", err)]) from None
    for model_class in classes:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.device("meta"):
                    return model_class._from_config(config)
        except Exception as err:  # transformers' own failure to build this class from the default config
            errors.append((model_class.__name__, err))
    raise CannotBuild(errors or [(class_name or model_type, LookupError("no model class"))])


@dataclass
class Outcome:
    architecture: str
    setting: str
    strategy: str
    refused: bool = False
    # a refusal: "proof" (weights exceed every device), "no simple plan" (the oracle found none) or the
    # runnable plan the oracle found (a wrong refusal)
    refusal: str = ""
    wrong_refusal: bool = False
    over_fill: list[str] = field(default_factory=list)
    error: str = ""


@dataclass
class Report:
    built: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing_package: set[str] = field(default_factory=set)
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def skip(self, model_type: str, err: CannotBuild) -> None:
        self.skipped[model_type] = str(err)
        if err.missing_package:
            self.missing_package.add(model_type)

    @property
    def plans(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.refused and not o.error]

    def table(self) -> str:
        refused = [o for o in self.outcomes if o.refused]
        wrong = [o for o in refused if o.wrong_refusal]
        over = [o for o in self.plans if o.over_fill]
        errors = [o for o in self.outcomes if o.error]
        rows = [
            ("architectures built", len(self.built)),
            ("architectures skipped (transformers cannot build them)", len(self.skipped)),
            ("  of which for want of an optional package (timm, ...)", len(self.missing_package)),
            ("plans asked", len(self.outcomes)),
            ("plans returned", len(self.plans)),
            ("refusals", len(refused)),
            ("  of which a runnable plan exists (wrong)", len(wrong)),
            ("  proved: weights exceed every device", sum(o.refusal == "proof" for o in refused)),
            ("  no runnable plan found by the oracle", sum(o.refusal == "no simple plan" for o in refused)),
            ("plans over-filling a device", len(over)),
            ("other errors", len(errors)),
            ("seconds", round(self.seconds, 1)),
        ]
        by_setting = []
        for setting in sorted({o.setting for o in self.outcomes}):
            mine = [o for o in self.outcomes if o.setting == setting]
            by_setting.append(
                f"| {setting} | {len(mine)} | {sum(o.refused for o in mine)} | "
                f"{sum(o.wrong_refusal for o in mine)} | {sum(bool(o.over_fill) for o in mine)} |"
            )
        lines = ["| | count |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)]
        lines += [
            "",
            "| setting | plans asked | refusals | wrong refusals | over-fills |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += by_setting
        for o in wrong + over + errors:
            lines.append(
                f"- {o.architecture} {o.setting} {o.strategy}: {o.refusal or o.over_fill or o.error}"
            )
        return "\n".join(lines)


def check_architecture(model: torch.nn.Module, name: str, report: Report) -> list[Outcome]:
    """Every setting and strategy for one model: the plan's accounting, or the refusal's oracle."""
    mt = ModelTensors.of(model)
    found = []
    for setting, memory in settings(mt).items():
        for strategy in STRATEGIES:
            outcome = Outcome(name, setting, strategy)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    plan = devicemap.plan(model, dict(memory), strategy=strategy)
            except devicemap.DoesNotFitError as err:
                outcome.refused = True
                if weights_exceed_everything(mt, memory):
                    outcome.refusal = "proof"
                else:
                    runnable = find_runnable(mt, memory, accelerate_map(model, memory, strategy))
                    if runnable is None:
                        outcome.refusal = "no simple plan"
                    else:
                        outcome.wrong_refusal = True
                        outcome.refusal = f"refused ({str(err)[:160]}...) but {runnable[0]} runs"
            except Exception as err:  # any other error is a failure of its own
                outcome.error = f"{type(err).__name__}: {err}"
            else:
                outcome.over_fill = loads(mt, plan.device_map, plan.execution_map, memory).problems
            found.append(outcome)
    report.outcomes.extend(found)
    return found


def sweep(arches: Iterable[tuple[str, str]], report: Report | None = None) -> Report:
    report = report or Report()
    start = time.perf_counter()
    for model_type, class_name in arches:
        try:
            model = build(model_type, class_name)
        except CannotBuild as err:
            report.skip(model_type, err)
            continue
        report.built.append(model_type)
        check_architecture(model, model_type, report)
        del model
    report.seconds += time.perf_counter() - start
    return report
