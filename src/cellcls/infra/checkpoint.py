"""The checkpoint schema: one writer, one reader, versioned.

A checkpoint holds what a later reader needs without the code that wrote it: the model's weights and spec, the
class names, the preprocessing, the resolved config, the epoch history and the monitored metric; and, for resuming,
the optimiser, scheduler, grad-scaler and callback states. It is read with ``weights_only=True`` (tensors and
plain containers only: no pickled code runs), and its config is refused when it names a class to create that is not
one of cellcls's own (:mod:`cellcls.config.targets`).

Versions: 1 (cellcls 0.1, early stopping's state at the top level) loads for evaluation, prediction and export;
resuming needs version 2, because the config layout changed with it.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cellcls.config.targets import check_targets
from cellcls.infra.run_folder import LAST, RunFolder, atomic_write

FORMAT = "cellcls-checkpoint"
VERSION = 2


@dataclass
class Checkpoint:
    epoch: int
    model: dict[str, Any]  # the validated network's state dict (the weights' EMA when trainer.ema_decay is set)
    model_spec: dict[str, Any]  # the `model` config section: name, head and architecture options
    classes: list[str]
    preprocessing: dict[str, Any]  # see cellcls.data.preprocessing.Preprocessing
    config: dict[str, Any]  # the run's resolved config
    history: list[dict[str, Any]] = field(default_factory=list)  # one row of metrics per epoch
    monitor: dict[str, Any] = field(default_factory=dict)  # metric, mode, best, best_epoch
    # optimizer, scheduler, scaler, callbacks, position and, with an EMA, the raw weights (resume)
    training: dict[str, Any] = field(default_factory=dict)
    # the decision rule fitted on validation (cellcls.scoring.heads.Decision): temperature, threshold; {} = none
    calibration: dict[str, Any] = field(default_factory=dict)
    # the out-of-distribution rule (cellcls.scoring.ood.OODRule): training features' class means and precision, the
    # validation threshold; {} = none
    ood: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION
    path: Path | None = None  # where it was read from

    @property
    def run(self) -> RunFolder:
        assert self.path is not None, "a checkpoint built in memory has no run folder"
        return RunFolder.of_checkpoint(self.path)


def save_checkpoint(ckpt: Checkpoint, path: Path) -> Path:
    """Write ``ckpt`` to ``path`` atomically: a crash never leaves a torn file or replaces the last good one."""
    payload = {k: v for k, v in asdict(ckpt).items() if k not in ("path", "version")}
    payload["format"] = f"{FORMAT}/{VERSION}"
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def resolve_checkpoint(location: str | Path, name: str = LAST) -> Path:
    """A checkpoint file from a file path or a run folder (``<run>/checkpoints/<name>``)."""
    path = Path(location).expanduser()
    why = ""
    if path.is_dir():
        why = _run_status(RunFolder(path))
        path = RunFolder(path).checkpoints / name
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (give a .pt file or a run folder holding checkpoints/{name})"
                                f"{why}")
    return path


def _run_status(run: RunFolder) -> str:
    """``; the run ... `` when the folder's result.json says why it has no checkpoint (it diverged, failed)."""
    try:
        record = json.loads(run.result.read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(record, dict) or record.get("status") in (None, "ok"):
        return ""
    error = str(record.get("error") or "").splitlines()[:1]
    return f"; its result.json says the run {record['status']}{': ' + error[0] if error else ''}"


def load_checkpoint(location: str | Path, name: str = LAST) -> Checkpoint:
    """Read a cellcls checkpoint of any known version, safely."""
    path = resolve_checkpoint(location, name)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc) or "GLOBAL" in str(exc) or _pickles_code(path):
            raise ValueError(f"{path} is not a cellcls checkpoint: it holds pickled Python objects (code could run on "
                             "loading), so it is refused for safety") from None
        raise ValueError(f"{path} is not a readable checkpoint: not a PyTorch file, or corrupt "
                         f"({path.stat().st_size:,} bytes)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        size = path.stat().st_size
        why = "empty (0 bytes)" if size == 0 else f"truncated or corrupt ({size:,} bytes: {str(exc).splitlines()[0]})"
        raise ValueError(f"{path} is not a readable checkpoint: {why}; use the run's other checkpoint "
                         "(best.pt or last.pt) or train again") from None
    fmt = payload.get("format", "") if isinstance(payload, dict) else ""
    kind, _, version = str(fmt).partition("/")
    if kind != FORMAT or not version.isdigit():
        raise ValueError(f"{path} is not a cellcls checkpoint (expected format {FORMAT}/<version>)")
    if int(version) > VERSION:
        raise ValueError(f"{path} was written by a newer cellcls (checkpoint version {version}; this one reads up to "
                         f"{VERSION}): upgrade cellcls")
    if int(version) == 1:
        payload = _from_version_1(payload)
    # nothing a checkpoint says may be created unless cellcls made it (a tampered config's `_target_`s)
    check_targets(payload.get("config") or {}, source=f"checkpoint {path}")
    check_targets({"model": payload.get("model_spec") or {}}, source=f"checkpoint {path} (model_spec)")
    _check_contents(payload, path)
    fields = {k: payload[k] for k in Checkpoint.__dataclass_fields__ if k in payload and k not in ("path", "version")}
    return Checkpoint(**fields, version=int(version), path=path)


# what a reader needs, by field: (type, what it should be); the preprocessing's own keys are checked by its type,
# cellcls.data.preprocessing.Preprocessing.from_dict, where a model is rebuilt
_REQUIRED = {"epoch": (int, "the epoch number"), "model": (dict, "the network's state dict"),
             "model_spec": (dict, "the model section (name, options)"), "classes": (list, "the class names"),
             "preprocessing": (dict, "the input recipe (image_size, channels, mean, std)"),
             "config": (dict, "the run's config")}


def _check_contents(payload: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint that loads but could not predict: a missing or mistyped field, or weights that are not
    finite (a run that diverged keeps no such file, so this one was damaged or edited)."""
    for key, (kind, what) in _REQUIRED.items():
        if not isinstance(payload.get(key), kind):
            found = "missing" if key not in payload else f"a {type(payload[key]).__name__}"
            raise ValueError(f"{path} is not a usable checkpoint: '{key}' ({what}) is {found}; use the run's other "
                             "checkpoint (best.pt or last.pt) or train again")
    if len(payload["classes"]) < 2 or not isinstance(payload["model_spec"].get("name"), str):
        what = "fewer than 2 classes" if len(payload["classes"]) < 2 else "model_spec names no model"
        raise ValueError(f"{path} is not a usable checkpoint: {what}; use the run's other checkpoint or train again")
    bad = [k for k, v in payload["model"].items()
           if not isinstance(v, torch.Tensor) or (v.is_floating_point() and not bool(torch.isfinite(v).all()))]
    if bad:
        raise ValueError(f"{path} holds weights that are not finite numbers (NaN or infinite) in {len(bad)} tensor(s), "
                         f"first {bad[0]!r}: it cannot predict; use the run's other checkpoint (best.pt or last.pt) or "
                         "train again")


def _pickles_code(path: Path) -> bool:
    """Whether ``path`` is a plain pickle that would import or call something (read as opcodes, never run)."""
    import pickletools

    try:
        with open(path, "rb") as fh:
            return any(op.name in _CODE_OPCODES for op, _, _ in pickletools.genops(fh))
    except Exception:  # noqa: BLE001 - not a pickle at all: garbage, or a torch archive torch itself refused
        return False


_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2", "EXT4"}


def _from_version_1(old: dict[str, Any]) -> dict[str, Any]:
    new = dict(old)
    new["training"] = {
        "optimizer": old.get("optimizer"), "scheduler": old.get("scheduler"), "scaler": old.get("scaler"),
        "callbacks": {"early_stopping": {"wait": int((old.get("early_stopping") or {}).get("wait", 0))}},
    }
    return new


def require_resumable(ckpt: Checkpoint) -> None:
    """Resuming continues the run with its own config, which must be in the current layout."""
    if ckpt.version < VERSION:
        raise ValueError(f"{ckpt.path} is a version-{ckpt.version} checkpoint (cellcls 0.1): it can be evaluated, "
                         "exported and served, but not resumed; start a new run")
