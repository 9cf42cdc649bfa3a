"""Exported configurations (`anoseg export` files) written and read in one place.

Three kinds of file: a single configuration (the TrialConfig fields at the top level, plus the
information sections ``provenance``, ``selection`` and ``metrics``), the best trial per category under
``categories: {name: configuration}``, or a Pareto set under ``pareto: [configuration, ...]``.
A plain trial configuration file reads as a single one. The information sections are skipped when a
configuration is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from anoseg.config import TrialConfig, read_yaml
from anoseg.errors import ConfigError
from anoseg.files import write_text_atomic

#: Sections of an exported configuration that are not TrialConfig fields.
EXPORT_SECTIONS = ("provenance", "selection", "metrics")


@dataclass
class ExportedFile:
    """An `anoseg export` YAML file (or a plain trial configuration).

    kind: "single" (one configuration), "per_category" (``categories: {name: config}``) or "pareto"
    (``pareto: [config, ...]``). ``entries`` maps a key (category name or trial id; "" for single)
    to the raw configuration with its provenance / metrics sections.
    """

    path: Path
    kind: str
    entries: dict[str, dict[str, Any]]
    header: dict[str, Any] = field(default_factory=dict)

    def config(self, key: str = "") -> TrialConfig:
        raw = {k: v for k, v in self.entries[key].items() if k not in EXPORT_SECTIONS}
        where = str(self.path) if self.kind == "single" else f"{self.path}: {self._section}.{key}"
        return TrialConfig.from_dict(raw, source=where)

    @property
    def _section(self) -> str:
        return "categories" if self.kind == "per_category" else "pareto"

    def select(self, category: str | None = None, trial: str | None = None) -> TrialConfig:
        """The one configuration to use: per-category files need `category`, Pareto files `trial`."""
        if self.kind == "single":
            return self.config()
        if self.kind == "per_category":
            if category is None:
                raise ConfigError(f"{self.path} holds one configuration per category "
                                  f"({', '.join(self.entries)}); choose one with --category")
            if category not in self.entries:
                raise ConfigError(f"{self.path} has no configuration for category {category!r}; "
                                  f"it has: {', '.join(self.entries)}")
            return self.config(category)
        if trial is None:
            raise ConfigError(f"{self.path} holds the Pareto set of {len(self.entries)} configurations "
                              f"(trials {', '.join(self.entries)}); choose one with --trial")
        if trial not in self.entries:
            raise ConfigError(f"{self.path} has no trial {trial!r}; it has: {', '.join(self.entries)}")
        return self.config(trial)

    def metrics(self, key: str = "") -> dict[str, Any]:
        return dict(self.entries[key].get("metrics") or {})

    def selection(self, key: str = "") -> dict[str, Any]:
        """How the search chose this configuration (protocol, validation_share, seed); {} for a plain file."""
        return dict(self.entries[key].get("selection") or {})


def read_exported(path: str | Path) -> ExportedFile:
    """Read an exported configuration (single, per-category or Pareto) or a plain trial configuration."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping (a trial configuration or an `anoseg export` file)")
    header = dict(raw.get("provenance") or {}) if ("categories" in raw or "pareto" in raw) else {}
    if "categories" in raw:
        cats = raw["categories"]
        if not isinstance(cats, Mapping) or not cats or not all(isinstance(v, Mapping) for v in cats.values()):
            raise ConfigError(f"{path}: categories must map each category name to its configuration")
        return ExportedFile(path, "per_category", {str(k): dict(v) for k, v in cats.items()}, header)
    if "pareto" in raw:
        items = raw["pareto"]
        if not isinstance(items, list) or not items or not all(isinstance(v, Mapping) for v in items):
            raise ConfigError(f"{path}: pareto must be a non-empty list of configurations")
        entries = {}
        for i, item in enumerate(items):
            key = str((item.get("provenance") or {}).get("trial_id") or i)
            entries[key] = dict(item)
        return ExportedFile(path, "pareto", entries, header)
    return ExportedFile(path, "single", {"": dict(raw)}, dict(raw.get("provenance") or {}))


def load_exported(path: str | Path, category: str | None = None, trial: str | None = None) -> TrialConfig:
    """The TrialConfig of an `anoseg export` file (provenance and metrics sections ignored) or of a
    plain configuration file. Per-category files need `category`, Pareto files `trial` (a trial id)."""
    return read_exported(path).select(category, trial)


def write_exported(path: str | Path, document: Mapping[str, Any], header: Sequence[str]) -> Path:
    """Write an export document as YAML under a comment header (one `# line` per entry)."""
    text = "".join(f"# {line}\n" for line in header)
    text += yaml.safe_dump(dict(document), sort_keys=False, default_flow_style=None, width=120)
    return write_text_atomic(path, text)
