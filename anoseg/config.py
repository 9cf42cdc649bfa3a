"""One trial's configuration: parsed from a dict or YAML file and validated up front."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from anoseg.errors import AnosegError, ConfigError

TOP_LEVEL_FIELDS = ("backbone", "layers", "image_size", "head", "batch_size", "seed", "device")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    weights: str = "offline"  # offline | hub | none | /path/to/file.pth


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs besides the data: backbone, layers, image size and head."""

    backbone: BackboneSpec
    layers: tuple[str, ...]
    head: Mapping[str, Any] = field(default_factory=dict)  # {"name": ..., **params}
    image_size: int = 256
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"

    @property
    def head_name(self) -> str:
        return self.head["name"]

    @property
    def head_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.head.items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = list(self.layers)
        out["head"] = dict(self.head)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "TrialConfig":
        """Validate `raw` (backbone, layers, head and their settings); errors name `source` and the field."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: expected a mapping with fields {', '.join(TOP_LEVEL_FIELDS)}")
        unknown = sorted(set(raw) - set(TOP_LEVEL_FIELDS))
        if unknown:
            raise ConfigError(f"{source}: unknown field {', '.join(unknown)}; allowed: {', '.join(TOP_LEVEL_FIELDS)}")
        for required in ("backbone", "layers", "head"):
            if required not in raw:
                raise ConfigError(f"{source}: missing field {required!r}")
        backbone = _backbone(raw["backbone"], source)
        layers = _layers(raw["layers"], source)
        head = _head(raw["head"], source)
        cfg = cls(
            backbone=backbone,
            layers=layers,
            head=head,
            image_size=_int(raw, "image_size", 256, 32, 4096, source),
            batch_size=_int(raw, "batch_size", 16, 1, 4096, source),
            seed=_int(raw, "seed", 0, 0, 2**31 - 1, source),
            device=str(raw.get("device", "auto")),
        )
        if cfg.device not in DEVICES and not cfg.device.startswith("cuda:"):
            raise ConfigError(f"{source}: device must be one of {', '.join(DEVICES)} or cuda:N, got {cfg.device!r}")
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Check names against the backbone and head registries (imported lazily: they pull in torch)."""
        from anoseg.backbones import list_backbones, validate_layers
        from anoseg.heads import create_head

        names = [b.name for b in list_backbones()]
        if self.backbone.name not in names:
            raise ConfigError(f"{source}: backbone.name {self.backbone.name!r} is unknown; allowed: {', '.join(names)}")
        try:
            validate_layers(self.backbone.name, self.layers)
            create_head(self.head_name, **self.head_params)
        except AnosegError as exc:
            raise type(exc)(f"{source}: {exc}") from None


def _backbone(value: Any, source: str) -> BackboneSpec:
    if isinstance(value, str):
        return BackboneSpec(name=value)
    if not isinstance(value, Mapping) or "name" not in value:
        raise ConfigError(f"{source}: backbone must be a name or a mapping {{name: ..., weights: offline|hub|none|<file>}}")
    unknown = sorted(set(value) - {"name", "weights"})
    if unknown:
        raise ConfigError(f"{source}: unknown field backbone.{unknown[0]}; allowed: name, weights")
    weights = value.get("weights", "offline")
    if weights is None or weights is False:
        weights = "none"
    return BackboneSpec(name=str(value["name"]), weights=str(weights))


def _layers(value: Any, source: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: layers must be a non-empty list of layer names (see `anoseg backbones --layers NAME`)")
    return tuple(value)


def _head(value: Any, source: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping) or "name" not in value:
        raise ConfigError(f"{source}: head must be a mapping with a name, e.g. {{name: patchcore, coreset_ratio: 0.1}}")
    return dict(value)


def _int(raw: Mapping[str, Any], key: str, default: int, low: int, high: int, source: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{source}: {key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def read_yaml(path: str | Path) -> Any:
    """Load a YAML file; a missing file or invalid YAML is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_config(path: str | Path) -> TrialConfig:
    """Read and validate a trial configuration YAML file."""
    return TrialConfig.from_dict(read_yaml(path), source=str(path))
