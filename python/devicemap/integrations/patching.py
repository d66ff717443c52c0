"""The patching machinery: which function of which library each hook replaces, applied at once or when the
library's import ends, and put back by :func:`uninstall` (see :mod:`devicemap.integrations`)."""

from __future__ import annotations

import importlib
import importlib.abc
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

from . import accelerate, diffusers, peft, transformers
from .fallbacks import warn_once

ENVIRONMENT_VARIABLE = "DEVICEMAP"
"""``DEVICEMAP=1`` (or ``true``/``yes``/``on``) asks :func:`install_from_environment` to install."""

STARTUP_LINE = (
    'import os; os.environ.get("DEVICEMAP", "").strip().lower() in ("1", "true", "yes", "on") and '
    '__import__("devicemap_startup").arm()'
)
"""The one line of ``devicemap_hooks.pth`` (run by ``site`` at every interpreter start): imports nothing but ``os``
unless ``DEVICEMAP`` asks for the install; then it imports the small ``devicemap_startup`` module (no torch,
not this package), which installs when transformers, accelerate, diffusers or peft is first imported. Code
that never imports devicemap is reached, at no cost to processes that never import those libraries."""


@dataclass(frozen=True)
class Patch:
    """One module attribute replaced while installed."""

    distribution: str
    """The package whose version is checked (``transformers``)."""
    module: str
    """The module holding the attribute (``transformers.modeling_utils``)."""
    attribute: str
    """The attribute replaced (``_get_device_map``)."""
    make: Callable[[Callable[..., object]], Callable[..., object]]
    """Builds the replacement from the original function (the fallback)."""


@dataclass(frozen=True)
class Support:
    """Versions of one library the hooks were written against: ``minimum <= version < below``."""

    distribution: str
    minimum: str
    below: str


_lock = threading.RLock()
_originals: dict[tuple[str, str], object] = {}
_replacements: dict[tuple[str, str], object] = {}
_pending: dict[str, list[Patch]] = {}  # module name -> patches waiting for it to be imported


def _supported() -> list[Support]:
    return [
        Support("transformers", "5.0", "6"),
        Support("accelerate", "1.0", "2"),
        Support("peft", "0.17", "1"),
        Support("diffusers", "0.35", "1"),
    ]


def _patches() -> list[Patch]:
    return [
        Patch(
            "transformers",
            "transformers.modeling_utils",
            "_get_device_map",
            transformers.make_get_device_map,
        ),
        Patch(
            "accelerate",
            "accelerate.big_modeling",
            "load_checkpoint_and_dispatch",
            accelerate.make_load_and_dispatch,
        ),
        Patch("accelerate", "accelerate", "load_checkpoint_and_dispatch", accelerate.make_load_and_dispatch),
        Patch("peft", "peft.peft_model", "get_balanced_memory", peft.make_get_balanced_memory),
        Patch("peft", "peft.peft_model", "infer_auto_device_map", peft.make_infer_auto_device_map),
        Patch(
            "diffusers",
            "diffusers.models.modeling_utils",
            "_determine_device_map",
            diffusers.make_determine,
        ),
        Patch(
            "diffusers",
            "diffusers.loaders.single_file_model",
            "_determine_device_map",
            diffusers.make_determine,
        ),
        Patch(
            "diffusers",
            "diffusers.pipelines.pipeline_loading_utils",
            "_assign_components_to_devices",
            diffusers.make_assign_components,
        ),
    ]


def _release(version: str) -> tuple[int, ...]:
    """``"5.24.0.dev0"`` -> ``(5, 24, 0)``: the numeric release part, enough for the ranges above."""
    found = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in found.group(0).split(".")) if found else ()


def _version_ok(support: Support) -> bool | None:
    """True when supported, False when installed at an unsupported version, None when not installed."""
    try:
        found = _release(metadata.version(support.distribution))
    except metadata.PackageNotFoundError:
        return None
    return _release(support.minimum) <= found < _release(support.below)


def _apply(patch: Patch, module: ModuleType) -> None:
    """Replace ``patch.attribute`` of the (fully imported) ``module``; called with the lock held."""
    key = (patch.module, patch.attribute)
    if key in _originals:
        return
    current = getattr(module, patch.attribute, None)
    if current is None:
        warn_once(f"{patch.module} has no {patch.attribute}; that loader keeps its own planner")
        return
    # A package can re-export a function it imported from an already-patched submodule (accelerate's
    # __init__ from big_modeling): that name then already holds a replacement; keep it, remember the original.
    for other_key, replacement in _replacements.items():
        if current is replacement:
            _originals[key] = _originals[other_key]
            _replacements[key] = replacement
            return
    replacement = patch.make(current)
    _originals[key] = current
    _replacements[key] = replacement
    setattr(module, patch.attribute, replacement)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a module the moment it finishes importing, so :func:`install` never imports a library
    itself (cheap enough to run at interpreter start-up) and still reaches code that imports it later."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if isinstance(spec.loader, importlib.abc.Loader) and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, then the pending patches for it."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        with _lock:
            for patch in _pending.pop(module.__name__, []):
                _apply(patch, module)

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, is_package... of the real loader
        return getattr(self.loader, name)


_finder = _PatchOnImport()


def install() -> list[str]:
    """Make ``from_pretrained(device_map="auto", ...)`` and friends use devicemap's plans.

    Libraries already imported are patched now; the others the moment they are imported (install never
    imports them itself). Idempotent: a second call changes nothing. Returns the ``module.attribute``
    names patched so far.

    >>> import devicemap.integrations as dm_install
    >>> patched = dm_install.install()  # doctest: +SKIP
    >>> "transformers.modeling_utils._get_device_map" in patched  # doctest: +SKIP
    True
    """
    return _install(finished=None)


def install_after_import(module: ModuleType | None) -> list[str]:
    """:func:`install`, called (by ``devicemap_startup``, for ``DEVICEMAP=1``) right after ``module``'s body has
    run: its import is still being finished by Python, but it is complete and is patched now."""
    return _install(finished=module)


def _install(finished: ModuleType | None) -> list[str]:
    with _lock:
        versions = {s.distribution: _version_ok(s) for s in _supported()}
        for support in _supported():
            if versions[support.distribution] is False:
                warn_once(
                    f"{support.distribution} {metadata.version(support.distribution)} is outside the versions "
                    f"devicemap hooks into (>= {support.minimum}, < {support.below}); it keeps its own planner"
                )
        for patch in _patches():
            if not versions.get(patch.distribution) or (patch.module, patch.attribute) in _originals:
                continue
            module = sys.modules.get(patch.module)
            if module is not None and (
                module is finished
                or (getattr(module, "__spec__", None) is not None and not _initializing(module))
            ):
                _apply(patch, module)
                continue
            if module is not None and hasattr(module, patch.attribute):
                # Being imported (by another thread, or by the import that called us) and the attribute is
                # already there: patch it now, and check again when the import ends (the rest of the module
                # could rebind the name).
                _apply(patch, module)
                _patch_when_imported(patch.module, [patch])
                continue
            if patch not in _pending.get(patch.module, []):
                _pending.setdefault(patch.module, []).append(patch)
            if module is not None:
                # Being imported, the attribute not yet defined: the finder has already been passed, so
                # patch when that import ends.
                _patch_when_imported(patch.module, [])
        if _pending and _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
        return [f"{m}.{a}" for m, a in _originals]


_early: dict[str, list[Patch]] = {}  # patches applied while their module was still being imported


def _patch_when_imported(name: str, applied: list[Patch]) -> None:
    """Once the import of ``name`` in progress finishes, apply its pending patches and re-apply those
    applied early whose attribute the rest of the module rebound. A thread imports ``name`` too, which
    blocks on Python's lock for that module until the importing thread is done."""
    waiting = name in _early
    _early.setdefault(name, []).extend(applied)
    if waiting:
        return

    def wait_then_patch() -> None:
        try:
            module = importlib.import_module(name)
        except BaseException:  # the other import failed: the finder patches a later attempt
            with _lock:
                _early.pop(name, None)
            return
        with _lock:
            for patch in _early.pop(name, []):
                key = (patch.module, patch.attribute)
                current = getattr(module, patch.attribute, None)
                if key in _replacements and current is not _replacements[key] and current is not None:
                    del _originals[key], _replacements[key]
                    _apply(patch, module)  # rebound after we patched: the new function is the original
            for patch in _pending.pop(name, []):
                _apply(patch, module)

    threading.Thread(target=wait_then_patch, name=f"devicemap-install-{name}", daemon=True).start()


def _initializing(module: ModuleType) -> bool:
    """Whether ``module`` is still executing its body (imported, not finished)."""
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def uninstall() -> None:
    """Put back every original function :func:`install` replaced (the same objects) and forget the patches
    still waiting for their library to be imported. Idempotent.

    An attribute someone else replaced after :func:`install` is left as they set it.
    """
    with _lock:
        _pending.clear()
        if _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        for (module_name, attribute), original in list(_originals.items()):
            module = sys.modules.get(module_name)
            if (
                module is not None
                and getattr(module, attribute, None) is _replacements[(module_name, attribute)]
            ):
                setattr(module, attribute, original)
            del _originals[(module_name, attribute)]
            del _replacements[(module_name, attribute)]


def is_installed() -> bool:
    """Whether :func:`install` is in effect (something patched, or waiting for its library's import)."""
    with _lock:
        return bool(_originals or _pending)


@contextmanager
def installed() -> Iterator[list[str]]:
    """Use devicemap's plans inside the ``with`` block only; what was installed before stays installed.

    >>> import devicemap.integrations as dm_install
    >>> with dm_install.installed() as patched:  # doctest: +SKIP
    ...     model = AutoModelForCausalLM.from_pretrained(path, device_map="balanced")
    """
    already = is_installed()
    patched = install()
    try:
        yield patched
    finally:
        if not already:
            uninstall()


def environment_requests_install(environ: dict[str, str] | None = None) -> bool:
    """Whether ``DEVICEMAP`` is set to ``1``, ``true``, ``yes`` or ``on`` (any case)."""
    value = (os.environ if environ is None else environ).get(ENVIRONMENT_VARIABLE, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def install_from_environment() -> list[str]:
    """:func:`install` when ``DEVICEMAP=1``; nothing otherwise. Meant to run at ``import devicemap`` or from a
    ``.pth`` start-up line, so code that never mentions devicemap is reached too."""
    if environment_requests_install():
        return install()
    return []
