"""Which torch device a name means: the one home of that rule (the device is a parameter, never a global)."""

from __future__ import annotations

from typing import Any

__all__ = ["resolve_device", "tensor_layout", "on_device", "bf16_is_fast"]


def resolve_device(device: Any = "auto"):
    """``"auto"`` -> CUDA, then MPS, then CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a torch.device.

    An explicitly requested device that is not there is an error that says what to use instead.
    """
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was requested but no CUDA GPU is available; use auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device!r} was requested but there are only {torch.cuda.device_count()} "
                               "CUDA GPU(s) (cuda:0 ...)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' was requested but MPS is not available; use auto or cpu")
    return dev


def tensor_layout(ndim: int, dev):
    """The memory format a network's tensor of ``ndim`` dimensions takes on ``dev``: on a CPU channels-last for
    4-D (2-D convolution) and channels-last-3d for 5-D (3-D convolution) weights, where oneDNN's convolutions are
    much faster that way (``benchmarks/bench_threads.py --layouts``, ``bench_engine.py --levers``; 3-D: a depth-2
    U-Net's forward 1.3-1.6x); the usual layout elsewhere (CUDA measured with it)."""
    import torch

    if dev.type != "cpu":
        return torch.contiguous_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim, torch.contiguous_format)


def on_device(model, dev):
    """``model`` moved to ``dev``, each parameter and buffer in its :func:`tensor_layout` (converted in place)."""
    model = model.to(dev)
    for t in (*model.parameters(), *model.buffers()):
        fmt = tensor_layout(t.dim(), dev)
        if not t.is_contiguous(memory_format=fmt):
            t.data = t.data.contiguous(memory_format=fmt)
    return model


def bf16_is_fast(dev) -> bool:
    """Whether training uses bfloat16 autocast on ``dev`` when ``TrainConfig.amp`` is on: CPUs with bf16
    instructions (AVX512-BF16 or AMX), where a channels-last convolution runs about 4x faster in bf16 (a CoordGate
    U-Net(2) training step 1.5x, ``benchmarks/bench_threads.py --bf16``; other CPUs emulate bf16 and are slower with
    it), and CUDA GPUs, where autocast was the default before (on an H200 it did not pay at U-Net(2)'s size:
    ``benchmarks/README.md``, GPU)."""
    import torch

    if dev.type == "cuda":
        return True
    if dev.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)
