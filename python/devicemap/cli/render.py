"""Pictures of a plan: an SVG (or an HTML page holding it) with one bar per device.

Every bar is drawn on one shared byte scale, so a layer has the same width on every row and a small
GPU looks small. Each bar is filled by the layers it holds (labelled by contiguous runs), its runtime
memory and staging reserve; the rest of its capacity is drawn as free. An unbounded disk has no
capacity to draw: its bar ends at what it holds, with a dashed open end and the word "unbounded".

    >>> import torch, devicemap
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    >>> svg = plan_to_svg(devicemap.plan(model, max_memory={0: "40KiB", "cpu": "1MiB"}))
    >>> svg.count('class="device"')
    2
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from ..formatting import format_bytes, span_label
from ..plans import DeviceUsage, Plan

WIDTH, LABEL, RIGHT = 960, 150, 20
SPAN = WIDTH - LABEL - RIGHT  # pixels of the largest bar
OPEN_END = 120  # pixels after an unbounded bar for its dashed open end and the word "unbounded"
TOP, ROW, BAR = 44, 62, 28  # a row: the bar, then a line for labels that do not fit inside it
CHAR = 6.6  # approximate pixels per character at font-size 11, to decide whether a label fits
LAYER_COLORS = ("#4c78a8", "#6f9bd1")  # alternate so neighbouring layers stay distinguishable
RUNTIME_COLOR, RESERVE_COLOR, FREE_COLOR = "#f58518", "#e45756", "#eeeeee"
LEGEND = (
    ("weights", LAYER_COLORS[0], "weights (layers)"),
    ("runtime", RUNTIME_COLOR, "runtime memory (KV cache, activations)"),
    ("reserve", RESERVE_COLOR, "staging reserve"),
    ("free", FREE_COLOR, "free"),
)


@dataclass(frozen=True)
class Run:
    """Consecutive layers (in model order) that sit on one device."""

    blocks: tuple[str, ...]
    x: float
    width: float

    @property
    def label(self) -> str:
        return span_label(self.blocks)


def plan_to_svg(plan: Plan, title: str | None = None) -> str:
    """An SVG drawing of ``plan``: one bar per device on one shared byte scale, filled by its blocks
    (each with its name, bytes and why it is there as tooltip and ``data-`` attributes), runtime memory,
    reserve and free capacity; block-range labels on the bars; a legend of the parts present.

    >>> import torch, devicemap
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    >>> svg = plan_to_svg(devicemap.plan(model, max_memory={0: "40KiB", "cpu": "1MiB"}))
    >>> 'class="legend-item" data-part="free"' in svg
    True
    """
    scale = _scale(plan.usage)
    order = {name: i for i, name in enumerate(plan.assignments)}
    reasons = {o.name: o.reason for o in plan.offloaded}
    legend_y = TOP + ROW * len(plan.usage)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{legend_y + 40}" '
        f'font-family="sans-serif" font-size="12">',
        f'<text x="10" y="24" font-size="15" font-weight="bold">{escape(title or "devicemap plan")} '
        f"({escape(plan.strategy)})</text>",
    ]
    for row, usage in enumerate(plan.usage):
        out.extend(_device_row(plan, usage, TOP + row * ROW, scale, order, reasons))
    out.extend(_legend(plan, legend_y))
    out.append("</svg>")
    return "\n".join(out)


def plan_to_html(plan: Plan, title: str | None = None) -> str:
    """A standalone HTML page with the SVG, a hover box naming the block under the pointer (its name,
    bytes and why it is there), and the plan's table.

    >>> import torch, devicemap
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    >>> "fits on GPU 0" in plan_to_html(devicemap.plan(model, max_memory={0: "40KiB", "cpu": "1MiB"}))
    True
    """
    heading = escape(title or "devicemap plan")
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{heading}</title>\n"
        f"<style>{_HOVER_STYLE}</style></head>\n<body>\n"
        f"{plan_to_svg(plan, title)}\n<div id='hover'></div>\n"
        f"<p>Hover a block to see its name, size and why it is there.</p>\n"
        f"<pre>{escape(plan.explain())}</pre>\n<script>{_HOVER_SCRIPT}</script>\n</body></html>\n"
    )


def _scale(usage: list[DeviceUsage]) -> float:
    """Pixels per byte, shared by every bar: the widest bar fills the span, and an unbounded bar still
    leaves room for its open end."""
    bounded = max([_extent(u) for u in usage if u.capacity is not None] + [1])
    unbounded = max([_extent(u) for u in usage if u.capacity is None] + [1])
    return min(SPAN / bounded, (SPAN - OPEN_END) / unbounded)


def _extent(usage: DeviceUsage) -> int:
    """Bytes the bar spans: the capacity, or what is used when that is more (or nothing bounds it)."""
    return usage.used if usage.capacity is None else max(usage.capacity, usage.used)


def _device_row(
    plan: Plan, usage: DeviceUsage, y: int, scale: float, order: dict[str, int], reasons: dict[str, str]
) -> list[str]:
    device = str(usage.device)
    unbounded = usage.capacity is None
    held = (
        f"{format_bytes(usage.used)}, unbounded"
        if unbounded
        else f"{format_bytes(usage.used)} of {format_bytes(usage.capacity or 0)}"
    )
    out = [
        f'<g class="device" data-device="{escape(device)}" data-unbounded="{str(unbounded).lower()}">',
        f'<text x="10" y="{y + 12}" font-weight="bold">{escape(_device_label(usage.device))}</text>',
        f'<text x="10" y="{y + 27}" font-size="11" fill="#444">{held}</text>',
    ]
    extent = _extent(usage) * scale
    if unbounded:
        # No capacity: draw what it holds, then a dashed open end rather than a closed, "full" box.
        end = LABEL + extent
        out.append(
            f'<rect class="capacity" x="{LABEL}" y="{y}" width="{extent:.2f}" height="{BAR}" fill="none"/>'
        )
        out.append(
            f'<path class="unbounded-end" d="M{end:.2f},{y} h40 M{end:.2f},{y + BAR} h40" '
            f'stroke="#888" stroke-dasharray="4,3" fill="none"/>'
        )
        out.append(
            f'<text class="unbounded-mark" x="{end + 46:.2f}" y="{y + BAR / 2 + 4}" fill="#666" '
            f'font-style="italic">unbounded</text>'
        )
    else:
        out.append(
            f'<rect class="capacity" x="{LABEL}" y="{y}" width="{extent:.2f}" height="{BAR}" '
            f'fill="{FREE_COLOR}" stroke="#888"/>'
        )
    x = float(LABEL)
    runs: list[Run] = []
    for i, name in enumerate(usage.blocks):
        size = plan.block_bytes(name) if plan.tree is not None else 0
        w = size * scale
        reason = reasons.get(name) or _resident_reason(usage.device)
        hover = f"{name} — {format_bytes(size)} — {reason}"
        out.append(
            f'<rect class="block" x="{x:.2f}" y="{y}" width="{w:.2f}" height="{BAR}" '
            f'fill="{LAYER_COLORS[i % 2]}" data-name="{escape(name)}" data-bytes="{size}" '
            f'data-reason="{escape(reason)}"><title>{escape(hover)}</title></rect>'
        )
        follows = runs and order.get(name, -2) == order.get(runs[-1].blocks[-1], -9) + 1
        if follows:
            last = runs[-1]
            runs[-1] = Run(last.blocks + (name,), last.x, last.width + w)
        else:
            runs.append(Run((name,), x, w))
        x += w
    for part, color, label in (
        (usage.runtime, RUNTIME_COLOR, "runtime"),
        (usage.reserve, RESERVE_COLOR, "reserve"),
    ):
        if part:
            w = part * scale
            out.append(
                f'<rect class="{label}" x="{x:.2f}" y="{y}" width="{w:.2f}" height="{BAR}" fill="{color}">'
                f"<title>{label} {format_bytes(part)}</title></rect>"
            )
            x += w
    out.extend(_run_labels(runs, y))
    out.append("</g>")
    return out


def _run_labels(runs: list[Run], y: int) -> list[str]:
    """A label per run: inside the bar when it fits, else on the line under the bar (never overlapping
    the previous label there)."""
    out = []
    below_free_from = 0.0
    for run in runs:
        text = escape(run.label)
        needed = len(run.label) * CHAR
        if needed + 8 <= run.width:
            out.append(
                f'<text class="run-label" x="{run.x + run.width / 2:.2f}" y="{y + BAR / 2 + 4}" '
                f'text-anchor="middle" fill="white" font-size="11">{text}</text>'
            )
            continue
        x = min(max(run.x, below_free_from), WIDTH - needed - 4)  # stay inside the picture
        out.append(
            f'<path d="M{run.x + run.width / 2:.2f},{y + BAR} V{y + BAR + 5}" stroke="#444"/>'
            f'<text class="run-label" x="{x:.2f}" y="{y + BAR + 16}" fill="#222" font-size="11">{text}</text>'
        )
        below_free_from = x + needed + 12
    return out


def _legend(plan: Plan, y: int) -> list[str]:
    present = {
        "weights": any(u.blocks or u.weights for u in plan.usage),
        "runtime": any(u.runtime for u in plan.usage),
        "reserve": any(u.reserve for u in plan.usage),
        "free": any(u.capacity is not None and u.capacity > u.used for u in plan.usage),
    }
    out, x = [], float(LABEL)
    for part, color, label in LEGEND:
        if not present[part]:
            continue
        out.append(
            f'<g class="legend-item" data-part="{part}"><rect x="{x:.0f}" y="{y}" width="12" height="12" '
            f'fill="{color}" stroke="#888"/><text x="{x + 18:.0f}" y="{y + 11}">{label}</text></g>'
        )
        x += 18 + len(label) * CHAR * 1.1 + 24
    return out


def _device_label(device: object) -> str:
    return f"GPU {device}" if isinstance(device, int) else str(device)


def _resident_reason(device: object) -> str:
    return f"fits on GPU {device}" if isinstance(device, int) else f"placed on {device}"


_HOVER_STYLE = (
    "body{font-family:sans-serif} rect.block:hover{stroke:#000;stroke-width:1.5} "
    "#hover{position:fixed;display:none;background:#fff;border:1px solid #888;padding:4px 8px;"
    "font-size:12px;pointer-events:none}"
)
# The SVG <title> already gives a native tooltip; this box shows the same without the browser's delay.
_HOVER_SCRIPT = """
const box = document.getElementById('hover');
document.querySelectorAll('rect.block').forEach(r => {
  r.addEventListener('mousemove', e => {
    box.textContent = r.querySelector('title').textContent;  // "name — bytes — why it is there"
    box.style.left = (e.clientX + 12) + 'px'; box.style.top = (e.clientY + 12) + 'px';
    box.style.display = 'block';
  });
  r.addEventListener('mouseleave', () => { box.style.display = 'none'; });
});
"""
