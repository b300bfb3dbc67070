"""Probes of what this machine can really run."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import Any

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
        result = subprocess.run([sys.executable, "-c", _BF16_PROBE], capture_output=True, timeout=300, check=False)
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


def set_cpu_threads(setting: Any, processes_on_node: int = 1) -> int:
    """``trainer.num_threads``: auto keeps an explicit OMP_NUM_THREADS, else shares the machine's cores among the
    node's processes (torchrun ranks on the CPU would otherwise each take every core and slow each other down)."""
    value = str(setting).lower()
    if value == "auto":
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, processes_on_node))
    else:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ConfigError(f"trainer.num_threads={setting!r} is not valid; allowed values: auto or an integer >= 1")
    torch.set_num_threads(threads)
    return threads


def eval_batch_size(setting: Any, train_batch: int, device: torch.device) -> int:
    """``trainer.eval_batch_size``: auto is 4x the training batch on CUDA (inference needs no activations kept
    for backward, and large batches fill the GPU) and the training batch on the CPU (no gain there)."""
    if setting is None or str(setting).lower() == "auto":
        return train_batch * 4 if device.type == "cuda" else train_batch
    try:
        value = int(setting)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise ConfigError(f"trainer.eval_batch_size={setting!r} is not valid; allowed values: auto or an integer >= 1")
    return value
