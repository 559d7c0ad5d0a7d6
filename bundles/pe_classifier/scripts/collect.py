"""An ignite handler that keeps every case's id, label and probability from an evaluator's epoch.

MONAI's ``ClassificationSaver`` writes predictions keyed by file name only; the PE report needs ids,
labels and probabilities together in memory to bootstrap them, hence this small collector.
"""

from __future__ import annotations

import numpy as np
import torch
from ignite.engine import Engine, Events


class PredictionCollector:
    """Collect ``(id, label, probability)`` per case; reset at every epoch start (one pass = one set)."""

    def __init__(self, id_key: str = "id", pred_key: str = "pred", label_key: str = "label"):
        self.id_key, self.pred_key, self.label_key = id_key, pred_key, label_key
        self.reset()

    def reset(self, engine: Engine | None = None) -> None:
        self.ids: list[str] = []
        self.labels: list[int | None] = []
        self.probabilities: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)

    def collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):  # decollate=False: one dict of batched tensors
            batch, output = _split(batch), _split(output)
        for item, out in zip(batch, output):
            self.ids.append(str(item.get(self.id_key, len(self.ids))))
            self.probabilities.append(float(torch.as_tensor(out[self.pred_key]).reshape(-1)[0]))
            label = out.get(self.label_key)
            self.labels.append(
                None if label is None else int(round(float(torch.as_tensor(label).reshape(-1)[0])))
            )

    @property
    def has_labels(self) -> bool:
        return bool(self.labels) and all(v is not None for v in self.labels)

    def arrays(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(ids, labels int, probabilities float)``; labels are -1 where unknown."""
        labels = np.asarray([-1 if v is None else v for v in self.labels], dtype=np.int64)
        return list(self.ids), labels, np.asarray(self.probabilities, dtype=np.float64)


def _split(batch: dict) -> list[dict]:
    n = len(next(iter(v for v in batch.values() if isinstance(v, (torch.Tensor, list)))))
    return [
        {k: (v[i] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()} for i in range(n)
    ]
