"""Device and precision: the one policy (fp32, bf16, fp16 with a GradScaler) every phase computes in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ENV_OFF, PRECISIONS
from .errors import ConfigError, in_notebook


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere and later run bf16 in hardware; a T4 (7.5) only emulates it


@dataclass(frozen=True)
class Precision:
    """What a device computes in. autocast: the training autocast dtype (None = fp32, no autocast);
    grad_scaler: fp16 needs a GradScaler (its small gradients underflow otherwise); teacher: the dtype the
    teacher loads in, its 4-bit compute dtype included; reason: one line for the notebook."""

    device: str
    autocast: torch.dtype | None
    grad_scaler: bool
    teacher: torch.dtype
    reason: str

    def __iter__(self):  # `dtype, scaler = precision_policy(device)`
        return iter((self.autocast, self.grad_scaler))

    @property
    def name(self) -> str:
        """"bf16", "fp16" or "fp32": what the phases' matmuls run in."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.autocast]


def cpu_bf16_instructions() -> list[str]:
    """The native bf16 matmul instructions this x86 CPU has, as torch's CPU capability checks report them:
    "avx512_bf16" (AVX512-BF16: Cooper Lake, Sapphire Rapids, AMD Zen 4 and later) and "amx_bf16" (AMX tiles:
    Sapphire Rapids and later). An empty list (older x86, Arm, Apple silicon) means bf16 is emulated there and
    slower than float32."""
    found = []
    if torch.cpu._is_avx512_bf16_supported():
        found.append("avx512_bf16")
    if torch.cpu._is_amx_tile_supported():
        found.append("amx_bf16")
    return found


def precision_policy(device="auto", precision: str = "auto") -> Precision:
    """The one precision policy, for every device: the autocast dtype of Phases 2 and 3, evaluation, generation
    and the ablation, whether a GradScaler is needed, and the dtype the teacher runs in for Phase 1.

    precision="auto" (the PRECISION setting's default):
    - CUDA with compute capability >= 8.0 (A100, L4, H100): bf16 autocast, no scaler, teacher in bf16.
    - older CUDA (T4 7.5, V100 7.0): fp16 autocast with a GradScaler; the teacher in float32 (4-bit weights
      computed in float32), because Qwen2 models overflow in fp16 and these cards have no native bf16.
      torch.cuda.is_bf16_supported() is not used: it counts the T4's slow emulation as support.
    - CPU with native bf16 matmul (cpu_bf16_instructions: avx512_bf16 or AMX): bf16 autocast and a bf16 teacher;
      on the machine of docs/benchmarks.md bf16 matmul runs 2.3x faster than float32 there. fp16 is never
      used on a CPU (0.4 GFLOP/s there).
    - any other CPU: float32 everywhere.
    precision="fp32" forces float32 everywhere; precision="bf16" forces bf16 autocast and a bf16 teacher (on a
    CPU without native bf16 it runs, slowly, and the reason says so).
    What stays float32 under bf16 autocast: the quantizer scales, the latent weights and optimiser state,
    the losses (cosine, CE, KD softmax), and the LM head's logits in evaluation (held-out CE is computed from
    float32 logits); see docs/precision.md for the measured differences.
    Raises ConfigError for an unknown precision, and for "bf16" on a CUDA card without native bf16 (use
    "auto": fp16 with a GradScaler).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"PRECISION={precision!r} is not one of {PRECISIONS}: set PRECISION to one of them")
    dev = pick_device(device) if isinstance(device, str) else torch.device(device)
    if dev.type != "cuda":
        if precision == "fp32":
            return Precision(dev.type, None, False, torch.float32, f"{dev.type}: float32, as asked")
        cpu = dev.type == "cpu"
        native = cpu_bf16_instructions() if cpu else []
        if precision == "bf16":
            note = (f"native bf16 ({', '.join(native)})" if native else
                    "this CPU has no native bf16 matmul (avx512_bf16/AMX): emulated, slower than float32" if cpu
                    else "not checked: this device has no bf16 check here")
            return Precision(dev.type, torch.bfloat16, False, torch.bfloat16,
                             f"{dev.type}: bf16 autocast and a bf16 teacher, as asked; {note}")
        if native:
            return Precision(dev.type, torch.bfloat16, False, torch.bfloat16,
                             f"{dev.type}: bf16 autocast and a bf16 teacher (native bf16 matmul: "
                             f"{', '.join(native)}); PRECISION='fp32' turns it off")
        return Precision(dev.type, None, False, torch.float32,
                         f"{dev.type}: float32 (no native bf16 matmul: avx512_bf16 or AMX)" if cpu else
                         f"{dev.type}: float32 (PRECISION='bf16' asks for bf16 autocast)")
    cap = tuple(torch.cuda.get_device_capability(dev))
    try:
        name = torch.cuda.get_device_name(dev)
    except Exception:  # the name is only for the printout
        name = "this GPU"
    card = f"{name} (compute capability {cap[0]}.{cap[1]})"
    if precision == "fp32":
        return Precision("cuda", None, False, torch.float32, f"{card}: float32, as asked")
    if cap >= NATIVE_BF16_CAPABILITY:
        return Precision("cuda", torch.bfloat16, False, torch.bfloat16, f"{card}: native bf16 autocast")
    if precision == "bf16":
        raise ConfigError(f"PRECISION='bf16' needs a GPU with native bf16 (compute capability 8.0 or more); "
                          f"{card} only emulates it: set PRECISION='auto' (fp16 with a GradScaler) or 'fp32'")
    return Precision("cuda", torch.float16, True, torch.float32,
                     f"{card} has no native bf16: fp16 autocast with a GradScaler, teacher in float32")


def make_grad_scaler(policy: Precision):
    """A torch.amp.GradScaler where the policy needs one (fp16), else None (optimizer_step's plain path)."""
    return torch.amp.GradScaler(policy.device) if policy.grad_scaler else None


def _autocast(policy: Precision):
    """The policy's autocast (see precision_policy); disabled where it says float32."""
    return torch.autocast(policy.device, dtype=policy.autocast, enabled=policy.autocast is not None)


class _cuda_oom_hint:
    """Turns CUDA out-of-memory into one message that names the sliders to lower."""

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is not None and issubclass(kind, torch.cuda.OutOfMemoryError):
            release_memory()
            raise RuntimeError("CUDA ran out of memory: lower BATCH_SIZE, MAX_SEQ_LENGTH or the student size "
                               "(STUDENT_DIM, STUDENT_LAYERS), then " + in_notebook(
                                   "rerun this cell", "rerun the command (it resumes from the last checkpoint)")) from err
        return False


def release_memory(collect: bool = True) -> None:
    """Collect what was just dropped (gc) and give its memory back to CUDA, so that what comes next (the next
    phase, ablation arm or the student after the teacher) is built in it. On a CPU only the collection runs.

    collect=False skips the collection, for callers that drop only what reference counting frees at once (a
    phase's gradients and optimizer state): a full collection scans every object the process holds (0.15 s in
    a fresh kernel, 0.6 s in a long test process), while a transformers teacher after a forward is kept alive
    by reference cycles until one runs."""
    import gc

    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MALLOC_KEEP = 512 * 2**20  # bytes: freed memory a process keeps for reuse (M_TRIM_THRESHOLD)
MALLOC_MMAP_MIN = 2**30  # bytes: blocks from this size up still get pages of their own (M_MMAP_THRESHOLD)
MALLOC_ON = ("", "1", "true", "on", "yes")  # SPOONFEED_MALLOC's on values (ENV_OFF: its off ones)
GLIBC_DEFAULT = 128 * 2**10  # bytes: glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD before any mallopt
_malloc_kept = False  # whether keep_freed_memory turned reuse on in this process


def keep_freed_memory(device) -> str:
    """On a CPU run under glibc (Linux), let malloc reuse the memory of large freed tensors instead of giving it
    back to the kernel: mallopt(M_MMAP_THRESHOLD, 1 GiB) and mallopt(M_TRIM_THRESHOLD, 512 MiB), process-wide.
    By default glibc maps every block above 32 MiB (its dynamic threshold's ceiling) afresh and unmaps it when
    freed, so each training step page-faults its large tensors anew (at the cpu preset, the head's (1016, 49152)
    bf16 logits, 100 MB, and its float32 weight gradient, 50 MB): a Phase 3 head-loss step measured 1.3x faster
    with the change (bench/malloc.py). The cost: up to MALLOC_KEEP (512 MiB) of freed memory stays in the
    process for the next allocations (the bench's children peaked 230 MiB higher). A no-op returning "" on CUDA,
    without glibc (macOS, Windows, musl) and with SPOONFEED_MALLOC=0 (or false, off, no) in the environment.
    Turned off after it was on in the same process (a rerun of the setup cell), it sets glibc's thresholds back
    to their defaults (128 KiB; glibc's dynamic raising of the mmap threshold stays off) and says so.
    device: a torch.device or its name. Returns the line it did it with, for the setup cell's output. Raises
    ConfigError for a SPOONFEED_MALLOC that is neither on (1, true, on, yes) nor off, before any work."""
    import ctypes
    import os
    import platform

    global _malloc_kept

    value = os.environ.get("SPOONFEED_MALLOC", "1").strip().lower()
    if value not in MALLOC_ON + ENV_OFF:
        raise ConfigError(f"SPOONFEED_MALLOC={os.environ['SPOONFEED_MALLOC']!r} is neither on nor off: set it to 0 "
                          "to leave glibc's malloc as it is, or 1 (the default) to keep freed memory for reuse")
    if platform.libc_ver()[0] != "glibc":
        return ""
    libc = ctypes.CDLL(None)  # the process's own C library
    if torch.device(device).type != "cpu" or value in ENV_OFF:
        if not _malloc_kept:
            return ""
        _malloc_kept = False  # turned on earlier in this process (a rerun of the setup cell): back to the defaults
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT)
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT)
        return "malloc: back to glibc's default thresholds (128 KiB)"
    if not (libc.mallopt(M_MMAP_THRESHOLD, MALLOC_MMAP_MIN) and libc.mallopt(M_TRIM_THRESHOLD, MALLOC_KEEP)):
        return ""
    _malloc_kept = True
    return (f"malloc: freed tensors' memory kept for reuse (glibc, up to {MALLOC_KEEP // 2**20} MiB; "
            "SPOONFEED_MALLOC=0 turns it off)")
