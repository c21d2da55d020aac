"""Mixed precision on CPUs: bfloat16 autocast where the CPU computes bfloat16 natively.

`amp: true` in a config means fp16 autocast + gradient scaling on a GPU (MONAI's engines do that, but only
for "cuda"). On a CPU with AVX512-BF16 or AMX, bf16 autocast makes a training step of the default 3D UNet
about 1.75x faster (bench/train.py, docs/speed.md); on a CPU without them bf16 is emulated and slower, so
it is used only where oneDNN reports native support. bfloat16 has float32's range: no gradient scaler.
"""

from __future__ import annotations

import os

import torch

DISABLE_ENV = "MMAR_CPU_AMP"  # "0": keep float32 on the CPU even when the config asks for amp


def cpu_bf16_supported() -> bool:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or a non-oneDNN build
        return False


class CPUAutocast(torch.nn.Module):
    """Runs the wrapped network's forward pass under bf16 autocast and returns float32 outputs.

    The wrapper shares the network's parameters (kept in float32); checkpoints are written from the
    network itself, so their keys do not change.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.module(*args, **kwargs)
        return _to_float(out)


def _to_float(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float(v) for k, v in out.items()}
    return out


def for_device(network: torch.nn.Module, device: torch.device, amp: bool) -> tuple[torch.nn.Module, bool, str]:
    """(network to run, whether MONAI's CUDA AMP is on, a description) for `amp` on `device`."""
    if not amp:
        return network, False, "float32"
    if device.type == "cuda":
        return network, True, "fp16 autocast (CUDA)"
    if device.type == "cpu" and cpu_bf16_supported():
        return CPUAutocast(network), False, "bf16 autocast (CPU)"
    return network, False, "float32 (this CPU has no native bfloat16)"
