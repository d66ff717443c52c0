"""The ``devicemap`` command (:mod:`devicemap.cli.command`): plan, compare, export, pictures and JSON."""

from .command import main

__all__ = ["main"]
