"""Training throughput of cellcls against the loader a user would write by hand and the model-only ceiling.

    python scripts/benchmark.py recipe=s1_malaria_lenet dataset.root=~/data/malaria [device=auto|cpu|cuda]
    python scripts/benchmark.py scaling=1000,10000,50000 [device=...]
    python scripts/benchmark.py recipe=s1_malaria_lenet dataset.root=... model=timm model.arch=efficientnet_b0

The first form measures, on the same data, model, batch size and augmentation (any ``key=value`` Hydra override
is passed on to the recipe):

  (a) cellcls: cellcls.training.loop.train_one_epoch, as fit runs it (decoded cache, device-side batches and augmentation);
  (b) naive: torchvision ImageFolder + PIL + transforms v2 + DataLoader(num_workers=<cores>, shuffle=True), NCHW;
  (c) ceiling: pre-decoded float batches already on the device, no augmentation, channels_last: the model alone;

plus evaluation throughput (cellcls.training.loop.evaluate on the validation split), the time to build the decoded cache (into a fresh
folder), peak RSS and peak GPU memory, and prints the ratios a/b and a/c. The second form trains cellcls on the
synthetic set at each size, each in its own process, and reports epoch time and peak RSS (which should stay flat:
the cache is memory-mapped). Both append a row to docs/BENCHMARKS.md (``output=<file>``, or ``output=none``).
Other settings: epochs=<timed epochs, default 2>, warmup=<untimed epochs, default 1>, naive_workers=<default: cores>,
profile=true (also print the PyTorch profiler's top operators for cellcls and the share of time spent waiting for
input).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cellcls.config import compose_config
from cellcls.data.cache import decode_split
from cellcls.data.datamodule import make_splits, resolve_root
from cellcls.data.layouts import scan
from cellcls.data.layouts.folders import ClassFolders
from cellcls.data.transforms import build_augment
from cellcls.models import model_label
from cellcls.training.build import Job, build_job
from cellcls.training.loop import evaluate, train_one_epoch
from cellcls.infra.runtime import resolve_device

REPO = Path(__file__).resolve().parents[1]
OWN = ("recipe", "device", "epochs", "warmup", "output", "scaling", "naive_workers", "profile", "_scaling_child")


def parse(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    own: dict[str, str] = {}
    overrides: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"benchmark: expected key=value, got {arg!r}")
        (own.__setitem__(key, value) if key in OWN else overrides.append(arg))
    return own, overrides


def load_config(recipe: str | None, overrides: Sequence[str], device: str) -> DictConfig:
    extra = [f"experiment={recipe}"] if recipe else []
    cfg = compose_config([*extra, *overrides])
    with open_dict(cfg):
        cfg.trainer.device = device
        cfg.trainer.progress_bar = False
    return cfg


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def peak_rss_mb() -> float:
    """This process' peak resident memory plus that of its finished children (DataLoader workers), MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) / 1024


def rss_parts_mb() -> dict[str, float]:
    """Resident memory now, split into anonymous (the process' own) and file-backed pages (here: the memory-mapped
    cache, which the kernel can drop and re-read at will), from /proc/self/status (Linux only)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return {}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {f"{key.lower()}_mb": int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile") if key in fields}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(job: Job) -> None:
    """One epoch of cellcls' training, the call fit makes (with the run's accumulation, MixUp/CutMix and EMA)."""
    train_one_epoch(job.train_step(), job.data.loaders["train"])


# ---- (a) cellcls ---------------------------------------------------------------------------------------------
def measure_cellcls(cfg: DictConfig, epochs: int, warmup: int, run_dir: Path) -> dict[str, float]:
    trainer = build_job(cfg, run_dir)
    device = trainer.runtime.device
    n_train = len(trainer.data.splits["train"])
    n_val = len(trainer.data.splits["val"])
    for epoch in range(1, warmup + 1):
        train_epoch(trainer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for epoch in range(epochs):
        train_epoch(trainer)
    sync(device)
    train_s = time.perf_counter() - start
    evaluate(trainer.net, trainer.data.loaders["val"], trainer.runtime)
    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        evaluate(trainer.net, trainer.data.loaders["val"], trainer.runtime)
    sync(device)
    eval_s = time.perf_counter() - start
    return {
        "train_images_per_s": n_train * epochs / train_s,
        "eval_images_per_s": n_val * epochs / eval_s,
        "train_images": n_train,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan"),
        "trainer": trainer,
    }


# ---- shared by (b) and (c) -------------------------------------------------------------------------------
def step_fn(trainer: Job, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """One optimisation step with the trainer's loss, autocast and grad scaling, on a fresh model."""
    from cellcls.scoring.losses import l2_penalty

    scaler = torch.amp.GradScaler(trainer.runtime.device.type, enabled=trainer.runtime.amp_dtype is torch.float16)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with trainer.runtime.autocast():
            loss = trainer.loss_fn(model(x), y) + l2_penalty(model)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def fresh_model(trainer: Job, cfg: DictConfig, layout: torch.memory_format):
    from cellcls.models import build_model
    from cellcls.training.optim import build_optimizer

    prep = trainer.data.preprocessing
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), prep.channels, len(trainer.data.classes),
                        prep.image_size).to(trainer.runtime.device, memory_format=layout).train()
    optimizer = build_optimizer(model, OmegaConf.to_container(cfg.optim, resolve=True))
    return model, optimizer


# ---- (b) naive -----------------------------------------------------------------------------------------------
def measure_naive(trainer: Job, cfg: DictConfig, epochs: int, warmup: int, workers: int) -> float:
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    root = resolve_root(cfg.dataset)
    classes, folders = ClassFolders.locate(cfg.dataset, root)
    wanted = {c.lower(): c for c in classes}

    class Folder(datasets.ImageFolder):
        # the data set's classes only (a download may hold other folders beside them)
        def find_classes(self, directory):
            found = sorted(e.name for e in os.scandir(directory) if e.is_dir() and e.name.lower() in wanted)
            return found, {name: classes.index(wanted[name.lower()]) for name in found}

    prep = trainer.data.preprocessing
    steps = [v2.ToImage()]
    if prep.channels == 1:
        steps.append(v2.Grayscale())
    steps.append(v2.Resize(prep.image_size, antialias=True))
    steps += build_augment(OmegaConf.to_container(cfg.augment)) if cfg.get("augment") else []
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if prep.mean is not None:
        steps.append(v2.Normalize(prep.mean, prep.std))
    data = Folder(str(folders["train"]), transform=v2.Compose(steps))
    loader = DataLoader(data, batch_size=int(cfg.dataset.batch_size), shuffle=True, num_workers=workers,
                        pin_memory=trainer.runtime.device.type == "cuda")
    model, optimizer = fresh_model(trainer, cfg, torch.contiguous_format)
    step = step_fn(trainer, model, optimizer)
    device = trainer.runtime.device

    def epoch() -> int:
        seen = 0
        for x, y in loader:
            step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            seen += len(y)
        return seen

    for _ in range(warmup):
        epoch()
    sync(device)
    start = time.perf_counter()
    seen = sum(epoch() for _ in range(epochs))
    sync(device)
    return seen / (time.perf_counter() - start)


# ---- (c) ceiling ---------------------------------------------------------------------------------------------
def measure_ceiling(trainer: Job, cfg: DictConfig, epochs: int, warmup: int) -> float:
    loader = trainer.data.loaders["train"]
    augment, loader.augment = getattr(loader, "augment", None), None
    batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in loader]  # on the device already
    loader.augment = augment
    model, optimizer = fresh_model(trainer, cfg, torch.channels_last)
    step = step_fn(trainer, model, optimizer)
    for _ in range(warmup):
        for x, y in batches:
            step(x, y)
    sync(trainer.runtime.device)
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in batches:
            step(x, y)
    sync(trainer.runtime.device)
    return sum(len(y) for _, y in batches) * epochs / (time.perf_counter() - start)


def profile_cellcls(trainer: Job, cfg: DictConfig) -> str:
    """One epoch of cellcls's batches through the training step under the PyTorch profiler: the top operators
    and the share of wall time the loop waits for its next batch (gather, copy, augmentation)."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer = fresh_model(trainer, cfg, trainer.runtime.memory_format)
    step = step_fn(trainer, model, optimizer)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.runtime.device.type == "cuda" else [])
    waited = 0.0
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        batches = iter(trainer.data.loaders["train"])
        while True:
            t0 = time.perf_counter()
            try:
                x, y = next(batches)
            except StopIteration:
                break
            waited += time.perf_counter() - t0
            step(x, y)
        sync(trainer.runtime.device)
        total = time.perf_counter() - start
    key = "self_cuda_time_total" if trainer.runtime.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=12)
    return f"{table}\nwaiting for the next batch: {100 * waited / total:.1f}% of {total:.2f} s (profiled epoch)"


def measure_cache_build(cfg: DictConfig) -> tuple[int, float]:
    """Decode the training split into an empty cache folder with all cores: (images, seconds)."""
    ds = cfg.dataset
    root = resolve_root(ds)
    scanned = scan(ds, root)
    splits, _ = make_splits(ds, scanned.splits, scanned.classes, int(cfg.seed))
    with tempfile.TemporaryDirectory(prefix="cellcls-bench-cache-") as tmp:
        start = time.perf_counter()
        decode_split(splits["train"], int(ds.channels), list(ds.image_size), Path(tmp), progress=False)
        return len(splits["train"]), time.perf_counter() - start


# ---- reporting -----------------------------------------------------------------------------------------------
def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {cores()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {cores()} CPU cores, CPU only"


def versions() -> str:
    import torchvision

    return f"torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}"


def append_row(output: str, marker: str, row: str) -> None:
    """Insert ``row`` above ``marker`` in the results file (the tables grow downwards)."""
    if output == "none":
        return
    path = Path(output)
    text = path.read_text() if path.is_file() else ""
    tag = f"<!-- {marker} -->"
    if tag not in text:
        raise SystemExit(f"benchmark: {path} has no '{tag}' line to add the row above")
    path.write_text(text.replace(tag, row + "\n" + tag, 1))
    print(f"row added to {path}")


def command_line() -> str:
    return "python scripts/benchmark.py " + " ".join(sys.argv[1:])


def main_benchmark(own: dict[str, str], overrides: list[str]) -> None:
    device = resolve_device(own.get("device", "auto"), setting="device")
    cfg = load_config(own.get("recipe"), overrides, str(device))
    epochs, warmup = int(own.get("epochs", 2)), int(own.get("warmup", 1))
    workers = int(own.get("naive_workers", cores()))
    with tempfile.TemporaryDirectory(prefix="cellcls-bench-run-") as run_dir:
        cache_images, cache_s = measure_cache_build(cfg)
        a = measure_cellcls(cfg, epochs, warmup, Path(run_dir))
        trainer = a.pop("trainer")
        c = measure_ceiling(trainer, cfg, epochs, warmup)
        b = measure_naive(trainer, cfg, epochs, warmup, workers)
        if own.get("profile", "false").lower() == "true":
            print(profile_cellcls(trainer, cfg))
    result = {
        "recipe": f"{own.get('recipe', 'default')} ({model_label(cfg.model)})", "device": machine(device), "images": a["train_images"],
        "batch": int(cfg.dataset.batch_size), "cellcls": a["train_images_per_s"], "naive": b, "ceiling": c,
        "eval": a["eval_images_per_s"], "cache_per_s": cache_images / cache_s,
        "cache_per_s_per_core": cache_images / cache_s / cores(), "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": a["peak_gpu_mb"],
    }
    print(json.dumps(result, indent=2))
    print(f"cellcls {a['train_images_per_s']:.0f} img/s | naive {b:.0f} img/s | ceiling {c:.0f} img/s | "
          f"a/b {a['train_images_per_s'] / b:.2f}x | a/c {a['train_images_per_s'] / c:.2f}x | eval "
          f"{a['eval_images_per_s']:.0f} img/s | cache build {result['cache_per_s']:.0f} img/s "
          f"({result['cache_per_s_per_core']:.0f} per core)")
    gpu = "" if device.type != "cuda" else f"{a['peak_gpu_mb']:.0f}"
    row = (f"| {datetime.now(timezone.utc):%Y-%m-%d} | {result['recipe']} | {result['device']} | {versions()} | "
           f"{result['images']} | {result['batch']} | {a['train_images_per_s']:.0f} | {b:.0f} | {c:.0f} | "
           f"{a['train_images_per_s'] / b:.2f} | {a['train_images_per_s'] / c:.2f} | {a['eval_images_per_s']:.0f} | "
           f"{result['cache_per_s']:.0f} ({result['cache_per_s_per_core']:.0f}/core) | {result['peak_rss_mb']:.0f} | "
           f"{gpu} | `{command_line()}` |")
    append_row(own.get("output", str(REPO / "docs" / "BENCHMARKS.md")), "results:throughput", row)


def scaling_child(size: int, own: dict[str, str], overrides: list[str]) -> None:
    """One size of the scaling run, in its own process so its peak RSS is its own."""
    per_class = size // 2
    device = resolve_device(own.get("device", "auto"), setting="device")
    cfg = load_config(None, [f"dataset.render.train_per_class={per_class}", "dataset.render.test_per_class=50",
                             *overrides], str(device))
    with tempfile.TemporaryDirectory(prefix="cellcls-bench-run-") as run_dir:
        trainer = build_job(cfg, Path(run_dir))
        rss_before = peak_rss_mb()
        train_epoch(trainer)
        sync(trainer.runtime.device)
        start = time.perf_counter()
        train_epoch(trainer)
        sync(trainer.runtime.device)
        seconds = time.perf_counter() - start
        images = len(trainer.data.splits["train"])
        memory = rss_parts_mb()
    print(json.dumps({"size": size, "train_images": images, "epoch_s": seconds, "rss_before_training_mb": rss_before,
                      "peak_rss_mb": peak_rss_mb(), **memory}))


def main_scaling(own: dict[str, str], overrides: list[str]) -> None:
    rows = []
    for size in (int(s) for s in own["scaling"].split(",")):
        child = subprocess.run([sys.executable, __file__, f"_scaling_child={size}",
                                *(f"{k}={v}" for k, v in own.items() if k in ("device",)), *overrides],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise SystemExit(f"benchmark: the {size}-image run failed:\n{child.stderr[-3000:]}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['train_images']:>7} training images: epoch {r['epoch_s']:.1f} s "
              f"({r['train_images'] / r['epoch_s']:.0f} img/s), peak RSS {r['peak_rss_mb']:.0f} MB; after the epoch "
              f"anonymous {r.get('rssanon_mb', float('nan')):.0f} MB + file-backed {r.get('rssfile_mb', float('nan')):.0f} MB")
    device = resolve_device(own.get("device", "auto"), setting="device")
    cells = " / ".join(f"{r['train_images']}: {r['epoch_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MB "
                       f"(anon {r.get('rssanon_mb', float('nan')):.0f} + file {r.get('rssfile_mb', float('nan')):.0f})"
                       for r in rows)
    row = f"| {datetime.now(timezone.utc):%Y-%m-%d} | {machine(device)} | {versions()} | {cells} | `{command_line()}` |"
    append_row(own.get("output", str(REPO / "docs" / "BENCHMARKS.md")), "results:scaling", row)


def main(argv: Sequence[str] | None = None) -> None:
    own, overrides = parse(sys.argv[1:] if argv is None else argv)
    if "_scaling_child" in own:
        scaling_child(int(own["_scaling_child"]), own, overrides)
    elif "scaling" in own:
        main_scaling(own, overrides)
    else:
        main_benchmark(own, overrides)


if __name__ == "__main__":
    main()
