"""Write the catalog's shapes as data: ``python/devicemap/catalog/trees/<name>.json.gz``, one per bundled model.

    .venv/bin/python scripts/export_catalog_trees.py                  # every bundled model, in the package
    .venv/bin/python scripts/export_catalog_trees.py llama-3-8b       # some of them
    .venv/bin/python scripts/export_catalog_trees.py --out /tmp/trees # somewhere else (to compare)

Rerun it after adding or changing a config in ``python/devicemap/catalog/configs/``, or after upgrading
transformers or torch when ``tests/test_catalog_trees.py`` says the shipped files differ from what the
installed libraries build. It builds each model on the meta device with transformers
(:func:`devicemap.catalog.build_meta_model`) and writes what :mod:`devicemap.catalog.trees` needs to give
the command (``devicemap plan llama-3-70b ...``) the same size tree without importing torch or
transformers: see :mod:`devicemap.catalog.tree_export` for the contents. A file is rewritten only when its
contents change, so the versions recorded in it ("generated_with") stay those that made it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PACKAGE_TREES = Path(__file__).resolve().parent.parent / "python" / "devicemap" / "catalog" / "trees"


def export(names: list[str], folder: Path) -> list[str]:
    """Write the data file of each of ``names`` into ``folder``; return the names whose file changed."""
    from devicemap import catalog
    from devicemap.catalog import tree_export

    folder.mkdir(parents=True, exist_ok=True)
    changed = []
    for name in names or catalog.names():
        data = tree_export.build(name)
        target = folder / f"{name}.json.gz"
        if target.is_file():
            old = tree_export.decode(target.read_bytes())
            if tree_export.same_shape(old, data):
                continue
        target.write_bytes(tree_export.encode(data))
        changed.append(name)
    if not names:  # a full export: no file of a model that is no longer bundled
        for stale in folder.glob("*.json.gz"):
            if stale.name.removesuffix(".json.gz") not in catalog.names():
                stale.unlink()
                changed.append(stale.name)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="bundled model names (default: all)")
    parser.add_argument("--out", type=Path, default=PACKAGE_TREES, help=f"folder (default: {PACKAGE_TREES})")
    args = parser.parse_args(argv)
    changed = export(args.names, args.out)
    print(f"{len(changed)} file(s) written in {args.out}: {', '.join(changed) or 'all up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
