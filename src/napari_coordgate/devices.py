"""Which torch device a name means: the one home of that rule (the device is a parameter, never a global)."""

from __future__ import annotations

from typing import Any

__all__ = ["resolve_device", "memory_format", "model_memory_format", "on_device", "bf16_is_fast"]


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


def memory_format(dev):
    """The layout the networks' feature maps use on ``dev``: channels-last on CPUs, where oneDNN's convolutions are
    much faster that way (``benchmarks/bench_threads.py --layouts``, ``bench_engine.py --levers``); the usual
    (N, C, H, W) elsewhere (CUDA measured with it)."""
    import torch

    return torch.channels_last if dev.type == "cpu" else torch.contiguous_format


def model_memory_format(model, dev):
    """The layout of ``model``'s parameters on ``dev``: :func:`memory_format`, except for 3-D networks (5-D
    convolution weights), which stay in the usual layout (channels-last is a 4-D layout: their coordinate MLPs'
    4-D weights and their 5-D ones cannot share it)."""
    import torch

    if any(p.dim() == 5 for p in model.parameters()):
        return torch.contiguous_format
    return memory_format(dev)


def on_device(model, dev):
    """``model`` moved to ``dev`` in its :func:`model_memory_format` (parameters converted in place)."""
    return model.to(dev, memory_format=model_memory_format(model, dev))


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
