"""Checks and settings shared by the kernel launchers."""

from __future__ import annotations

import os

import torch

# Dtypes the kernels load and store; arithmetic is always fp32 inside.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def single_config() -> bool:
    """Autotune with one config: reproducible under pytest, and the interpreter has no timings to compare."""
    return "PYTEST_VERSION" in os.environ or interpreting()


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 GEMMs in full fp32 ("ieee"), as torch does by default (Triton would use TF32);
    None (the backend's default) for fp16/bf16, where the option does not apply."""
    return "ieee" if dtype == torch.float32 else None


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int,
    dtypes: tuple[torch.dtype, ...],
    shape: tuple[int | None, ...] | None = None,
    device: torch.device | None = None,
    unit_last_stride: bool = True,
) -> torch.Tensor:
    """Raise a clear error unless ``t`` is a tensor of the given rank, dtype, shape and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None:
        for dim, (want, got) in enumerate(zip(shape, t.shape)):
            if want is not None and want != got:
                raise ValueError(f"{name} must have shape {_fmt(shape)}, got {tuple(t.shape)} (dim {dim})")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")
    if unit_last_stride and t.numel() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got strides {t.stride()}; call .contiguous()")
    return t


def check_device(t: torch.Tensor) -> torch.device:
    """Compiled kernels need CUDA tensors; the interpreter runs on CPU tensors."""
    if not interpreting() and t.device.type != "cuda":
        raise ValueError(
            f"Triton kernels need CUDA tensors, got a tensor on {t.device}; "
            "set TRITON_INTERPRET=1 before importing pars_fast.kernels to run them on the CPU interpreter"
        )
    return t.device


def check_out(
    out: object,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    *inputs: torch.Tensor | None,
) -> torch.Tensor:
    """A caller-provided output buffer: contiguous, of the expected shape, dtype and device, aliasing no input."""
    check_tensor("out", out, ndim=len(shape), dtypes=(dtype,), shape=shape, device=device)
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    base = out.untyped_storage().data_ptr()
    for t in inputs:
        # Kernels read inputs while other programs write out; autotuning also re-runs them.
        if t is not None and t.numel() and out.numel() and t.untyped_storage().data_ptr() == base:
            raise ValueError("out must not share memory with an input")
    return out


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
