"""Where and how a job runs: device, CPU threads, precision, memory layout, DDP and seeding."""

from __future__ import annotations

import functools
import logging
import os
import random
import subprocess
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cellcls.config.schema import TrainerConfig
from cellcls.errors import ConfigError
from cellcls.infra import distributed

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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``trainer.precision`` (None: full float32)."""
    precision = str(precision)
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "16" and device.type != "cuda":
        raise ConfigError("trainer.precision=16 needs a CUDA device; use 32 or bf16 on the CPU")
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_works():
        raise ConfigError(
            "trainer.precision=bf16: bf16 crashes on this CPU (it advertises bf16/AMX instructions that do not run "
            "here); use trainer.precision=32, or start with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 to keep bf16 off AMX"
        )
    return {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[precision]


def memory_format(setting: Any) -> torch.memory_format:
    """``trainer.channels_last``: auto/true use NHWC, which oneDNN and cuDNN convolutions run faster
    (LeNet training on 2 CPU cores: 321 -> 612 img/s); false keeps NCHW."""
    value = str(setting).lower()
    if value not in ("auto", "true", "false"):
        raise ConfigError(f"trainer.channels_last={setting!r} is not valid; allowed values: auto, true, false")
    return torch.contiguous_format if value == "false" else torch.channels_last


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch's RNG seed is a function of (seed, epoch), so a resumed run repeats the same randomness."""
    return (seed * 1_000_003 + epoch) % 2**63


@dataclass
class Runtime:
    """The resolved ``trainer`` settings of where and how to compute."""

    device: torch.device
    dist: distributed.DistEnv
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder (always, unless it is a non-zero torchrun rank)."""
        return self.dist.is_main

    def autocast(self) -> AbstractContextManager:
        """Mixed precision for the forward pass when ``trainer.precision`` asks for it."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def setup_runtime(t: TrainerConfig) -> Runtime:
    """Device, DDP process group, CPU threads, precision and determinism from the ``trainer`` config."""
    device = resolve_device(str(t.device))
    dist_env = distributed.setup(str(t.strategy), device)
    if dist_env.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_env.local_rank)
        torch.cuda.set_device(device)
    if not dist_env.is_main:
        logging.getLogger("cellcls").setLevel(logging.WARNING)
    if device.type == "cpu":
        set_cpu_threads(t.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist_env.enabled else 1)
    amp = autocast_dtype(str(t.precision), device)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Runtime(device, dist_env, amp, memory_format(t.channels_last))
