"""Probes of what this machine can really run."""

from __future__ import annotations

import functools
import subprocess
import sys

import torch

from cellcls.errors import ConfigError

# A bf16 conv + linear under CPU autocast: the ops a training step uses.
_BF16_PROBE = """
import torch
x = torch.randn(4, 3, 16, 16)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 2))
with torch.autocast("cpu", dtype=torch.bfloat16):
    net(x).float().sum().backward()
"""


@functools.cache
def cpu_bf16_works() -> bool:
    """Whether bf16 autocast runs on this CPU without crashing.

    Some virtual machines advertise AMX/AVX512-BF16 that the hypervisor does not enable: oneDNN then dies with
    SIGILL, which no exception handler can catch, so the check runs in a throw-away subprocess.
    """
    try:
        result = subprocess.run([sys.executable, "-c", _BF16_PROBE], capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def resolve_device(name: str, setting: str = "trainer.device") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error naming ``setting``, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name} but no CUDA device is available; use {setting}=auto or cpu")
    return torch.device(name)
