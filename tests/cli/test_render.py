"""The plan pictures, read back as XML: one shared byte scale, the unbounded disk marked, block-range
labels, a legend of what is present, and hover text naming each block, its bytes and why it is there."""

import xml.etree.ElementTree as ET

import pytest
import torch

import devicemap
from devicemap.cli.render import plan_to_html, plan_to_svg

SVG = "{http://www.w3.org/2000/svg}"
LAYER_BYTES = 64 * 64 * 4 + 64 * 4  # one Linear(64, 64) in float32


def linears(n: int) -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(n)])


class TiedHead(torch.nn.Module):
    """embed, six layers, and a head sharing the embedding's weight (so it must sit with the embed)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 64)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(6))
        self.head = torch.nn.Linear(64, 64, bias=False)
        self.head.weight = self.embed.weight


def devices(svg: str) -> dict[str, ET.Element]:
    root = ET.fromstring(svg)
    return {g.get("data-device"): g for g in root.iter(f"{SVG}g") if g.get("class") == "device"}


def rects(group: ET.Element, cls: str) -> list[ET.Element]:
    return [r for r in group.iter(f"{SVG}rect") if r.get("class") == cls]


def run_labels(group: ET.Element) -> list[str]:
    return [t.text or "" for t in group.iter(f"{SVG}text") if t.get("class") == "run-label"]


@pytest.fixture(scope="module")
def offloading_plan():
    # Two GPUs of different sizes, a small CPU and disk: layers land on every device.
    memory = {0: "40KiB", 1: "60KiB", "cpu": "20KiB", "disk": None}
    return devicemap.plan(linears(8), max_memory=memory, strategy="sequential")


def test_one_bar_per_device_on_one_byte_scale(offloading_plan):
    bars = devices(plan_to_svg(offloading_plan))
    assert list(bars) == ["0", "1", "cpu", "disk"]
    widths = {}
    for device, group in bars.items():
        for block in rects(group, "block"):
            widths[(device, block.get("data-name"))] = float(block.get("width"))
    assert {device for device, _ in widths} == {"0", "1", "cpu", "disk"}
    # Every layer has the same size, so the same width on every row, whatever the row's capacity.
    assert max(widths.values()) - min(widths.values()) < 0.02
    scale = max(widths.values()) / LAYER_BYTES
    for usage in offloading_plan.usage:
        if usage.capacity is not None:
            capacity = float(rects(bars[str(usage.device)], "capacity")[0].get("width"))
            assert capacity == pytest.approx(usage.capacity * scale, abs=0.02)


def test_unbounded_disk_is_drawn_to_its_used_size_and_marked(offloading_plan):
    svg = plan_to_svg(offloading_plan)
    disk, gpu = devices(svg)["disk"], devices(svg)["0"]
    layer = float(rects(gpu, "block")[0].get("width")) / LAYER_BYTES
    used = next(u.used for u in offloading_plan.usage if u.device == "disk")
    assert float(rects(disk, "capacity")[0].get("width")) == pytest.approx(used * layer, abs=0.02)
    assert disk.get("data-unbounded") == "true" and gpu.get("data-unbounded") == "false"
    marks = [t.text for t in disk.iter(f"{SVG}text") if t.get("class") == "unbounded-mark"]
    assert marks == ["unbounded"]
    assert any(
        p.get("class") == "unbounded-end" and p.get("stroke-dasharray") for p in disk.iter(f"{SVG}path")
    )


def legend(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    return [g.get("data-part") for g in root.iter(f"{SVG}g") if g.get("class") == "legend-item"]


def test_legend_lists_only_the_parts_present(offloading_plan):
    # Offloading stages layers through a GPU reserve; no workload means no runtime memory.
    assert legend(plan_to_svg(offloading_plan)) == ["weights", "reserve", "free"]
    everything_fits = devicemap.plan(linears(2), max_memory={0: "1MiB"})
    assert legend(plan_to_svg(everything_fits)) == ["weights", "free"]


def test_block_range_labels_name_each_run(offloading_plan):
    bars = devices(plan_to_svg(offloading_plan))
    for usage in offloading_plan.usage:
        labels = run_labels(bars[str(usage.device)])
        first, last = usage.blocks[0], usage.blocks[-1]
        if len(usage.blocks) == 1:
            assert labels == [first]
        else:  # "3–5 (3)": consecutive layers of one parent share its prefix
            assert labels == [f"{first}–{last} ({len(usage.blocks)})"]


def test_a_tied_head_splits_the_run_instead_of_spanning_the_model():
    plan = devicemap.plan(TiedHead(), max_memory={0: "70KiB", 1: "60KiB"}, strategy="sequential")
    gpu0 = plan.usage[0]
    assert gpu0.blocks[0] == "embed" and gpu0.blocks[-1] == "head"  # the head is tied to the embedding
    labels = run_labels(devices(plan_to_svg(plan))["0"])
    last_layer = gpu0.blocks[-2].rpartition(".")[2]  # the layers between are named as one range
    assert labels == [f"embed, layers.0–{last_layer} ({len(gpu0.blocks) - 1})", "head"]


def test_html_hover_names_each_block_its_bytes_and_why_it_is_there(offloading_plan):
    page = plan_to_html(offloading_plan)
    svg = page[page.index("<svg") : page.index("</svg>") + len("</svg>")]
    reasons = {o.name: o.reason for o in offloading_plan.offloaded}
    assert reasons  # the fixture offloads
    seen = 0
    for device, group in devices(svg).items():
        for block in rects(group, "block"):
            name = block.get("data-name")
            expected = reasons.get(name, f"fits on GPU {device}")
            hover = block.find(f"{SVG}title").text
            assert hover == f"{name} — 16.25 KiB — {expected}"
            assert block.get("data-reason") == expected
            assert block.get("data-bytes") == str(offloading_plan.block_bytes(name))
            seen += 1
    assert seen == 8
    assert "mousemove" in page  # the hover box


def test_the_plan_table_names_each_run_a_device_holds_not_a_span_from_first_to_last():
    # GPU 0 holds the embedding and the head (tied) and the first layers; GPU 1 the rest. A row reading
    # "embed .. head" would claim the whole model.
    plan = devicemap.plan(TiedHead(), max_memory={0: "70KiB", 1: "60KiB"}, strategy="sequential")
    row = next(line for line in plan.table().splitlines() if line.startswith("0 "))
    assert "embed, layers.0–" in row and row.rstrip().endswith(
        ", head (" + str(len(plan.usage[0].blocks)) + ")"
    )
    assert " .. " not in plan.table()
