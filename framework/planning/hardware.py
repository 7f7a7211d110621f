"""Device profiles (peak FLOP/s, memory, link bandwidths) and the hardware/software facts of a run.

Two users: ``longreach bench sweep`` stamps every result with :func:`hardware_info` and
:func:`software_versions` and computes MFU against :func:`peak_flops` (None where the device's peak is
not known — CPUs); ``longreach plan`` reads a :class:`DeviceProfile` (``PROFILES``) for its cost model.

Numbers are vendor datasheet figures, dense (no 2:4 sparsity), per GPU:

* H100 SXM5: 989 TFLOP/s bf16, 80 GB HBM3, NVLink 4 900 GB/s bidirectional (450 GB/s each way),
  one 400 Gb/s NDR InfiniBand HCA per GPU (50 GB/s each way), 8 GPUs per node.
* H200 SXM: same compute and links as H100 SXM, 141 GB HBM3e.
* A100 SXM4 80 GB: 312 TFLOP/s bf16, NVLink 3 600 GB/s bidirectional (300 GB/s each way), one 200 Gb/s
  HDR HCA per GPU (25 GB/s), 8 GPUs per node.
* ``cpu_gloo``: this machine's ranks over gloo on localhost. No datasheet peak; its effective kernel
  FLOP/s, per-message latency and bandwidth are *measured*: the defaults below are the calibration of
  ``configs/bench_cpu_sweep.yaml`` (``longreach plan --calibrate results.jsonl``) and are replaced by a
  fresh calibration whenever one is given (``longreach plan --calibration calib.json``).

``link_efficiency`` is the share of the nominal link rate NCCL collectives reach (bus bandwidth
measured by nccl-tests is ~80–90% of nominal on NVLink and IB); ``latency_*`` are per-message
software+wire latencies. ``mfu_dense`` / ``mfu_attention`` are the achievable shares of peak for
large matmuls and for the fused attention kernel (FlashAttention-2/3 forward+backward on H100 runs at
roughly 35–60% of peak); they are planning assumptions, stated so they can be changed.
"""
from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, replace

import torch

__all__ = ["DeviceProfile", "PROFILES", "get_profile", "hardware_info", "peak_flops", "software_versions"]


@dataclass(kw_only=True, slots=True, frozen=True)
class DeviceProfile:
    name: str
    """Profile key (``h100_sxm``, ``h200``, ``a100_80g``, ``cpu_gloo``)."""
    description: str
    """What the numbers describe."""
    peak_flops: float | None
    """Dense bf16 peak FLOP/s of one device; None where unknown (CPU)."""
    memory_bytes: float
    """Device memory usable by one rank, bytes."""
    gpus_per_node: int
    """Ranks that share the fast intra-node link (NVLink); beyond this collectives cross the network."""
    intra_bw: float
    """Intra-node bandwidth per rank, one direction, bytes/s (nominal)."""
    inter_bw: float
    """Inter-node bandwidth per rank, one direction, bytes/s (nominal)."""
    latency_intra: float = 5e-6
    """Per-message latency inside a node, seconds."""
    latency_inter: float = 12e-6
    """Per-message latency across nodes, seconds."""
    link_efficiency: float = 0.85
    """Achieved share of the nominal link bandwidth."""
    mfu_dense: float = 0.55
    """Achievable share of peak for the dense (matmul) part of a training step."""
    mfu_attention: float = 0.45
    """Achievable share of peak for the attention kernel (forward and backward)."""
    attention_flops: float | None = None
    """Effective FLOP/s of the local attention kernel; None = peak × mfu_attention (set by calibration)."""
    bwd_efficiency: float = 1.0
    """Backward kernel speed relative to the forward's FLOP/s (calibrated; FlashAttention ≈ 0.8–1)."""
    call_overhead: float = 0.0
    """Fixed seconds per attention call (Python, launch, planning); calibrated on CPU."""
    overlap: float = 1.0
    """How much of the ring's communication hides behind compute (1: all that fits, 0: none)."""
    host_memory_bytes: float = 2e12 / 8
    """Host (CPU) memory available per device for offloaded checkpoints and optimizer state (assumed:
    an 8-GPU node with 2 TB, the DGX H100/H200 figure; 1 TB for A100 nodes)."""
    host_bw: float = 25e9
    """Device↔host copy bandwidth per device, one direction, bytes/s (PCIe Gen5 x16 ≈ 50 GB/s nominal,
    about half achieved with 8 GPUs sharing the host; assumed)."""
    host_adam: float = 1e9
    """Parameters per second one device's share of the host cores steps with Adam (assumed)."""
    concurrency: float | None = None
    """Ranks that compute at full speed at once (CPU ranks sharing one host's cores; fitted by the
    calibration); with P ranks each gets ``min(1, concurrency / P)`` of its speed. None: a device per rank."""

    def __post_init__(self) -> None:
        for f in ("memory_bytes", "intra_bw", "inter_bw"):
            if getattr(self, f) <= 0:
                raise ValueError(f"DeviceProfile.{f} must be > 0, got {getattr(self, f)}")
        if self.gpus_per_node < 1:
            raise ValueError(f"DeviceProfile.gpus_per_node must be >= 1, got {self.gpus_per_node}")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"DeviceProfile.overlap must be in [0, 1], got {self.overlap}")

    @property
    def kernel_flops(self) -> float:
        """Effective attention-kernel FLOP/s (forward)."""
        if self.attention_flops is not None:
            return self.attention_flops
        if self.peak_flops is None:
            raise ValueError(f"profile {self.name!r} has neither peak_flops nor a calibrated attention_flops")
        return self.peak_flops * self.mfu_attention

    @property
    def dense_flops(self) -> float:
        """Effective FLOP/s of the dense part (matmuls) of a step."""
        if self.peak_flops is None:
            return self.kernel_flops
        return self.peak_flops * self.mfu_dense

    def with_calibration(self, params: dict[str, float]) -> "DeviceProfile":
        """A copy with calibrated values (``attention_flops``, ``latency_*``, ``intra_bw``, …) replaced."""
        allowed = {"attention_flops", "latency_intra", "latency_inter", "intra_bw", "inter_bw", "bwd_efficiency",
                   "call_overhead", "overlap", "link_efficiency", "concurrency"}
        bad = sorted(set(params) - allowed)
        if bad:
            raise ValueError(f"calibration: unknown parameter(s) {bad}; known: {sorted(allowed)}")
        return replace(self, **params)


GB = 1e9
PROFILES: dict[str, DeviceProfile] = {
    "h100_sxm": DeviceProfile(
        name="h100_sxm", description="NVIDIA H100 SXM5 80GB, NVLink 4 + 400G NDR IB per GPU, 8 per node",
        peak_flops=989e12, memory_bytes=80 * GB, gpus_per_node=8, intra_bw=450 * GB, inter_bw=50 * GB,
    ),
    "h200": DeviceProfile(
        name="h200", description="NVIDIA H200 SXM 141GB, NVLink 4 + 400G NDR IB per GPU, 8 per node",
        peak_flops=989e12, memory_bytes=141 * GB, gpus_per_node=8, intra_bw=450 * GB, inter_bw=50 * GB,
    ),
    "a100_80g": DeviceProfile(
        name="a100_80g", description="NVIDIA A100 SXM4 80GB, NVLink 3 + 200G HDR IB per GPU, 8 per node",
        peak_flops=312e12, memory_bytes=80 * GB, gpus_per_node=8, intra_bw=300 * GB, inter_bw=25 * GB,
        latency_inter=15e-6, host_memory_bytes=1e12 / 8, host_bw=12e9,
    ),
    # Calibrated on this 2-core AMD EPYC VM (shared with other jobs), float32, 1 torch thread per rank,
    # gloo over localhost: `longreach bench sweep bench_cpu_sweep` then `longreach plan --calibrate`
    # (held-out median error 12%). Latency and bandwidth are poorly determined there (MB-sized messages
    # next to 100 ms kernels); concurrency 1.28 says two ranks got ~1.3 cores between them.
    "cpu_gloo": DeviceProfile(
        name="cpu_gloo", description="CPU ranks over gloo on one host (measured: see calibration)",
        peak_flops=None, memory_bytes=8 * GB, gpus_per_node=2, intra_bw=0.033 * GB, inter_bw=0.033 * GB,
        latency_intra=1e-7, latency_inter=1e-7, link_efficiency=1.0, attention_flops=53e9, bwd_efficiency=0.90,
        call_overhead=2.2e-3, overlap=0.42, concurrency=1.28,
    ),
}

# GPU name fragments (torch.cuda.get_device_name) → dense bf16 peak FLOP/s.
_GPU_PEAKS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L20", 119.5e12), ("A10G", 70e12),
    ("V100", 125e12), ("RTX 4090", 165e12),
)


def get_profile(name: str) -> DeviceProfile:
    """The :class:`DeviceProfile` called ``name``.

    Raises:
        ValueError: unknown name (the message lists the profiles).
    """
    if name not in PROFILES:
        raise ValueError(f"unknown hardware profile {name!r}; choose from {', '.join(PROFILES)}")
    return PROFILES[name]


def peak_flops(device_name: str | None, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Dense peak FLOP/s of a GPU named ``device_name`` for ``dtype``; None when unknown (CPUs).

    bf16/fp16 use the tensor-core peak; float32 uses the TF32 tensor-core peak (half of bf16 on
    Ampere/Hopper); float64 is not covered (None).
    """
    if not device_name:
        return None
    for frag, peak in _GPU_PEAKS:
        if frag.lower() in device_name.lower():
            if dtype in (torch.bfloat16, torch.float16):
                return peak
            if dtype == torch.float32:
                return peak / 2
            return None
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_info() -> dict[str, object]:
    """CPU model and core count, and the GPU name/count when CUDA is available."""
    info: dict[str, object] = {"cpu_model": _cpu_model(), "cpu_cores": os.cpu_count(), "hostname": platform.node(),
                               "gpu_name": None, "gpu_count": 0}
    if torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def software_versions() -> dict[str, str | None]:
    """Versions of python, torch, longreach, triton and numpy (None when not installed)."""
    from importlib import metadata

    def ver(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"python": sys.version.split()[0], "torch": torch.__version__, "longreach": ver("longreach"),
            "triton": ver("triton"), "numpy": ver("numpy"), "cuda": torch.version.cuda}
