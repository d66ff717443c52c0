"""Placement quality: devicemap's balanced split against accelerate's and transformers 5's "balanced"
and "sequential".

    .venv/bin/python benches/bench_quality.py           # 12 model shapes x {2, 4, 8} GPUs
    .venv/bin/python benches/bench_quality.py --quick   # 3 shapes

For each catalog model (bfloat16, meta device) and GPU count it prints:

(a) the smallest equal per-GPU memory with which each method places nothing on CPU/disk (found by
    bisection to 1 MiB; accelerate "balanced" = get_balanced_memory + infer_auto_device_map, as
    transformers does for device_map="balanced"; "sequential" = infer_auto_device_map alone), next to
    the optimum: the smallest possible largest GPU load of any contiguous split of the blocks;
(b) with roomy GPUs (1.25 x the larger of model / GPUs and the optimum, each), the largest GPU load
    relative to the mean GPU load.

transformers 5 = what ``from_pretrained(device_map="balanced" | "sequential", max_memory=...)``
computes today with its own planner (``transformers.integrations.accelerate._get_device_map``, on the
model built as from_pretrained builds it; see ``transformers_planner.py``); ``"auto"`` is its
``"balanced"``. Its columns are left out, with the reason printed, on transformers < 5.

It exits non-zero if devicemap ever needs more memory than accelerate or transformers 5, or misses the
optimum.
"""

from __future__ import annotations

import argparse
import sys

import devicemap
from devicemap import catalog
from devicemap.cli.compare import accelerate_device_map, min_equal_gpu_memory
from transformers_planner import build_like_from_pretrained, transformers_device_map, unavailable_reason

MODELS = [
    "llama-3.2-1b",
    "llama-3-8b",
    "llama-3-70b",
    "mistral-7b",
    "mixtral-8x7b",
    "mixtral-8x22b",
    "qwen2.5-7b",
    "qwen3-30b-a3b",
    "gemma-2-9b",
    "phi-3-mini",
    "opt-6.7b",
    "t5-large",
]
QUICK = ["llama-3-8b", "mixtral-8x7b", "t5-large"]
DTYPE = "bfloat16"
MIB = 2**20


class Case:
    def __init__(self, name: str, gpus: int, with_transformers: bool):
        self.name, self.gpus = name, gpus
        self.model = catalog.build_meta_model(name)
        self.no_split = sorted(self.model._no_split_modules)
        self.tree = devicemap.ModuleTree.from_module(self.model, dtype=DTYPE)
        # what from_pretrained(dtype=DTYPE) plans on: same config, built in DTYPE, ties not applied
        self.tf_model = build_like_from_pretrained(self.model, DTYPE) if with_transformers else None

    def memory(self, per_gpu: int) -> dict:
        return {**{g: per_gpu for g in range(self.gpus)}, "cpu": 4 * self.tree.total_bytes}

    def accelerate_balanced(self, per_gpu: int) -> dict:
        return accelerate_device_map(self.model, self.memory(per_gpu), "balanced", self.no_split, DTYPE)

    def accelerate_sequential(self, per_gpu: int) -> dict:
        return accelerate_device_map(self.model, self.memory(per_gpu), "sequential", self.no_split, DTYPE)

    def transformers_balanced(self, per_gpu: int) -> dict:
        return transformers_device_map(self.tf_model, self.memory(per_gpu), "balanced")

    def transformers_sequential(self, per_gpu: int) -> dict:
        return transformers_device_map(self.tf_model, self.memory(per_gpu), "sequential")

    def devicemap_balanced(self, per_gpu: int) -> dict:
        try:
            return devicemap.plan(self.tree, max_memory=self.memory(per_gpu), strategy="balanced").device_map
        except devicemap.DoesNotFitError:  # e.g. GPU 0 cannot even stage the largest offloaded layer
            return {"": "cpu"}

    def optimum(self) -> int:
        roomy = devicemap.plan(self.tree, max_memory=self.memory(self.tree.total_bytes), strategy="balanced")
        return max(roomy.device_bytes[g] for g in range(self.gpus))

    def loads(self, device_map: dict) -> list[int]:
        per = [0] * self.gpus
        for name, device in device_map.items():
            if isinstance(device, int):
                per[device] += self.tree.module_bytes(name)
        return per


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def run(names: list[str]) -> bool:
    ok = True
    skip = unavailable_reason()
    if skip is not None:
        print(f"(no transformers 5 columns: {skip})")
    tf = skip is None
    methods = ["devicemap", "accelerate balanced", "accelerate sequential"]
    if tf:
        methods += ["transformers 5 balanced", "transformers 5 sequential"]
    print(
        "| model | GPUs | optimum GiB | " + " | ".join(methods) + " | peak/mean " + " | ".join(methods) + " |"
    )
    print("|---|---:|---:|" + "---:|" * (2 * len(methods)))
    for name in names:
        for gpus in (2, 4, 8):
            case = Case(name, gpus, tf)
            placers = [case.devicemap_balanced, case.accelerate_balanced, case.accelerate_sequential]
            if tf:
                placers += [case.transformers_balanced, case.transformers_sequential]
            best = case.optimum()
            low = max(best - 2 * MIB, 0)
            needs = [min_equal_gpu_memory(place, low, 2 * best) for place in placers]
            roomy = int(max(1.25 * case.tree.total_bytes / gpus, 1.25 * best))
            ratios = []
            for place in placers:
                loads = case.loads(place(roomy))
                ratios.append(max(loads) / (sum(loads) / gpus) if sum(loads) else float("nan"))
            print(
                f"| {name} | {gpus} | {gib(best)} | "
                + " | ".join(gib(n) for n in needs)
                + " | "
                + " | ".join(f"{r:.2f}" for r in ratios)
                + " |",
                flush=True,
            )
            ours, others = needs[0], needs[1:]
            if ours > min(others) or ours - best > MIB:
                print(f"  !! devicemap missed: ours {ours}, optimum {best}, others {others} ({methods[1:]})")
                ok = False
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not run(QUICK if args.quick else MODELS):
        sys.exit(1)


if __name__ == "__main__":
    main()
