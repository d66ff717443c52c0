"""What the speed model knows about a machine: GPUs and the host, as data, plus a measurement of this host.

Every preset number is a vendor datasheet peak (named beside it); the speed model multiplies each peak by
an *achievable fraction* (``memory_efficiency``, ``compute_efficiency``) kept beside it, so both the
datasheet value and the assumption are visible. A measured host has fractions of 1.0: what was measured is
what a kernel achieves here.

    >>> hw = Hardware.preset("rtx-4090", gpus=2, host="desktop-ddr5")
    >>> hw.gpus[1].name, hw.gpus[1].memory_bandwidth / 1e9, hw.host.name
    ('rtx-4090', 1008.0, 'desktop-ddr5')
    >>> round(hw.gpus[0].host_to_device / 1e9, 1)  # PCIe 4.0 x16 at 80% of the link rate
    25.2

Units: bytes per second, FLOP per second, seconds.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..errors import InvalidOptionError
from .engine import Engine

_GB = 1e9
_TFLOPS = 1e12

# PCIe data rate per lane and direction, bytes/s, after line coding (gen 3-5 use 128b/130b): 8, 16, 32 GT/s.
# Source: PCI-SIG PCI Express Base Specification 3.0 / 4.0 / 5.0 (transfer rates and encoding).
_PCIE_LANE = {3: 8e9 * 128 / 130 / 8, 4: 16e9 * 128 / 130 / 8, 5: 32e9 * 128 / 130 / 8}
PCIE_EFFICIENCY = 0.8
"""Share of the PCIe link rate a host-to-device copy reaches (packet headers and flow control take the
rest): pinned copies measure ~25 GB/s on PCIe 4.0 x16 and ~50 GB/s on 5.0 x16 (CUDA ``bandwidthTest``)."""


def pcie_bandwidth(gen: int, lanes: int = 16, efficiency: float = PCIE_EFFICIENCY) -> float:
    """Host-to-device bytes/s of a PCIe link: lane rate x lanes x efficiency.

    >>> round(pcie_bandwidth(4, 16, efficiency=1.0) / 1e9, 2)
    31.51
    """
    if gen not in _PCIE_LANE:
        raise InvalidOptionError(f"PCIe generation must be one of {sorted(_PCIE_LANE)}, got {gen!r}")
    return _PCIE_LANE[gen] * lanes * efficiency


@dataclass(frozen=True)
class GPU:
    """One GPU: datasheet peaks and the fractions of them a real kernel reaches.

    >>> GPU.preset("a100-80gb-sxm").flops / 1e12
    312.0
    """

    name: str
    memory_bytes: int
    """Memory size (bytes)."""
    memory_bandwidth: float
    """Peak device-memory bandwidth (bytes/s)."""
    flops: float
    """Peak dense bf16/fp16 tensor FLOP/s with fp32 accumulation, no sparsity."""
    flops_fp32: float
    """Peak dense fp32 FLOP/s (non-tensor), for models run in float32."""
    host_to_device: float
    """Host-to-device copy bandwidth (bytes/s), already practical (see :data:`PCIE_EFFICIENCY`)."""
    source: str = ""
    """Where the numbers come from."""
    memory_efficiency: float = 0.8
    """Achievable share of ``memory_bandwidth``: decode kernels (GEMV) reach 70-90% of HBM/GDDR peak."""
    compute_efficiency: float = 0.6
    """Achievable share of ``flops``: large bf16 GEMMs reach 60-80%, a decoder layer's smaller ones less."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise InvalidOptionError(f"GPU name must be a string, got {_short(self.name)}")
        if (
            not isinstance(self.memory_bytes, int)
            or isinstance(self.memory_bytes, bool)
            or self.memory_bytes < 0
        ):
            raise InvalidOptionError(
                f"GPU {self.name!r}: memory_bytes must be a non-negative int, got {_short(self.memory_bytes)}"
            )
        _check_positive(
            f"GPU {self.name!r}",
            memory_bandwidth=self.memory_bandwidth,
            flops=self.flops,
            flops_fp32=self.flops_fp32,
            host_to_device=self.host_to_device,
        )
        _check_fraction(f"GPU {self.name!r}", self.memory_efficiency, self.compute_efficiency)

    @classmethod
    def preset(cls, name: str) -> GPU:
        """A GPU from :data:`GPU_PRESETS` (case and ``_``/`` `` vs ``-`` ignored)."""
        return GPU_PRESETS[_lookup(name, GPU_PRESETS, "GPU")]

    def flop_rate(self, bits: int) -> float:
        """Achievable FLOP/s for weights/activations of ``bits`` (32: fp32 units; else tensor cores)."""
        peak = self.flops_fp32 if bits >= 32 else self.flops
        return peak * self.compute_efficiency

    def read_rate(self, bits: int = 16) -> float:
        """Achievable device-memory read bytes/s (the same for every width)."""
        return self.memory_bandwidth * self.memory_efficiency


@dataclass(frozen=True)
class Host:
    """The CPU side: RAM bandwidth, CPU FLOP/s, and the disk offloaded weights are read from.

    >>> Host.preset("desktop-ddr4").memory_bandwidth / 1e9
    51.2
    """

    name: str
    memory_bandwidth: float
    """Peak (preset) or measured (``measured=True``) RAM read bandwidth, bytes/s."""
    flops_fp32: float
    """CPU FLOP/s of a float32 matrix multiply."""
    flops_bf16: float
    """CPU FLOP/s of a bfloat16/float16 matrix multiply (CPUs without bf16 units convert: often slower)."""
    disk_read: float
    """Sequential read bytes/s of the disk holding the offload folder."""
    source: str = ""
    memory_efficiency: float = 0.7
    """Achievable share of ``memory_bandwidth``: STREAM-like reads reach 70-80% of the DDR peak."""
    compute_efficiency: float = 0.5
    """Achievable share of the FLOP/s: oneDNN/MKL GEMMs reach 50-80% of the vector-unit peak."""
    memory_bandwidth_bf16: float | None = None
    """Bytes/s a 16-bit matrix-vector product reads weights at, when lower than ``memory_bandwidth``
    (CPUs converting bf16 in software); ``None``: ``memory_bandwidth``."""
    measured: bool = False
    details: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    """How each number was measured (``measure_host``), e.g. whether the disk read bypassed the page cache."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise InvalidOptionError(f"host name must be a string, got {_short(self.name)}")
        _check_positive(
            f"host {self.name!r}",
            memory_bandwidth=self.memory_bandwidth,
            flops_fp32=self.flops_fp32,
            flops_bf16=self.flops_bf16,
            disk_read=self.disk_read,
        )
        if self.memory_bandwidth_bf16 is not None:
            _check_positive(f"host {self.name!r}", memory_bandwidth_bf16=self.memory_bandwidth_bf16)
        _check_fraction(f"host {self.name!r}", self.memory_efficiency, self.compute_efficiency)

    @classmethod
    def preset(cls, name: str) -> Host:
        """A host from :data:`HOST_PRESETS`."""
        return HOST_PRESETS[_lookup(name, HOST_PRESETS, "host")]

    @classmethod
    def measure(
        cls,
        quick: bool = False,
        directory: str | os.PathLike[str] | None = None,
        name: str = "measured",
        timer: Timer | None = None,
    ) -> Host:
        """Measure this machine; see :func:`measure_host`."""
        return measure_host(quick=quick, directory=directory, name=name, timer=timer or time.perf_counter)

    def flop_rate(self, bits: int) -> float:
        """Achievable CPU FLOP/s for ``bits``-wide floating weights (32: fp32; 16: bf16/fp16)."""
        return (self.flops_fp32 if bits >= 32 else self.flops_bf16) * self.compute_efficiency

    def read_rate(self, bits: int = 32) -> float:
        """Achievable bytes/s at which a CPU-executed layer with ``bits``-wide weights reads them."""
        peak = self.memory_bandwidth
        if bits < 32 and self.memory_bandwidth_bf16 is not None:
            peak = min(peak, self.memory_bandwidth_bf16)
        return peak * self.memory_efficiency


@dataclass(frozen=True)
class Hardware:
    """The machine a plan runs on: GPU ``i`` of a plan is ``gpus[i]``; CPU and disk are ``host``.

    >>> hw = Hardware.preset("h100-sxm", gpus=8, host="server-ddr5-12ch")
    >>> len(hw.gpus), hw.gpus[0].memory_bandwidth / 1e12
    (8, 3.35)
    >>> Hardware.preset("h200")
    Traceback (most recent call last):
        ...
    devicemap.InvalidOptionError: unknown GPU 'h200'; known: a100-40gb, a100-80gb-pcie, a100-80gb-sxm, a10g, h100-pcie, h100-sxm, l4, l40s, rtx-2080, rtx-3090, rtx-4090, t4, titan-rtx (or describe it with devicemap.GPU(...))
    """

    gpus: tuple[GPU, ...]
    host: Host
    link_latency: float = 10e-6
    """Fixed cost of one activation copy between devices (s): a synchronous ``cudaMemcpy`` of a small
    pageable tensor costs ~10 us; the engine adds its own per hand-off (``engine.hop_seconds``)."""
    engine: Engine = field(default_factory=lambda: Engine.preset("accelerate"))
    """The software running the plan and its fitted efficiencies (:mod:`devicemap.cost.engine`); default:
    accelerate's hooks under Hugging Face ``generate``. ``Hardware.preset(..., engine="llama.cpp")``."""

    def __post_init__(self) -> None:
        if not isinstance(self.host, Host):
            raise InvalidOptionError(f"Hardware.host must be a devicemap.Host, got {_short(self.host)}")
        if not isinstance(self.gpus, Sequence) or isinstance(self.gpus, str) or len(self.gpus) > MAX_GPUS:
            raise InvalidOptionError(
                f"Hardware.gpus must be a tuple of at most {MAX_GPUS} devicemap.GPU objects (Hardware.preset"
                f"('rtx-4090', gpus=2) builds one), got {_short(self.gpus)}"
            )
        gpus = tuple(self.gpus)
        if not all(isinstance(g, GPU) for g in gpus):
            raise InvalidOptionError(f"Hardware.gpus must be devicemap.GPU objects, got {_short(self.gpus)}")
        object.__setattr__(self, "gpus", gpus)
        _number("Hardware", "link_latency (seconds)", self.link_latency, positive=False)
        if not isinstance(self.engine, Engine):
            raise InvalidOptionError(
                f"Hardware.engine must be a devicemap.cost.engine.Engine (Engine.preset('llama.cpp') builds "
                f"one), got {_short(self.engine)}"
            )

    @classmethod
    def preset(
        cls,
        gpu: str | GPU | Sequence[str | GPU] | None,
        gpus: int = 1,
        host: str | Host = "desktop-ddr5",
        engine: str | Engine = "accelerate",
    ) -> Hardware:
        """``gpus`` copies of a preset GPU (or a list of GPUs, one per index) on a preset or given host, run
        by a preset or given engine (:mod:`devicemap.cost.engine`).

        >>> [g.name for g in Hardware.preset(["rtx-4090", "rtx-3090"]).gpus]
        ['rtx-4090', 'rtx-3090']
        >>> Hardware.preset(None, host="desktop-ddr4").gpus
        ()
        >>> Hardware.preset("rtx-4090", engine="llama.cpp").engine.name
        'llama.cpp'
        """
        count = _check_count(gpus)
        return cls(
            gpus=_gpu_list(gpu, count),
            host=host if isinstance(host, Host) else Host.preset(host),
            engine=Engine.preset(engine),
        )

    @classmethod
    def measure_host(
        cls,
        gpu: str | GPU | Sequence[str | GPU] | None = None,
        gpus: int = 1,
        *,
        quick: bool = False,
        directory: str | os.PathLike[str] | None = None,
    ) -> Hardware:
        """This machine's host measured (:func:`measure_host`), with preset GPUs (none by default).

        >>> hw = Hardware.measure_host(quick=True)  # doctest: +SKIP
        >>> hw.host.memory_bandwidth  # doctest: +SKIP
        11873418240.0
        """
        count = _check_count(gpus)
        return cls(gpus=_gpu_list(gpu, count), host=measure_host(quick=quick, directory=directory))

    def gpu(self, index: int) -> GPU:
        """GPU ``index`` of a plan, or a clear error when the hardware describes fewer GPUs."""
        if 0 <= index < len(self.gpus):
            return self.gpus[index]
        raise InvalidOptionError(
            f"the plan uses GPU {index} but the hardware describes {len(self.gpus)} GPU(s); "
            f"describe every GPU, e.g. Hardware.preset('rtx-4090', gpus={index + 1})"
        )

    def describe(self) -> str:
        """One line per device: the numbers the speed model uses.

        >>> print(Hardware.preset("t4", host="desktop-ddr4").describe())  # doctest: +NORMALIZE_WHITESPACE
        GPU 0  t4            mem 320 GB/s x0.8   bf16 65.0 TFLOP/s x0.6   fp32 8.1 TFLOP/s   H2D 12.6 GB/s
        host   desktop-ddr4  mem 51.2 GB/s x0.7  bf16 1.0 TFLOP/s x0.5   fp32 1.0 TFLOP/s  disk 7.0 GB/s
        engine accelerate  stream x0.33 (pageable)  GPU read x1  CPU dense x0.86, experts x0.57  hop 100 us
        overhead 23.50 ms/pass
               per quantized module call: bitsandbytes_8bit 627 us, bitsandbytes_4bit 109 us
        """
        rows = []
        for i, g in enumerate(self.gpus):
            rows.append(
                [
                    f"GPU {i}",
                    g.name,
                    f"mem {_num(g.memory_bandwidth / _GB)} GB/s x{g.memory_efficiency:g}",
                    f"bf16 {_flops(g.flops)} x{g.compute_efficiency:g}",
                    f"fp32 {_flops(g.flops_fp32)}",
                    f"H2D {_num(g.host_to_device / _GB)} GB/s",
                ]
            )
        h = self.host
        rows.append(
            [
                "host",
                h.name,
                f"mem {_num(h.memory_bandwidth / _GB)} GB/s x{h.memory_efficiency:g}"
                + (
                    ""
                    if h.memory_bandwidth_bf16 is None
                    else f" (bf16 {_num(h.memory_bandwidth_bf16 / _GB)})"
                ),
                f"bf16 {_flops(h.flops_bf16)} x{h.compute_efficiency:g}",
                f"fp32 {_flops(h.flops_fp32)}",
                f"disk {_num(h.disk_read / _GB)} GB/s",
            ]
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        e = self.engine
        lines.append(
            f"engine {e.name}  stream x{e.stream_efficiency:g} "
            f"({'pinned' if e.pinned else 'pageable'})  GPU read x{e.gpu_read_efficiency:g}  "
            f"CPU dense x{e.cpu_dense_efficiency:g}, experts x{e.cpu_expert_efficiency:g}  "
            f"hop {e.hop_seconds * 1e6:.0f} us  overhead {e.token_overhead_seconds * 1e3:.2f} ms/pass"
        )
        if e.quantized_call_seconds:
            calls = ", ".join(
                f"{method} {seconds * 1e6:.0f} us" for method, seconds in e.quantized_call_seconds
            )
            lines.append(f"       per quantized module call: {calls}")
        return "\n".join(lines)


def _flops(value: float) -> str:
    return f"{value / _TFLOPS:.1f} TFLOP/s" if value >= 1e12 else f"{value / 1e9:.0f} GFLOP/s"


def _num(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


MAX_GPUS = 4096
"""The most GPUs a Hardware describes (a plan's device list is far shorter): a bound on what a count allocates."""


def _check_count(gpus: object) -> int:
    if not isinstance(gpus, int) or isinstance(gpus, bool) or not 0 <= gpus <= MAX_GPUS:
        raise InvalidOptionError(f"gpus must be an int from 0 to {MAX_GPUS}, got {_short(gpus)}")
    return gpus


def _gpu_list(gpu: object, count: int) -> tuple[GPU, ...]:
    if gpu is None:
        return ()
    if isinstance(gpu, (str, GPU)):
        one = gpu if isinstance(gpu, GPU) else GPU.preset(gpu)
        return (one,) * count
    if not isinstance(gpu, Sequence):
        raise InvalidOptionError(
            f"gpu must be a preset name such as 'rtx-4090', a devicemap.GPU, or a list of them; got {_short(gpu)}"
        )
    if len(gpu) > MAX_GPUS:
        raise InvalidOptionError(f"at most {MAX_GPUS} GPUs can be described, got {len(gpu)}")
    return tuple(g if isinstance(g, GPU) else GPU.preset(g) for g in gpu)


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages quote inputs, never all of a huge one."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _number(what: str, key: str, value: object, *, positive: bool = True) -> float:
    """``value`` as a finite float (> 0, or >= 0 when not ``positive``), or InvalidOptionError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    number = math.nan
    if ok:
        try:
            number = float(value)  # type: ignore[arg-type]
        except OverflowError:  # an int beyond a float's range
            ok = False
    if not ok or not math.isfinite(number) or not (number > 0 if positive else number >= 0):
        bound = "a positive" if positive else "a non-negative"
        raise InvalidOptionError(f"{what}: {key} must be {bound} finite number, got {_short(value)}")
    return number


def _check_positive(what: str, **values: object) -> None:
    for key, value in values.items():
        _number(what, key, value)


def _check_fraction(what: str, *values: object) -> None:
    for value in values:
        if _number(what, "efficiencies", value) > 1:
            raise InvalidOptionError(f"{what}: efficiencies must be in (0, 1], got {_short(value)}")


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def _lookup(name: object, table: Mapping[str, object], kind: str) -> str:
    key = _normalize(name) if isinstance(name, str) else ""
    if key not in table:
        known = ", ".join(sorted(table))
        hint = "devicemap.GPU(...)" if kind == "GPU" else "devicemap.Host(...) or Hardware.measure_host()"
        raise InvalidOptionError(
            f"unknown {kind} {_short(name)}; known: {known} (or describe it with {hint})"
        )
    return key


def _gpu(
    name: str,
    gib: int,
    bandwidth_gbs: float,
    tflops: float,
    tflops_fp32: float,
    pcie_gen: int,
    source: str,
) -> GPU:
    return GPU(
        name=name,
        memory_bytes=gib * 2**30,
        memory_bandwidth=bandwidth_gbs * _GB,
        flops=tflops * _TFLOPS,
        flops_fp32=tflops_fp32 * _TFLOPS,
        host_to_device=pcie_bandwidth(pcie_gen, 16),
        source=f"{source}; host link PCIe {pcie_gen}.0 x16",
    )


# Dense (no sparsity) bf16/fp16 tensor FLOP/s with fp32 accumulation; datasheets print the sparse figure
# too (2x). Memory as the datasheet states it (GB = 1e9 bytes; sizes in GiB as marketed).
GPU_PRESETS: dict[str, GPU] = {
    g.name: g
    for g in (
        # NVIDIA H100 Tensor Core GPU datasheet: SXM5 80 GB HBM3 3.35 TB/s, BF16 1,979 TFLOPS sparse, FP32 67.
        _gpu("h100-sxm", 80, 3350, 989.5, 67, 5, "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM)"),
        # Same datasheet, H100 PCIe: 80 GB HBM2e 2 TB/s, BF16 1,513 TFLOPS sparse, FP32 51.
        _gpu("h100-pcie", 80, 2000, 756.5, 51, 5, "NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe)"),
        # NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense, FP32 19.5; 40 GB HBM2 1,555 GB/s,
        # 80 GB PCIe HBM2e 1,935 GB/s, 80 GB SXM HBM2e 2,039 GB/s; PCIe Gen4 host link (SXM too).
        _gpu("a100-40gb", 40, 1555, 312, 19.5, 4, "NVIDIA A100 Tensor Core GPU datasheet (A100 40GB)"),
        _gpu("a100-80gb-pcie", 80, 1935, 312, 19.5, 4, "NVIDIA A100 Tensor Core GPU datasheet (80GB PCIe)"),
        _gpu("a100-80gb-sxm", 80, 2039, 312, 19.5, 4, "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)"),
        # NVIDIA L40S datasheet: 48 GB GDDR6 864 GB/s, BF16 733 TFLOPS sparse (362.05 dense), FP32 91.6.
        _gpu("l40s", 48, 864, 362.05, 91.6, 4, "NVIDIA L40S GPU datasheet"),
        # NVIDIA Ada Lovelace GPU Architecture whitepaper, appendix: RTX 4090 24 GB GDDR6X 1,008 GB/s, peak
        # FP16/BF16 tensor TFLOPS with FP32 accumulate 165.2 dense, FP32 82.6.
        _gpu(
            "rtx-4090", 24, 1008, 165.2, 82.6, 4, "NVIDIA Ada Lovelace GPU Architecture whitepaper (RTX 4090)"
        ),
        # NVIDIA Ampere GA102 GPU Architecture whitepaper: RTX 3090 24 GB GDDR6X 936 GB/s, peak FP16/BF16
        # tensor TFLOPS with FP32 accumulate 71 dense, FP32 35.6.
        _gpu("rtx-3090", 24, 936, 71, 35.6, 4, "NVIDIA Ampere GA102 GPU Architecture whitepaper (RTX 3090)"),
        # AWS publishes no A10G datasheet: 24 GB GDDR6 600 GB/s (as the A10), tensor 70 TFLOPS, FP32 35 per
        # Baseten, "NVIDIA A10 vs A10G for ML model inference" (from nvidia-smi clocks and AWS G5 specs).
        _gpu("a10g", 24, 600, 70, 35, 4, "Baseten 'NVIDIA A10 vs A10G for ML model inference' (AWS G5)"),
        # NVIDIA T4 Tensor Core GPU datasheet: 16 GB GDDR6 320+ GB/s, mixed FP16/FP32 65 TFLOPS, FP32 8.1,
        # PCIe Gen3 x16. Turing has no bf16 tensor cores: bf16 runs far slower; use float16 on a T4.
        _gpu("t4", 16, 320, 65, 8.1, 3, "NVIDIA T4 Tensor Core GPU datasheet (fp16; no bf16 tensor cores)"),
        # NVIDIA L4 Tensor Core GPU datasheet: 24 GB GDDR6 300 GB/s, BF16 242 TFLOPS sparse (121 dense), FP32 30.3.
        _gpu("l4", 24, 300, 121, 30.3, 4, "NVIDIA L4 Tensor Core GPU datasheet"),
        # NVIDIA's Titan RTX announcement as reported by Tom's Hardware ("Nvidia Titan RTX specs, pricing",
        # 2018-12-03): TU102, 24 GB GDDR6 672 GB/s, 130 tensor TFLOPS, FP32 16.3. TU102 takes PCIe 3.0 x16 (the
        # Quadro RTX 6000 datasheet, same chip, which counts its tensor rate with FP16 or FP32 accumulate).
        # Turing has fp16 tensor cores only (no bf16). The GPUs of accelerate's big-model-inference benchmark.
        _gpu("titan-rtx", 24, 672, 130, 16.3, 3, "Tom's Hardware, Nvidia Titan RTX specs (2018-12-03); fp16"),
        # GeForce RTX 2080 (TU104): 8 GB GDDR6 on a 256-bit bus at 14 Gbps = 448 GB/s, FP32 10.1 TFLOPS, "60
        # TFLOPs" for deep learning (ddd.cn/tech/d37565862.html; the accumulate width is not stated, so prefill
        # on this card is not calibrated); PCIe 3.0 x16 as every Turing card. fp16 only (no bf16).
        _gpu(
            "rtx-2080", 8, 448, 60, 10.1, 3, "ddd.cn RTX 2080 specifications (256-bit, 14 Gbps GDDR6); fp16"
        ),
    )
}


# Hosts: RAM peak = channels x 8 bytes x MT/s (JEDEC DDR4-3200 / DDR5-4800 / DDR5-5600 rates); CPU peak =
# cores x all-core GHz x FLOP/cycle/core (vendor ISA: AVX2 2 FMA units x 8 fp32 lanes x 2 = 32; Zen 4
# AVX-512 on 256-bit units = 32, AVX512_BF16 doubles it; Intel AMX is not assumed); disk = a PCIe 4.0 NVMe
# SSD's rated sequential read (Samsung 990 PRO datasheet: 7,450 MB/s; 7.0 GB/s used).
HOST_PRESETS: dict[str, Host] = {
    h.name: h
    for h in (
        Host(
            "desktop-ddr4",
            memory_bandwidth=2 * 8 * 3200e6,
            flops_fp32=8 * 4.0e9 * 32,
            flops_bf16=8 * 4.0e9 * 32,  # AVX2 has no bf16 arithmetic: converted to fp32, no faster
            disk_read=7.0 * _GB,
            source="2 channels DDR4-3200 (JEDEC); 8 cores x 4.0 GHz x 32 FLOP/cycle (AVX2 FMA); PCIe 4.0 NVMe",
        ),
        Host(
            "desktop-ddr5",
            memory_bandwidth=2 * 8 * 5600e6,
            flops_fp32=16 * 4.5e9 * 32,
            flops_bf16=16 * 4.5e9 * 64,
            disk_read=7.0 * _GB,
            source="2 channels DDR5-5600 (JEDEC); 16 cores x 4.5 GHz (AMD Ryzen 9 7950X) x 32 fp32 / 64 bf16 "
            "FLOP/cycle (Zen 4 AVX-512, AVX512_BF16); PCIe 4.0 NVMe",
        ),
        Host(
            "server-ddr5-8ch",
            memory_bandwidth=8 * 8 * 4800e6,
            flops_fp32=56 * 2.0e9 * 64,
            flops_bf16=56 * 2.0e9 * 128,
            disk_read=7.0 * _GB,
            source="8 channels DDR5-4800 per socket (Intel Xeon Sapphire Rapids, one socket); 56 cores x 2.0 GHz "
            "x 64 fp32 / 128 bf16 FLOP/cycle (2 AVX-512 FMA units, AVX512_BF16; AMX not assumed); PCIe 4.0 NVMe",
        ),
        Host(
            "server-ddr5-12ch",
            memory_bandwidth=12 * 8 * 4800e6,
            flops_fp32=96 * 2.4e9 * 32,
            flops_bf16=96 * 2.4e9 * 64,
            disk_read=7.0 * _GB,
            source="12 channels DDR5-4800 per socket (AMD EPYC 9654 Genoa, one socket); 96 cores x 2.4 GHz x "
            "32 fp32 / 64 bf16 FLOP/cycle (Zen 4 AVX-512, AVX512_BF16); PCIe 4.0 NVMe",
        ),
    )
}


# ---------------------------------------------------------------------------------------------------------
# Measuring this host


Timer = Callable[[], float]
"""A clock in seconds: ``time.perf_counter`` (wall time, the default) or ``time.thread_time`` (CPU time
of the calling thread: on a busy shared machine with ``torch.set_num_threads(1)`` it leaves out the time
other processes hold the core)."""


def _best_seconds(run: Callable[[], object], repeats: int, timer: Timer = time.perf_counter) -> float:
    """Shortest time of ``repeats`` runs after one warm-up (the least disturbed run)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = timer()
        run()
        best = min(best, timer() - start)
    return max(best, 1e-9)


def measure_memory_bandwidth(
    megabytes: int = 256, repeats: int = 5, dtype: str = "float32", timer: Timer = time.perf_counter
) -> float:
    """RAM read bytes/s as a decode step sees it: a matrix-vector product (``torch.nn.functional.linear``
    of one token) over a ``dtype`` weight matrix of ``megabytes`` MiB (far larger than any CPU cache),
    best of ``repeats``, with torch's threads. Every weight is read once, as a CPU-executed layer reads
    its weights for each decoded token; CPUs that convert bfloat16 to float32 for arithmetic stream
    16-bit weights slower than their RAM allows, which the ``"bfloat16"`` measurement shows."""
    import torch

    resolved = getattr(torch, dtype)
    width = 4096
    rows = max(1, megabytes * 2**20 // (width * resolved.itemsize))
    weight = torch.randn(rows, width).to(resolved)
    x = torch.randn(1, width).to(resolved)
    seconds = _best_seconds(lambda: torch.nn.functional.linear(x, weight), repeats, timer)
    return weight.numel() * weight.element_size() / seconds


def measure_matmul_flops(
    dtype: str = "float32", size: int = 1024, repeats: int = 3, timer: Timer = time.perf_counter
) -> float:
    """CPU FLOP/s of a ``size x size`` by ``size x size`` matrix multiply in ``dtype`` (2 size^3 FLOPs),
    best of ``repeats``: the shape class of a prefill's projections (tokens x hidden by hidden x hidden)."""
    import torch

    resolved = getattr(torch, dtype)
    a = torch.randn(size, size).to(resolved)
    b = torch.randn(size, size).to(resolved)
    seconds = _best_seconds(lambda: a @ b, repeats, timer)
    return 2.0 * size**3 / seconds


def measure_disk_read(
    megabytes: int = 256, directory: str | os.PathLike[str] | None = None
) -> tuple[float, str]:
    """Sequential read bytes/s of a freshly written temporary file in ``directory`` (default: the temp
    folder), and how it was read.

    The file is written, ``fsync``-ed and dropped from the page cache with
    ``posix_fadvise(POSIX_FADV_DONTNEED)`` (allowed without root for one's own clean file), then read with
    ``O_DIRECT`` where the filesystem supports it (the read bypasses the cache). Where neither is
    available (tmpfs, macOS, Windows) the read may come from the page cache and overstates the disk: the
    method string says so.
    """
    chunk = 4 * 2**20
    chunks = max(1, megabytes * 2**20 // chunk)
    data = os.urandom(chunk)
    fd, path = tempfile.mkstemp(prefix="devicemap-disk-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(chunks):
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        dropped = _drop_cache(path)
        seconds, direct = _read_file(path, chunk)
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
    if direct:
        method = "O_DIRECT read of a fresh file (page cache bypassed)"
    elif dropped:
        method = "buffered read after posix_fadvise(DONTNEED) (page cache dropped; read-ahead on)"
    else:
        method = "buffered read; the page cache could not be dropped, so this may overstate the disk"
    return chunks * chunk / seconds, method


def _drop_cache(path: str) -> bool:
    advise = getattr(os, "posix_fadvise", None)
    flag = getattr(os, "POSIX_FADV_DONTNEED", None)
    if advise is None or flag is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        advise(fd, 0, 0, flag)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _read_file(path: str, chunk: int) -> tuple[float, bool]:
    """Seconds to read ``path`` once; O_DIRECT (into a page-aligned buffer) when the filesystem allows."""
    direct_flag = getattr(os, "O_DIRECT", 0)
    if direct_flag:
        try:
            fd = os.open(path, os.O_RDONLY | direct_flag)
        except OSError:
            fd = -1
        if fd >= 0:
            buffer = mmap.mmap(-1, chunk)  # anonymous mappings are page-aligned, as O_DIRECT requires
            try:
                start = time.perf_counter()
                while os.readv(fd, [buffer]) > 0:
                    pass
                return max(time.perf_counter() - start, 1e-9), True
            except OSError:
                pass  # the filesystem accepted the flag but refuses direct reads: read it buffered
            finally:
                os.close(fd)
                buffer.close()
            _drop_cache(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(chunk):
            pass
    return max(time.perf_counter() - start, 1e-9), False


def measure_host(
    quick: bool = False,
    directory: str | os.PathLike[str] | None = None,
    name: str = "measured",
    timer: Timer = time.perf_counter,
) -> Host:
    """Measure this machine's RAM read bandwidth, CPU matmul FLOP/s (float32 and bfloat16) and disk read
    bandwidth; a few seconds (``quick=True``: about one).

    - memory: :func:`measure_memory_bandwidth` in float32 and bfloat16 (256 MiB, best of 5; quick:
      128 MiB, best of 3);
    - FLOP/s: :func:`measure_matmul_flops` at 1024 x 1024, float32 and bfloat16 (best of 5; quick: 3).
      Larger GEMMs (a big model's prefill) run somewhat faster, a small model's smaller ones slower;
    - disk: :func:`measure_disk_read` of 256 MiB (quick: 64 MiB) in ``directory``; pass the offload
      folder's directory to measure the disk offloaded weights will be read from (always wall time).

    ``timer`` clocks the memory and FLOP measurements (see :data:`Timer`).

    The result's efficiencies are 1.0 (the measured rates are already achieved rates) and ``details``
    records each measurement's method.

    >>> host = measure_host(quick=True)  # doctest: +SKIP
    >>> host.measured, dict(host.details)["disk"]  # doctest: +SKIP
    (True, 'O_DIRECT read of a fresh file (page cache bypassed)')
    """
    import torch

    mem_mb, repeats, disk_mb = (128, 3, 64) if quick else (256, 5, 256)
    size = 1024
    bandwidth = measure_memory_bandwidth(mem_mb, repeats, "float32", timer)
    bandwidth_bf16 = measure_memory_bandwidth(mem_mb, repeats, "bfloat16", timer)
    fp32 = measure_matmul_flops("float32", size, repeats, timer)
    bf16 = measure_matmul_flops("bfloat16", size, repeats, timer)
    disk, method = measure_disk_read(disk_mb, directory)
    threads = torch.get_num_threads()
    return Host(
        name=name,
        memory_bandwidth=bandwidth,
        flops_fp32=fp32,
        flops_bf16=bf16,
        disk_read=disk,
        memory_bandwidth_bf16=bandwidth_bf16,
        source=f"measured by devicemap.measure_host(quick={quick}) with {threads} torch threads",
        memory_efficiency=1.0,
        compute_efficiency=1.0,
        measured=True,
        details=(
            (
                "memory",
                f"matrix-vector product over {mem_mb} MiB of float32 / bfloat16 weights, best of {repeats}",
            ),
            ("flops", f"{size}x{size} matmul, float32 and bfloat16, best of {repeats}"),
            ("disk", f"{disk_mb} MiB: {method}"),
            ("threads", str(threads)),
        ),
    )


def with_host(hardware: Hardware, host: Host) -> Hardware:
    """``hardware`` with another host (e.g. a measured one).

    >>> with_host(Hardware.preset("l4"), Host.preset("desktop-ddr4")).host.name
    'desktop-ddr4'
    """
    return replace(hardware, host=host)
