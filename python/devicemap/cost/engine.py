"""What the software running a plan costs on top of the hardware: the speed model's fitted efficiencies.

:mod:`devicemap.cost.hardware` holds datasheet peaks and what a good kernel reaches of them (a pinned
``cudaMemcpy``, a STREAM-like read, a large GEMM). How close an *engine* comes to those rates is a property
of its code, not of the machine: accelerate's hooks copy offloaded weights one tensor at a time from pageable
memory, llama.cpp runs routed experts with its own CPU kernels, Hugging Face ``generate`` spends a fixed time
in Python per token. An :class:`Engine` holds those shares, each a multiplier on the rate the hardware
already gives (so a measured host, whose rates are achieved rates, keeps its meaning):

- ``stream_efficiency_pageable`` / ``stream_efficiency_pinned``: the share of ``GPU.host_to_device`` (the
  pinned-copy rate, :data:`~devicemap.cost.hardware.PCIE_EFFICIENCY` of the link) at which weights stored on
  the CPU or disk reach a GPU on every forward pass; ``pinned`` says which applies;
- ``gpu_read_efficiency``: the share of ``GPU.read_rate`` the engine's decode kernels reach;
- ``cpu_dense_efficiency`` / ``cpu_expert_efficiency``: the share of ``Host.read_rate`` at which a
  CPU-executed dense layer / the routed experts of a mixture-of-experts layer read their weights;
- ``hop_seconds``: added to ``Hardware.link_latency`` for every hand-off of hidden states between a GPU and
  the CPU (a synchronisation and a small copy, more than the copy alone);
- ``token_overhead_seconds``: fixed time per forward pass (a decoded token, or a prefill) outside the
  blocks: Python, the sampler, kernel launches. It is the same for every plan of a model, so it changes no
  plan the speed objective picks;
- ``prefill_efficiency``: multiplies the GPU's achievable FLOP/s (``GPU.flop_rate``) in prefill; above 1
  where the engine's kernels beat the GEMM assumption (e.g. fp16-accumulating kernels on GeForce cards,
  whose datasheet tensor rate is the fp32-accumulate one).

The presets' numbers are fitted by ``benches/calibrate.py`` on published measurements
(``benches/calibration/published.json``); each says on which rows.

    >>> Engine.preset("accelerate").pinned
    False
    >>> Engine.preset("llama.cpp").name
    'llama.cpp'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..errors import InvalidOptionError


@dataclass(frozen=True)
class Engine:
    """The software-side efficiencies of the speed model (see the module docstring).

    >>> e = Engine("ideal")
    >>> e.stream_efficiency, e.token_overhead_seconds
    (1.0, 0.0)
    """

    name: str
    source: str = ""
    """Where the numbers come from (which fit, on which measurements)."""
    stream_efficiency_pageable: float = 1.0
    """Share of ``GPU.host_to_device`` a host->device copy of weights in pageable memory reaches."""
    stream_efficiency_pinned: float = 1.0
    """Share of ``GPU.host_to_device`` a copy from pinned memory reaches (1: ``host_to_device`` is that rate)."""
    pinned: bool = False
    """Whether the engine keeps offloaded weights in pinned memory (then ``stream_efficiency_pinned`` applies)."""
    gpu_read_efficiency: float = 1.0
    """Share of ``GPU.read_rate`` the engine's GPU kernels read weights at."""
    cpu_dense_efficiency: float = 1.0
    """Share of ``Host.read_rate`` a CPU-executed dense block reads its weights at."""
    cpu_expert_efficiency: float = 1.0
    """Share of ``Host.read_rate`` CPU-executed routed experts read their weights at."""
    hop_seconds: float = 0.0
    """Seconds added to ``Hardware.link_latency`` per GPU<->CPU hand-off of hidden states."""
    token_overhead_seconds: float = 0.0
    """Fixed seconds per forward pass (each decoded token; a prefill) outside the blocks."""
    prefill_efficiency: float = 1.0
    """Multiplies ``GPU.flop_rate`` in prefill (at most 2: see the module docstring)."""
    quantized_call_seconds: tuple[tuple[str, float], ...] = ()
    """Per quant method (``"bitsandbytes_4bit"``, ...), the fixed seconds one call of a quantized module's
    GPU kernel costs per forward pass on top of the bytes it reads (dequantization, launch); methods not
    listed cost nothing extra."""

    def call_seconds(self, kernel: str | None) -> float:
        """Fixed seconds per call of a module quantized by ``kernel`` (0 when not listed)."""
        return dict(self.quantized_call_seconds).get(kernel, 0.0) if kernel is not None else 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise InvalidOptionError(f"Engine name must be a string, got {self.name!r:.80}")
        if not isinstance(self.pinned, bool):
            raise InvalidOptionError(
                f"Engine {self.name!r}: pinned must be True or False, got {self.pinned!r:.80}"
            )
        calls = self.quantized_call_seconds
        if not isinstance(calls, tuple) or not all(
            isinstance(pair, tuple)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], (int, float))
            and not isinstance(pair[1], bool)
            and math.isfinite(pair[1])
            and pair[1] >= 0
            for pair in calls
        ):
            raise InvalidOptionError(
                f"Engine {self.name!r}: quantized_call_seconds must be (method, seconds >= 0) pairs such as "
                f"(('bitsandbytes_4bit', 1e-4),), got {calls!r:.80}"
            )
        for f in fields(self):
            if f.name in ("name", "source", "pinned", "quantized_call_seconds"):
                continue
            value = getattr(self, f.name)
            upper = 2.0 if f.name == "prefill_efficiency" else None if "seconds" in f.name else 1.0
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if ok and "seconds" in f.name:
                ok = value >= 0
            elif ok:
                ok = 0 < value <= (upper or 1.0)
            if not ok:
                bound = "a non-negative number" if "seconds" in f.name else f"a number in (0, {upper:g}]"
                raise InvalidOptionError(f"Engine {self.name!r}: {f.name} must be {bound}, got {value!r:.80}")

    @property
    def stream_efficiency(self) -> float:
        """The share of ``GPU.host_to_device`` offloaded weights stream at (pinned or pageable)."""
        return self.stream_efficiency_pinned if self.pinned else self.stream_efficiency_pageable

    @classmethod
    def preset(cls, name: str | Engine) -> Engine:
        """An engine from :data:`ENGINE_PRESETS` (case ignored), or ``name`` itself when it is an Engine.

        >>> Engine.preset("vllm")
        Traceback (most recent call last):
            ...
        devicemap.InvalidOptionError: unknown engine 'vllm'; known: accelerate, ideal, llama.cpp (or describe it with devicemap.cost.engine.Engine(...))
        """
        if isinstance(name, Engine):
            return name
        key = name.strip().lower().replace("_", "-") if isinstance(name, str) else ""
        key = {"llamacpp": "llama.cpp", "llama-cpp": "llama.cpp"}.get(key, key)
        if key not in ENGINE_PRESETS:
            shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:79] + "…"
            raise InvalidOptionError(
                f"unknown engine {shown}; known: {', '.join(sorted(ENGINE_PRESETS))} "
                "(or describe it with devicemap.cost.engine.Engine(...))"
            )
        return ENGINE_PRESETS[key]


# Fitted by benches/calibrate.py (least squares on log(predicted / measured), see its docstring) on the fit
# rows of benches/calibration/published.json. Rerun it after adding rows; `--write` prints these lines.
ACCELERATE = Engine(
    name="accelerate",
    source="Hugging Face generate + accelerate hooks (pageable copies): stream_efficiency_pageable and "
    "token_overhead_seconds fitted by benches/calibrate.py on acc-gptj-fp16-1gpu, acc-neox20b-fp16-2gpu, "
    "flexgen-acc-opt30b-t4-b8; the CPU shares and hop_seconds are not fitted (no published accelerate row "
    "runs blocks on the CPU): issue 22's measured shares (dense ~60%, routed experts ~40% of peak DRAM "
    "bandwidth, over the host's 70%) and an assumed 100 us per hop",
    stream_efficiency_pageable=0.33,  # fitted: 0.33 x 12.6 GB/s = 4.2 GB/s on PCIe 3 (T4, GCP)
    stream_efficiency_pinned=1.0,
    pinned=False,
    gpu_read_efficiency=1.0,
    cpu_dense_efficiency=0.86,  # not fitted (see source)
    cpu_expert_efficiency=0.57,  # not fitted (see source)
    hop_seconds=100e-6,  # not fitted (see source)
    token_overhead_seconds=0.0235,  # fitted: HF generate on a Titan RTX (2022)
    prefill_efficiency=1.0,  # not fitted: the rows' prefills are too small (or streamed) to separate it
    # fitted by benches/calibrate_quantized.py on optimum-quanto PR #62 (A10G, transformers generate, 2023):
    # a call of a bitsandbytes Linear at batch 1 costs this on top of its bytes
    quantized_call_seconds=(("bitsandbytes_8bit", 627e-6), ("bitsandbytes_4bit", 109e-6)),
)
"""The default: what ``devicemap.plan(...)`` plans and what ``dispatch`` runs (accelerate's hooks)."""

LLAMA_CPP = Engine(
    name="llama.cpp",
    source="llama.cpp (its own CPU/CUDA/Vulkan kernels, -ngl / --n-cpu-moe / -ot), quantized weights at their "
    "stored width; fitted by benches/calibrate.py on lcpp-llama3.2-1b-2080, lcpp-qwen2.5-7b-2080, "
    "lcpp-gemma2-9b-ngl36-2080, lcpp-qwen3-30b-a3b-cpumoe36-2080, lcpp-llama3.2-3b-pp512-4090 (Q4_K_M)",
    stream_efficiency_pageable=1.0,  # not fitted: llama.cpp streams no weights in decode
    stream_efficiency_pinned=1.0,
    pinned=True,
    gpu_read_efficiency=1.0,  # not freed: the GPU-only rows land within 5% at the GPU's 80%
    cpu_dense_efficiency=0.72,  # fitted: 0.72 x 70% = 50% of peak DRAM bandwidth (quad-channel DDR4)
    cpu_expert_efficiency=0.57,  # fitted: 0.57 x 70% = 40% of peak
    hop_seconds=31e-6,  # fitted
    token_overhead_seconds=0.00115,  # fitted
    prefill_efficiency=1.4,  # fitted on one Vulkan pp512 row (RTX 4090): above the fp32-accumulate GEMM rate
)
"""For ``--to llama.cpp`` exports: weights in the stored (quantized) width, no per-token streaming."""

IDEAL = Engine(
    name="ideal",
    source="no software loss: every rate is what the hardware description gives (the model before calibration)",
)
"""The speed model as it was before calibration: formulas only, useful in tests and comparisons."""

ENGINE_PRESETS: dict[str, Engine] = {e.name: e for e in (ACCELERATE, LLAMA_CPP, IDEAL)}
