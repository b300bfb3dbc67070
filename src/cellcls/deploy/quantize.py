"""``export quantize=int8``: a smaller, faster ONNX model, checked against the fp32 one before it is kept.

onnxruntime's static quantisation in QDQ form: int8 weights per output channel, uint8 activations whose ranges are
calibrated on images of the run's training split (dynamic quantisation would leave the convolutions, most of a
CNN's time, in float). The out-of-distribution score stays in float (its precision matrix spans a range int8
cannot hold), and so do the normalisation in front and the softmax behind. The int8 model is then scored beside
the fp32 one on the test split: accuracy, ROC-AUC, agreement of labels and flags, file size and CPU latency at
batch 1 and 32. A drop in accuracy beyond ``max_drop`` refuses the model, with the numbers.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellcls.deploy.runtimes import CARD_KEY, card_path, load_exported
from cellcls.errors import ConfigError, DataError
from cellcls.infra.run_folder import atomic_write, write_json
from cellcls.scoring.metrics import roc_auc

METHOD = "static int8 (QDQ): per-channel int8 weights, uint8 activations calibrated on training images"
OP_TYPES = ["Conv", "Gemm", "MatMul"]
DEFAULT_MAX_DROP = 0.01  # accuracy, absolute


@dataclass
class Measured:
    accuracy: float
    roc_auc: float
    size_mb: float
    latency_ms_batch1: float
    latency_ms_batch32: float


@dataclass
class QuantReport:
    fp32: Measured
    int8: Measured
    label_agreement: float
    flag_agreement: float | None
    test_images: int
    calibration_images: int

    @property
    def accuracy_drop(self) -> float:
        return self.fp32.accuracy - self.int8.accuracy

    def lines(self) -> list[str]:
        f, q = self.fp32, self.int8
        out = [f"int8 against fp32 on {self.test_images} test images (calibrated on {self.calibration_images} training images):",
               f"  accuracy {q.accuracy:.4f} vs {f.accuracy:.4f} (drop {self.accuracy_drop:+.4f}); ROC-AUC {q.roc_auc:.4f} vs "
               f"{f.roc_auc:.4f}; same label on {100 * self.label_agreement:.1f}% of images",
               f"  file {q.size_mb:.2f} MB vs {f.size_mb:.2f} MB; CPU latency batch 1 {q.latency_ms_batch1:.2f} ms vs "
               f"{f.latency_ms_batch1:.2f} ms, batch 32 {q.latency_ms_batch32:.1f} ms vs {f.latency_ms_batch32:.1f} ms"]
        if self.flag_agreement is not None:
            out.append(f"  out-of-distribution flags agree on {100 * self.flag_agreement:.1f}% of images")
        return out


def _images(loaded: Any, split: str, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 images and labels of ``split`` of the run's own data (a seeded sample of ``limit`` of them)."""
    from cellcls.evaluation.evaluate import ImageRows, load_data

    samples = load_data(loaded, split, None).samples
    rows = ImageRows(samples, loaded.preprocessing)  # decoded as the cache holds them
    order = np.arange(len(samples))
    if limit is not None and limit < len(order):
        order = np.sort(np.random.default_rng(seed).choice(order, limit, replace=False))
    images, labels = [], []
    for i in order:
        try:
            images.append(torch.from_numpy(rows[int(i)]))
            labels.append(samples.labels[int(i)])
        except DataError:
            continue  # counted by the training run already; the others still calibrate
    if not images:
        raise ConfigError(f"quantize=int8 needs images of the {split} split; none could be read")
    return torch.stack(images), np.asarray(labels)


class _Calibration:
    """onnxruntime's CalibrationDataReader: one training image at a time, as the graph's float input."""

    def __init__(self, images: torch.Tensor) -> None:
        self.batches = iter(images.float().div(255).numpy()[:, None])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"image": batch}


def _float_nodes(model_path: Path) -> list[str]:
    """Nodes that read the out-of-distribution rule's buffers: left in float."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    return [n.name for n in graph.node if any("ood_" in i for i in n.input)]


def _latency_ms(path: Path, shape: tuple[int, ...], batch: int, repeats: int = 20) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    session.run(None, {"image": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"image": x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def _measure(path: Path, images: torch.Tensor, labels: np.ndarray) -> tuple[Measured, np.ndarray, np.ndarray | None]:
    model = load_exported(path, device="cpu")
    probs, flags = model.assess(images)
    predicted = model.decision.labels(probs)
    shape = tuple(images.shape[1:])
    return (Measured(float((predicted == labels).mean()), float(roc_auc(labels, probs)), path.stat().st_size / 2**20,
                     _latency_ms(path, shape, 1), _latency_ms(path, shape, 32)), predicted, flags)


def check_max_drop(value: object) -> float:
    """``max_drop=``: the accuracy an int8 model may lose, from 0 to 1."""
    try:
        drop = float(str(value))
    except ValueError:
        drop = -1.0
    if not 0.0 <= drop <= 1.0:
        raise ConfigError(f"max_drop={value!r} is not valid; expected the accuracy an int8 model may lose against fp32, "
                          "a number from 0 to 1 (e.g. 0.01)")
    return drop


def export_int8(loaded: Any, fmt: str, output: Path, opset: int = 18, runtime: str | None = None,
                calibration: int = 200, max_drop: float = DEFAULT_MAX_DROP) -> tuple[Path, QuantReport]:
    """The fp32 ONNX export (in a temporary folder), its int8 copy checked by :func:`quantize_int8`, written to
    ``output``: the file for ``fmt=onnx``, the folder (holding the int8 model) for ``fmt=web``."""
    from cellcls.deploy.export import export_model
    from cellcls.deploy.web_export import MODEL_FILE, export_web

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_model(loaded, "onnx", Path(tmp) / "model.onnx", opset=opset)
        target = output if fmt == "onnx" else Path(tmp) / "model.int8.onnx"
        report = quantize_int8(loaded, fp32, target, calibration, max_drop)
        path = target if fmt == "onnx" else export_web(loaded, output, runtime, model=target) / MODEL_FILE
    return path, report


def quantize_int8(loaded: Any, fp32_path: Path, output: Path, calibration: int = 200,
                  max_drop: float = DEFAULT_MAX_DROP) -> QuantReport:
    """Quantise the exported ``fp32_path`` to ``output`` (card beside it, as for any export) when the accuracy drop
    on the test split is at most ``max_drop``; ConfigError with the numbers otherwise (nothing is written)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calib, _ = _images(loaded, "train", calibration, int(loaded.config.seed))
    test, labels = _images(loaded, "test")
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), _Calibration(calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=OP_TYPES, nodes_to_exclude=_float_nodes(prepared))
        proto = onnx.load(str(quantized))
        card = json.loads(card_path(fp32_path).read_text())
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = CARD_KEY, json.dumps(card)
        onnx.save(proto, str(quantized))
        write_json(card_path(quantized), card)
        fp32, fp32_labels, fp32_flags = _measure(fp32_path, test, labels)
        int8, int8_labels, int8_flags = _measure(quantized, test, labels)
        report = QuantReport(fp32, int8, float((fp32_labels == int8_labels).mean()),
                             None if fp32_flags is None or int8_flags is None else float((fp32_flags == int8_flags).mean()),
                             len(labels), len(calib))
        if report.accuracy_drop > max_drop:
            raise ConfigError("\n".join([*report.lines(), f"the int8 model loses {report.accuracy_drop:.4f} accuracy, more than "
                                         f"max_drop={max_drop:g}; it was not written (keep the fp32 export, or raise max_drop=)"]))
        card["quantization"] = {"method": METHOD, "max_drop": max_drop, **asdict(report)}
        entry.value = json.dumps(card)
        atomic_write(output, proto.SerializeToString())
        write_json(card_path(output), card)
    return report
