"""A trial's result, typed: per-category metrics, their means, memory and fidelity.

One report is made after every fidelity unit (a category evaluated, or an epoch of every category);
the last one is the trial's result. :meth:`TrialReport.to_flat` / :meth:`TrialReport.from_flat`
are the one conversion to and from the flat dict of scalars that Ray Tune needs
(``{"aupro": ..., "<category>/aupro": ..., "fidelity": 2, ...}``). No torch here: the run-folder
readers use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from anoseg.metrics import CATEGORY_METRICS, MEMORY_METRICS

CATEGORIES_UNIT, EPOCHS_UNIT = "categories", "epochs"


def mean_metrics(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The mean over categories of every metric that all of them have."""
    if not per_category:
        return {}
    values = list(per_category.values())
    return {k: sum(float(m[k]) for m in values) / len(values) for k in CATEGORY_METRICS if all(k in m for m in values)}


@dataclass
class TrialReport:
    """What a trial knows after one fidelity unit.

    ``per_category``: {category: {metric: value}} of the categories evaluated so far (a trainable head:
    every category, after the latest epoch; its ``loss`` too). ``fidelity`` of ``fidelity_total`` units
    (``fidelity_unit`` "categories" or "epochs") are done. ``memory``: peak_rss_mb, peak_gpu_mb.
    """

    per_category: dict[str, dict[str, float]]
    fidelity: int
    fidelity_total: int
    fidelity_unit: str = CATEGORIES_UNIT
    memory: dict[str, float | None] = field(default_factory=dict)
    category: str | None = None  # the category just evaluated (categories unit)
    epoch: int | None = None  # the epoch just trained (epochs unit)
    loss: float | None = None  # its mean training loss over the categories
    resumed_from: int = 0  # the epoch a resumed trial continued from
    train_share: float = 1.0  # the share of each category's training images the head was fitted on

    @property
    def mean(self) -> dict[str, float]:
        return mean_metrics(self.per_category)

    @property
    def categories_done(self) -> int:
        return len(self.per_category)

    def to_flat(self) -> dict[str, Any]:
        """The flat dict of scalars Ray Tune takes: means, ``<category>/<metric>``, memory, progress."""
        flat: dict[str, Any] = {**self.mean, **self.memory}
        flat.update({f"{c}/{k}": v for c, metrics in self.per_category.items() for k, v in metrics.items()})
        flat.update(fidelity=self.fidelity, fidelity_total=self.fidelity_total, fidelity_unit=self.fidelity_unit,
                    categories_done=self.categories_done, resumed_from=self.resumed_from, train_share=self.train_share)
        for key in ("category", "epoch", "loss"):
            if getattr(self, key) is not None:
                flat[key] = getattr(self, key)
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "TrialReport":
        """Inverse of :meth:`to_flat`; other keys (Tune's own, the adapter's) are ignored."""
        per_category: dict[str, dict[str, float]] = {}
        for key, value in flat.items():
            category, sep, name = key.rpartition("/")
            if sep and category and (name in CATEGORY_METRICS or name == "loss"):
                per_category.setdefault(category, {})[name] = value
        fidelity = int(flat.get("fidelity") or flat.get("categories_done") or 0)
        return cls(
            per_category=per_category, fidelity=fidelity, fidelity_total=int(flat.get("fidelity_total") or fidelity),
            fidelity_unit=str(flat.get("fidelity_unit") or CATEGORIES_UNIT),
            memory={k: flat[k] for k in MEMORY_METRICS if k in flat}, category=flat.get("category"),
            epoch=flat.get("epoch"), loss=flat.get("loss"), resumed_from=int(flat.get("resumed_from") or 0),
            train_share=float(flat.get("train_share") or 1.0),
        )


@dataclass
class TrialResult:
    """A finished trial: its configuration, the weights it ran with and its last report."""

    config: dict[str, Any]
    weights: str
    pretrained: bool
    report: TrialReport

    @property
    def per_category(self) -> dict[str, dict[str, float]]:
        return self.report.per_category

    @property
    def mean(self) -> dict[str, float]:
        return self.report.mean

    def to_dict(self) -> dict[str, Any]:
        """{"config", "weights", "pretrained", "categories": {name: metrics}, "mean", "peak_memory"}
        (what `anoseg evaluate --json` writes)."""
        return {"config": self.config, "weights": self.weights, "pretrained": self.pretrained,
                "categories": self.per_category, "mean": self.mean, "peak_memory": dict(self.report.memory)}
