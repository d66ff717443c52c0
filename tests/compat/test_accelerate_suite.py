"""accelerate's own device-map tests, from the installed release's sdist, run against devicemap.compat.

accelerate's ``tests/test_modeling_utils.py`` for the installed version (downloaded once with pip into
``~/.cache/devicemap/accelerate``, see ``accelerate_sources.py``; never committed here) is loaded as a
module; its ``infer_auto_device_map`` and ``get_balanced_memory`` (and ``accelerate.infer_auto_device_map``,
which one test imports itself) are replaced by devicemap.compat's, and every test of
``ModelingUtilsTester`` whose name mentions ``infer_auto_device_map``, ``get_balanced_memory`` or
``clean_device_map`` runs, except those listed in :data:`NOT_RUN` with the reason. Tests accelerate marks
as needing an accelerator run all the same: they check budgets computed from ``max_memory`` dicts, which
need no device (devicemap's answer does not depend on one).

Offline, the download fails and so does ``test_accelerate_suite_is_available``, with pip's reason.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
import types
import unittest

import pytest

import devicemap.compat as compat

from accelerate_sources import FetchError, modeling_tests

SELECTED = re.compile(r"infer_auto_device_map|get_balanced_memory|clean_device_map")
NOT_RUN = {
    "test_clean_device_map": "tests accelerate's clean_device_map helper on hand-written maps; devicemap.compat "
    "does not replace that helper (clean_result=True is exercised by every infer_auto_device_map test)",
    "test_infer_auto_device_map_on_t0pp": "downloads bigscience/T0pp's config from the Hugging Face Hub "
    "(@require_huggingface_suite); tied T5 embeddings are compared with accelerate in test_compat_accelerate.py",
}
"""Selected by name but not run, with the reason."""

VERSION = importlib.metadata.version("accelerate")


def _load() -> tuple[types.ModuleType | None, str | None]:
    try:
        path = modeling_tests(VERSION)
    except FetchError as err:
        return None, str(err)
    if importlib.util.find_spec("parameterized") is None:
        # Only tests outside the selection use parameterized.expand; a stand-in lets the module import.
        stand_in = types.ModuleType("parameterized")
        stand_in.parameterized = types.SimpleNamespace(expand=lambda *a, **k: lambda f: f)  # type: ignore[attr-defined]
        sys.modules.setdefault("parameterized", stand_in)
    spec = importlib.util.spec_from_file_location(
        f"accelerate_{VERSION.replace('.', '_')}_test_modeling_utils", path
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.infer_auto_device_map = compat.infer_auto_device_map
    module.get_balanced_memory = compat.get_balanced_memory
    return module, None


SUITE, FETCH_ERROR = _load()


def _tester() -> type[unittest.TestCase] | None:
    # Looked up, not kept as a module global: pytest would collect (and run) every TestCase found there.
    return getattr(SUITE, "ModelingUtilsTester", None)


NAMES = sorted(n for n in dir(_tester()) if n.startswith("test_") and SELECTED.search(n)) if _tester() else []


def test_accelerate_suite_is_available():
    """The suite of the installed accelerate could be fetched and holds device-map tests to run."""
    if FETCH_ERROR is not None:
        pytest.fail(f"accelerate {VERSION}'s own tests could not be fetched: {FETCH_ERROR}")
    assert _tester() is not None, f"accelerate {VERSION}'s test_modeling_utils.py has no ModelingUtilsTester"
    assert len([n for n in NAMES if n not in NOT_RUN]) >= 5, NAMES


@pytest.mark.parametrize("name", [n for n in NAMES if n not in NOT_RUN])
def test_accelerate_device_map_test(name, monkeypatch):
    import accelerate

    monkeypatch.setattr(accelerate, "infer_auto_device_map", compat.infer_auto_device_map)
    monkeypatch.setattr(accelerate, "get_balanced_memory", compat.get_balanced_memory, raising=False)
    tester = _tester()
    assert tester is not None
    method = getattr(tester, name)
    if getattr(method, "__unittest_skip__", False):  # @require_non_cpu & co: run the body itself
        method = method.__wrapped__
    case = tester(name)
    case.setUp()
    try:
        method(case)
    finally:
        case.tearDown()


def test_the_selection_names_what_it_leaves_out():
    """Every test left out is one the selection would run (no stale entries), and none is skipped
    silently: the suite's other decorators are either unwrapped above or listed here."""
    assert FETCH_ERROR is None, FETCH_ERROR
    for name in NOT_RUN:
        assert SELECTED.search(name), name
    tester = _tester()
    assert isinstance(tester, type) and issubclass(tester, unittest.TestCase)
