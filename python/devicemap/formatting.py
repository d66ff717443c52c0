"""Sizes and runs of layers as people read them; shared by the plan table, the pictures and the CLI."""

from __future__ import annotations

from collections.abc import Sequence

_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_bytes(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1.

    >>> format_bytes(512), format_bytes(3 * 2**29), format_bytes(140 * 2**40)
    ('512 B', '1.50 GiB', '140.00 TiB')
    """
    for unit, size in _UNITS:
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


NAME_LIMIT = 160
"""Characters of one name a table or message shows; longer ones are cut with an ellipsis."""
MESSAGE_LIMIT = 4000
"""Characters of one message the command prints (its start and end are kept)."""


def _escaped(text: str) -> str:
    """``text`` with every non-printable character (controls, escape sequences, line and paragraph
    separators) written as Python writes it in a string literal, so nothing reaches a terminal raw."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown_name(name: str, limit: int = NAME_LIMIT) -> str:
    r"""A module or tensor name as a table shows it: escaped (a checkpoint's names are data, not terminal
    commands or extra lines) and cut to ``limit`` characters.

    >>> shown_name("model.layers.0")
    'model.layers.0'
    >>> print(shown_name("evil\x1b[2J\nforged line"))
    evil\x1b[2J\nforged line
    >>> len(shown_name("a" * 10_000))
    160
    """
    text = _escaped(name)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown_message(message: str, limit: int = MESSAGE_LIMIT) -> str:
    r"""An error message as the command prints it: one line, escaped, at most ``limit`` characters with its
    start (what went wrong) and end (the fix) kept.

    >>> print(shown_message("bad name 'x\ny'"))
    bad name 'x\ny'
    >>> text = shown_message("start " + "x" * 10_000 + " the fix", limit=100)
    >>> len(text) <= 100, text.startswith("start "), text.endswith(" the fix")
    (True, True, True)
    """
    text = _escaped(message)
    if len(text) <= limit:
        return text
    room = limit - len(f" … ({len(text)} characters cut) … ")  # the count has at most this many digits
    head, tail = room * 2 // 3, room - room * 2 // 3
    marker = f" … ({len(text) - head - tail} characters cut) … "
    return text[:head] + marker + text[len(text) - tail :]


def span_label(blocks: Sequence[str], max_parts: int = 4) -> str:
    """Name the layers a device holds, in model order: consecutive numbered siblings become one range,
    other layers are named, and the count comes last. Only what is there is named, so a device holding the
    embedding, the head and one layer does not read as holding the whole model.

    >>> span_label(["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2"])
    'model.embed_tokens, model.layers.0–2 (4)'
    >>> span_label(["model.embed_tokens", "model.norm", "lm_head"])
    'model.embed_tokens, model.norm, lm_head (3)'
    >>> span_label(["a", "b", "c", "d", "e", "f"])
    'a, b, c, …, f (6)'
    >>> span_label(["lm_head"])
    'lm_head'
    """
    if not blocks:
        return "-"
    runs: list[list[str]] = []  # [parent, first index, last index] for numbered runs, [name] otherwise
    for name in blocks:
        parent, _, last = name.rpartition(".")
        previous = runs[-1] if runs else None
        if last.isdigit():
            if (
                previous is not None
                and len(previous) == 3
                and previous[0] == parent
                and int(previous[2]) + 1 == int(last)
            ):
                previous[2] = last
            else:
                runs.append([parent, last, last])
        else:
            runs.append([name])
    parts = [shown_name(_run_text(run)) for run in runs]
    if len(parts) > max_parts:
        parts = [*parts[: max_parts - 1], "…", parts[-1]]
    text = ", ".join(parts)
    return text if len(blocks) == 1 else f"{text} ({len(blocks)})"


def _run_text(run: list[str]) -> str:
    if len(run) == 1:
        return run[0]
    parent, first, last = run
    prefix = f"{parent}." if parent else ""
    return f"{prefix}{first}" if first == last else f"{prefix}{first}–{last}"
