"""What a stage process computes with: its device, its precision and its store reader threads."""

import torch

from lib.core.errors import UserError
from lib.core.params import RuntimeParams

_reader_threads = RuntimeParams().num_workers


def set_reader_threads(threads: int) -> None:
    """Threads that read stores ahead of compute in this process (runtime.num_workers; 0: none)."""
    global _reader_threads
    if threads < 0:
        raise ValueError(f"reader threads must be >= 0, got {threads}")
    _reader_threads = threads


def reader_threads() -> int:
    """The store reader threads of this process (`lib.core.streams.read_ahead`'s default)."""
    return _reader_threads


def resolve_device(name: str = "auto") -> torch.device:
    """Map a params device string ("auto", "cpu", "cuda", "cuda:1", "mps") to a torch device.

    "auto" picks CUDA when available so the same params run on a laptop and a GPU box.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine", key="runtime.device", value=name, fix="set it to 'cpu' or 'auto'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"this machine has {torch.cuda.device_count()} CUDA devices", key="runtime.device", value=name,
                        fix="set it to 'cuda', 'auto' or cuda:<i> with i below that count")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("MPS (Apple GPUs) is not available here", key="runtime.device", value=name, fix="set it to 'cpu' or 'auto'")
    return device


def available_memory(device: torch.device) -> int | None:
    """Bytes a stage can still allocate on `device`: free CUDA memory (cudaMemGetInfo), or on a CPU
    the kernel's MemAvailable (/proc/meminfo); None where neither is known (MPS, non-Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024  # reported in KiB
        except OSError:
            return None
    return None


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 matrix work natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX).

    Without it, CPU bf16 autocast emulates every op: measured ~25x slower than fp32 on an AVX2 CPU.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def autocast_dtype(device: torch.device, mode: bool | str = "auto") -> torch.dtype | None:
    """The autocast dtype for `mode` on `device`, or None for plain fp32.

    "auto": bf16 where the hardware runs it natively, fp16 on GPUs without bf16, else fp32.
    True forces low precision (bf16, or fp16 on such GPUs); False is fp32.
    """
    if mode is False:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    if mode == "auto" and not native_bf16(device):
        return None
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    """"bf16" / "fp16" / "fp32": how a stage's summary reports the precision it ran at."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
