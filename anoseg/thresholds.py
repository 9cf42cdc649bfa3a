"""Decision thresholds: where an image fails and a pixel is anomalous."""
from __future__ import annotations

from typing import Any

import numpy as np

from anoseg.errors import DataError


def f1_max_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """(best F1, threshold) over thresholds ``score >= t``; the threshold lies midway between the F1-max
    score and the next lower score present (any class), so the decisions on these data are unchanged."""
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    scores = np.asarray(scores).reshape(-1)
    if not labels.any():
        raise DataError("a threshold by F1 needs at least one positive (defective) sample")
    pos = np.sort(scores[labels])
    neg = np.sort(scores[~labels])
    candidates = np.unique(pos)
    tp = pos.size - np.searchsorted(pos, candidates, side="left")
    fp = neg.size - np.searchsorted(neg, candidates, side="left")
    f1 = 2.0 * tp / (tp + fp + pos.size)
    best = int(np.argmax(f1))
    t = candidates[best]
    below = max(pos[pos < t].max(initial=-np.inf), neg[neg < t].max(initial=-np.inf))
    threshold = float(t) if not np.isfinite(below) else float((float(t) + float(below)) / 2)
    return float(f1[best]), threshold


def choose_thresholds(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray,
                      where: str) -> dict[str, Any]:
    """Image and pixel thresholds at the F1 maximum of these data (`where` names them in "method"),
    with the image F1, precision and recall there; without both good and defective images, the
    highest score (nothing seen fails)."""
    labels = np.asarray(labels).astype(bool)
    if not (labels.any() and not labels.all()):
        return {"image": float(scores.max()), "pixel": float(maps.max()),
                "method": f"max of the scores on {where} (it lacks defective or good images)"}
    image_f1, image_t = f1_max_threshold(labels, scores)
    pixel_f1, pixel_t = f1_max_threshold(masks, maps)
    predicted = scores >= image_t
    return {
        "image": image_t, "pixel": pixel_t, "method": f"f1_max on {where}",
        "image_f1": image_f1, "pixel_f1": pixel_f1,
        "image_precision": float((predicted & labels).sum() / max(1, predicted.sum())),
        "image_recall": float((predicted & labels).sum() / labels.sum()),
    }
