"""Placement quality: devicemap's balanced split against accelerate's "balanced" and "sequential".

    .venv/bin/python benches/bench_quality.py           # 12 model shapes x {2, 4, 8} GPUs
    .venv/bin/python benches/bench_quality.py --quick   # 3 shapes

For each catalog model (bfloat16, meta device) and GPU count it prints:

(a) the smallest equal per-GPU memory with which each method places nothing on CPU/disk (found by
    bisection to 1 MiB; accelerate "balanced" = get_balanced_memory + infer_auto_device_map, as
    transformers does for device_map="balanced"; "sequential" = infer_auto_device_map alone), next to
    the optimum: the smallest possible largest GPU load of any contiguous split of the blocks;
(b) with roomy GPUs (1.25 x the larger of model / GPUs and the optimum, each), the largest GPU load
    relative to the mean GPU load.

It exits non-zero if devicemap ever needs more memory than accelerate or misses the optimum.
"""

from __future__ import annotations

import argparse
import sys

import devicemap
from devicemap import catalog
from devicemap.compare import accelerate_device_map, min_equal_gpu_memory

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
    def __init__(self, name: str, gpus: int):
        self.name, self.gpus = name, gpus
        self.model = catalog.build_meta_model(name)
        self.no_split = sorted(self.model._no_split_modules)
        self.tree = devicemap.ModuleTree.from_module(self.model, dtype=DTYPE)

    def memory(self, per_gpu: int) -> dict:
        return {**{g: per_gpu for g in range(self.gpus)}, "cpu": 4 * self.tree.total_bytes}

    def accelerate_balanced(self, per_gpu: int) -> dict:
        return accelerate_device_map(self.model, self.memory(per_gpu), "balanced", self.no_split, DTYPE)

    def accelerate_sequential(self, per_gpu: int) -> dict:
        return accelerate_device_map(self.model, self.memory(per_gpu), "sequential", self.no_split, DTYPE)

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
    print(
        "| model | GPUs | optimum GiB | devicemap | accelerate balanced | accelerate sequential "
        "| peak/mean devicemap | accelerate balanced | accelerate sequential |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        for gpus in (2, 4, 8):
            case = Case(name, gpus)
            best = case.optimum()
            low = max(best - 2 * MIB, 0)
            ours = min_equal_gpu_memory(case.devicemap_balanced, low, 2 * best)
            theirs_bal = min_equal_gpu_memory(case.accelerate_balanced, low, 2 * best)
            theirs_seq = min_equal_gpu_memory(case.accelerate_sequential, low, 2 * best)
            roomy = int(max(1.25 * case.tree.total_bytes / gpus, 1.25 * best))
            ratios = []
            for place in (case.devicemap_balanced, case.accelerate_balanced, case.accelerate_sequential):
                loads = case.loads(place(roomy))
                ratios.append(max(loads) / (sum(loads) / gpus) if sum(loads) else float("nan"))
            print(
                f"| {name} | {gpus} | {gib(best)} | {gib(ours)} | {gib(theirs_bal)} | {gib(theirs_seq)} | "
                + " | ".join(f"{r:.2f}" for r in ratios)
                + " |",
                flush=True,
            )
            if ours > min(theirs_bal, theirs_seq) or ours - best > MIB:
                print(
                    f"  !! devicemap missed: ours {ours}, optimum {best}, accelerate {theirs_bal}/{theirs_seq}"
                )
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
