"""Pipeline stage balance: devicemap.plan_stages against an even split by layer count.

    .venv/bin/python benches/bench_stages.py

An even split gives every stage the same number of decoder layers (the default of most pipeline
engines), so the stages holding the embedding and the output head carry more. devicemap's exact min-max
split moves layers off those stages. Tied embeddings are copied to each stage that uses them.
"""

from __future__ import annotations

import devicemap
from devicemap import catalog
from devicemap.sizing.workload import decoder_layers

CASES = [
    ("llama-3-70b", [["80GiB"] * 4] * 2),
    ("qwen2.5-72b", [["80GiB"] * 2] * 4),
    ("mixtral-8x22b", [["80GiB"] * 4] * 2),
    ("llama-3-8b", [["24GiB"] * 4]),
    ("gemma-2-9b", [["24GiB"] * 4]),
]


def even_split(model, stages: int) -> list[int]:
    """Stage bytes when every stage gets the same number of layers (remainder to the first ones)."""
    tree = devicemap.ModuleTree.from_module(model, dtype="bfloat16", untie=True)
    layers = decoder_layers(model, model.config)
    per, extra = divmod(len(layers), stages)
    loads, start = [], 0
    for s in range(stages):
        count = per + (1 if s < extra else 0)
        loads.append(sum(tree.module_bytes(name) for name in layers[start : start + count]))
        start += count
    rest = tree.total_bytes - sum(loads)  # embeddings, final norm, head (and rotary tables)
    head = tree.module_bytes(catalog_head(model))
    loads[0] += rest - head
    loads[-1] += head
    return loads


def catalog_head(model) -> str:
    return next(name for name, module in model.named_modules() if module is model.get_output_embeddings())


def main() -> None:
    print("| model | hosts x GPUs | stages | even split: largest stage | devicemap: largest stage | saved |")
    print("|---|---|---:|---:|---:|---:|")
    for name, hosts in CASES:
        model = catalog.build_meta_model(name)
        stages = devicemap.plan_stages(model, hosts=hosts, dtype="bfloat16")
        ours = max(s.bytes for s in stages.stages)
        even = max(even_split(model, sum(len(h) for h in hosts)))
        print(
            f"| {name} | {len(hosts)} x {len(hosts[0])} | {len(stages.stages)} | {even / 2**30:.2f} GiB | "
            f"{ours / 2**30:.2f} GiB | {100 * (even - ours) / even:.1f}% |"
        )


if __name__ == "__main__":
    main()
