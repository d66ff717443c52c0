"""``DEVICEMAP=1`` at interpreter start-up: install devicemap's loader hooks when a loader is first imported.

``devicemap_hooks.pth`` (run by ``site`` in every Python process) calls :func:`arm` when the ``DEVICEMAP``
variable asks for it. Arming imports nothing (no torch, not the devicemap package): it puts one finder on
``sys.meta_path`` that waits for the first import of a library devicemap hooks into (transformers,
accelerate, diffusers, peft). When that library's own module has run, the finder steps aside and calls
``devicemap.integrations.install()``, which patches what is already imported and the rest as it is imported.
A process that never imports one of them (``pip``, a build tool, ``python -c pass``) pays for this file and
nothing else.

Installing after the library's module has run, not before, matters: devicemap imports accelerate (and torch)
itself, and importing it while the library's own import is still being resolved would run that library twice.
"""

import sys
from _thread import RLock  # the C module: `threading` costs an import at every start-up

TRIGGERS = frozenset({"transformers", "accelerate", "diffusers", "peft"})
"""Top-level packages whose first import installs devicemap (their submodules come after them)."""

_lock = RLock()


class _InstallAfterLoading:
    """The real loader of a trigger package, then ``devicemap.integrations.install()``."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _install(module)

    def __getattr__(self, name):  # get_code, get_resource_reader, is_package... of the real loader
        return getattr(self.loader, name)


class _WaitForLoader:
    """A meta path finder that wraps the loader of the first trigger package imported, then goes away."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in TRIGGERS:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if hasattr(spec.loader, "exec_module"):
                spec.loader = _InstallAfterLoading(spec.loader)
            return spec
        return None


_finder = _WaitForLoader()


def arm():
    """Wait for the first import of a trigger package, then install devicemap's hooks. Idempotent."""
    with _lock:
        if any(name in sys.modules for name in TRIGGERS):
            # Imported before arming (by another start-up file): install now.
            _install(None)
        elif _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def _install(loaded):
    """Install devicemap's hooks; ``loaded``: the trigger package whose body has just run (Python is still
    finishing its import, so devicemap is told it is complete)."""
    with _lock:
        if _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
        _install_now(loaded)


def _install_now(loaded):
    try:
        from devicemap.integrations import install_after_import

        install_after_import(loaded)
    except Exception as error:  # a broken devicemap must not break the import of the user's library
        import warnings

        warnings.warn(
            f"devicemap: DEVICEMAP=1 could not install the loader hooks: {error!r}",
            RuntimeWarning,
            stacklevel=2,
        )


def is_armed():
    """Whether the finder still waits for a trigger package."""
    return _finder in sys.meta_path
