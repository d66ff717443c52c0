"""Where the repository is, for tests that run its scripts or read its files (tests live in sub-folders)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
