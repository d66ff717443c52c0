"""The architecture sweep in full: every transformers architecture that builds from its
default config (meta device), planned by devicemap under each device spec of
``tests/architecture_sweep.py`` with each strategy, every plan checked by an accounting written from the
model's tensors (weights, buffers of offloaded blocks on their execution device, staging with tied
tensors) and every refusal by a search for a runnable plan (``tests/sweep_oracle.py``).

    .venv/bin/python benches/bench_architecture_sweep.py             # every architecture (~10 minutes)
    .venv/bin/python benches/bench_architecture_sweep.py --every 8   # the subset `make test` checks
    .venv/bin/python benches/bench_architecture_sweep.py --only bert,albert

Prints one line per architecture with a finding, then the table (the README's numbers). Exits non-zero
if a plan over-fills a device, a refusal had a runnable plan, or planning raised anything else. The
same checks run as a test (``tests/planners/test_architecture_sweep.py``; ``DEVICEMAP_SWEEP=all`` for every
architecture).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from architecture_sweep import CannotBuild, Report, architectures, build, check_architecture, subset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", type=int, default=1, help="about one architecture in N (a fixed subset)")
    parser.add_argument("--only", default="", help="comma-separated model types")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # transformers' notes on default configs
    import torch

    torch.set_num_threads(1)
    arches = architectures()
    if args.only:
        wanted = set(args.only.split(","))
        arches = [a for a in arches if a[0] in wanted]
    elif args.every > 1:
        arches = subset(arches, args.every)
    report = Report()
    start = time.perf_counter()
    for model_type, class_name in arches:
        try:
            model = build(model_type, class_name)
        except CannotBuild as err:  # transformers' own failure to build its default config
            report.skip(model_type, err)
            continue
        report.built.append(model_type)
        for o in check_architecture(model, model_type, report):
            if o.wrong_refusal or o.over_fill or o.error:
                print(
                    f"{model_type} {o.setting} {o.strategy}: {o.refusal or o.over_fill or o.error}",
                    flush=True,
                )
        del model
    report.seconds = time.perf_counter() - start
    print(f"\narchitecture sweep: {len(arches)} model types, transformers {_version()}\n")
    print(report.table())
    print("\nskipped (transformers cannot build the default config):")
    for model_type, why in sorted(report.skipped.items()):
        print(f"  {model_type}: {why[:300]}")
    bad = [o for o in report.outcomes if o.wrong_refusal or o.over_fill or o.error]
    return 1 if bad else 0


def _version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    sys.exit(main())
