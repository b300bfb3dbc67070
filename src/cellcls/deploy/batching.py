"""Dynamic micro-batching: images from concurrent requests go through the model together.

One worker thread owns the model (Grad-CAM's hooks are not re-entrant, and one forward pass over 16 images costs
far less than 16 passes over one). It takes whatever requests are waiting, up to ``max_batch`` images, without
waiting for more: a lone request is not delayed, and under load batches form while the previous one runs.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from cellcls.deploy.predictor import Predictor


@dataclass
class _Job:
    image: torch.Tensor  # uint8 C x H x W
    cam: bool
    future: Future


class MicroBatcher:
    """``submit(image, cam)`` returns a future of ``(probabilities, cam map or None, outside or None)``."""

    def __init__(self, predictor: Predictor, max_batch: int = 32, cam_layer: str | None = None) -> None:
        self.predictor = predictor
        self.max_batch = max_batch
        self.cam_layer = cam_layer
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="cellcls-batcher", daemon=True)
        self._worker.start()

    @property
    def alive(self) -> bool:
        """Whether the thread that runs the model is still there (the readiness probe asks)."""
        return self._worker.is_alive()

    def submit(self, image: torch.Tensor, cam: bool) -> Future:
        future: Future = Future()
        self._queue.put(_Job(image, cam and self.predictor.supports_cam, future))
        return future

    def _take(self) -> list[_Job]:
        jobs = [self._queue.get()]
        while len(jobs) < self.max_batch:
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            try:
                images = torch.stack([j.image for j in jobs])
                probs, outside = self.predictor.assess(images)
                maps: dict[int, np.ndarray] = {}
                wanted = [i for i, j in enumerate(jobs) if j.cam]
                if wanted:
                    from cellcls.evaluation.figures import cam_maps

                    computed = cam_maps(self.predictor, images[wanted].numpy(), self.cam_layer)  # type: ignore[arg-type]
                    maps = dict(zip(wanted, computed))
                for i, job in enumerate(jobs):
                    job.future.set_result((probs[i], maps.get(i), None if outside is None else bool(outside[i])))
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
