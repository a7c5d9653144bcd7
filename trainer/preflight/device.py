"""Which device a run will use and how much memory it has, without importing torch when possible.

Order: if torch is already imported (the GUI, the trainer), ask it. Otherwise a
CPU build of torch (``+cpu`` in its version) means CPU; else ``nvidia-smi`` gives
the first GPU's memory in ~0.1 s. Anything else is treated as CPU, compared with
system RAM via psutil.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from trainer.optim.rules import PrecisionChoice, decide_precision

GIB = 1024**3


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda", "mps" or "cpu"
    name: str
    total_bytes: int | None
    available_bytes: int | None  # free now (RAM that is not in use; VRAM not used by other processes)
    source: str  # how we found out: "torch", "nvidia-smi", "psutil"
    native_bf16: bool = False  # a CPU with AVX512-BF16 or AMX instructions (see cpu_has_native_bf16)
    gpu_bf16: bool = True  # an NVIDIA GPU with bf16 (Ampere and later); assumed when torch is not imported
    gpu_count: int = 0  # NVIDIA GPUs this process sees

    @property
    def is_gpu(self) -> bool:
        return self.kind != "cpu"

    @property
    def trainer_device(self) -> str:
        """Where the trainer runs: an NVIDIA GPU, else the CPU (MPS is not used for training)."""
        return "cuda" if self.kind == "cuda" else "cpu"

    def precision(self, settings) -> PrecisionChoice:
        """The mixed precision a run with ``settings`` gets here (the one rule: trainer.optim.rules)."""
        return decide_precision(settings, self.trainer_device, self.native_bf16, self.gpu_bf16)

    def describe(self) -> str:
        total = f"{self.total_bytes / GIB:.1f} GiB" if self.total_bytes else "unknown size"
        memory = "VRAM" if self.kind == "cuda" else "RAM"
        return f"{self.name} ({total} {memory})"


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX (recent Xeons, AMD Zen 4 and later): oneDNN runs bf16 matmuls and
    convolutions natively. Asks torch when it is imported, else /proc/cpuinfo (no torch import)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except (AttributeError, RuntimeError):
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def probe_device() -> DeviceInfo:
    torch = sys.modules.get("torch")
    if torch is not None:
        return _from_torch(torch)
    if _torch_is_cpu_build():
        return _cpu()
    return _from_nvidia_smi() or _cpu()


def _from_torch(torch) -> DeviceInfo:
    try:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            free, total = torch.cuda.mem_get_info(0)
            return DeviceInfo("cuda", props.name, int(total), int(free), "torch",
                              gpu_bf16=bool(torch.cuda.is_bf16_supported()), gpu_count=torch.cuda.device_count())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            cpu = _cpu()  # unified memory: the GPU shares system RAM
            return DeviceInfo("mps", "Apple GPU (shared memory)", cpu.total_bytes, cpu.available_bytes, "torch")
    except Exception:  # a broken CUDA install must not break the check
        pass
    return _cpu()


def _torch_is_cpu_build() -> bool:
    from importlib import metadata

    try:
        return "+cpu" in metadata.version("torch")
    except metadata.PackageNotFoundError:
        return True


@lru_cache(maxsize=1)
def _from_nvidia_smi() -> DeviceInfo | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout
        name, total_mib, free_mib = (part.strip() for part in out.splitlines()[0].split(","))
        return DeviceInfo("cuda", name, int(float(total_mib)) * 1024**2, int(float(free_mib)) * 1024**2, "nvidia-smi",
                          gpu_count=len([line for line in out.splitlines() if line.strip()]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _cpu() -> DeviceInfo:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return DeviceInfo("cpu", "CPU", int(vm.total), int(vm.available), "psutil", cpu_has_native_bf16())
    except ImportError:
        return DeviceInfo("cpu", "CPU", None, None, "none", cpu_has_native_bf16())
