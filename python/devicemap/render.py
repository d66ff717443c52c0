"""Pictures of a plan: an SVG (or an HTML page holding it) with one bar per device, filled by the
layers it holds, its runtime memory and reserve, against its capacity.

    >>> import torch, devicemap
    >>> model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    >>> svg = plan_to_svg(devicemap.plan(model, max_memory={0: "40KiB", "cpu": "1MiB"}))
    >>> svg.count('class="device"')
    2
"""

from __future__ import annotations

from html import escape
from typing import Optional

from .planning import Plan, _human

WIDTH, LABEL, ROW, BAR = 900, 120, 46, 26
LAYER_COLORS = ("#4c78a8", "#72b7b2")  # alternate so neighbouring layers stay distinguishable
RUNTIME_COLOR, RESERVE_COLOR, FREE_COLOR = "#f58518", "#e45756", "#eeeeee"


def plan_to_svg(plan: Plan, title: Optional[str] = None) -> str:
    """An SVG drawing of ``plan``: per device, a bar for its capacity (full width; unbounded disk: its
    usage) filled by its blocks (one rect each, the block name as tooltip), runtime memory and reserve."""
    span = WIDTH - LABEL - 20
    height = 40 + ROW * len(plan.usage) + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<text x="10" y="22" font-size="15" font-weight="bold">{escape(title or "devicemap plan")} '
        f"({escape(plan.strategy)})</text>",
    ]
    for row, usage in enumerate(plan.usage):
        y = 40 + row * ROW
        full = max(usage.capacity if usage.capacity is not None else usage.used, 1)
        outline = span
        out.append(f'<g class="device" data-device="{escape(str(usage.device))}">')
        out.append(f'<text x="10" y="{y + BAR / 2 + 4}">{escape(_device_label(usage.device))}</text>')
        out.append(
            f'<rect class="capacity" x="{LABEL}" y="{y}" width="{outline:.2f}" height="{BAR}" '
            f'fill="{FREE_COLOR}" stroke="#888"/>'
        )
        x = float(LABEL)
        for i, name in enumerate(usage.blocks):
            w = span * _block_bytes(plan, name) / full
            out.append(
                f'<rect class="block" x="{x:.2f}" y="{y}" width="{w:.2f}" height="{BAR}" '
                f'fill="{LAYER_COLORS[i % 2]}"><title>{escape(name)}</title></rect>'
            )
            x += w
        for part, color, label in (
            (usage.runtime, RUNTIME_COLOR, "runtime"),
            (usage.reserve, RESERVE_COLOR, "reserve"),
        ):
            if part:
                w = span * part / full
                out.append(
                    f'<rect class="{label}" x="{x:.2f}" y="{y}" width="{w:.2f}" height="{BAR}" fill="{color}">'
                    f"<title>{label} {_human(part)}</title></rect>"
                )
                x += w
        cap = "unbounded" if usage.capacity is None else _human(usage.capacity)
        out.append(f'<text x="{LABEL}" y="{y + BAR + 13}" fill="#444">{_human(usage.used)} of {cap}</text>')
        out.append("</g>")
    legend_y = 40 + ROW * len(plan.usage) + 10
    for i, (color, label) in enumerate(
        (
            (LAYER_COLORS[0], "layers"),
            (RUNTIME_COLOR, "KV cache / activations"),
            (RESERVE_COLOR, "staging reserve"),
        )
    ):
        lx = LABEL + i * 200
        out.append(f'<rect x="{lx}" y="{legend_y}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{lx + 18}" y="{legend_y + 11}">{label}</text>')
    out.append("</svg>")
    return "\n".join(out)


def plan_to_html(plan: Plan, title: Optional[str] = None) -> str:
    """A standalone HTML page with the SVG and the plan's table."""
    heading = escape(title or "devicemap plan")
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{heading}</title></head>\n<body>\n"
        f"{plan_to_svg(plan, title)}\n<pre>{escape(plan.explain())}</pre>\n</body></html>\n"
    )


def _device_label(device: object) -> str:
    return f"GPU {device}" if isinstance(device, int) else str(device)


def _block_bytes(plan: Plan, name: str) -> int:
    return plan.block_bytes(name) if plan.tree is not None else 0
