"""One trial's configuration: parsed from a dict or YAML file and validated up front.

The structure is a pydantic schema (:class:`TrialConfig`); the names (backbone, layers, head and its
settings) are checked against the registries, which import torch, only when asked (``check_registries``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Mapping

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from anoseg.errors import AnosegError, ConfigError
from anoseg.schema import FieldError, Schema, config_error

__all__ = ["BackboneSpec", "TrialConfig", "ImageSize", "BatchSize", "Seed", "Device", "Weights", "load_config",
           "read_yaml"]

# Field types shared with the search space file (search.space_schema).
ImageSize = Annotated[int, Field(ge=32, le=4096)]
BatchSize = Annotated[int, Field(ge=1, le=4096)]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:\d+)$", description="one of auto, cpu, cuda or cuda:N")]
#: offline | hub | none | /path/to/file.pth (checked by anoseg.backbones.parse_weights); null or false = none.
Weights = Annotated[str, BeforeValidator(lambda value: "none" if value is None or value is False else value)]


class BackboneSpec(Schema):
    """A backbone name and its weights: offline | hub | none | /path/to/file.pth."""

    example: ClassVar[str] = " (e.g. {name: resnet18, weights: offline})"
    name: str
    weights: Weights = "offline"

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class TrialConfig(Schema):
    """Everything one trial needs besides the data: backbone, layers, image size and head."""

    backbone: BackboneSpec
    layers: tuple[str, ...] = Field(min_length=1, strict=False,  # a list is welcome
                                    description="a non-empty list of layer names (see `anoseg backbones --layers NAME`)")
    image_size: ImageSize = 256
    head: dict[str, Any]  # {"name": ..., **settings}
    batch_size: BatchSize = 16
    seed: Seed = 0
    device: Device = "auto"

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        """One layer name or a list of them."""
        return (value,) if isinstance(value, str) else value

    @field_validator("head", mode="before")
    @classmethod
    def _head(cls, value: Any) -> dict[str, Any]:
        """A head name or {name: ..., **settings}."""
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
            raise FieldError(f"must be a head name or a mapping with a name, e.g. {{name: patchcore, "
                             f"coreset_ratio: 0.1}}, got {value!r}")
        return dict(value)

    @property
    def head_name(self) -> str:
        return self.head["name"]

    @property
    def head_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.head.items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        """The plain dict :meth:`from_dict` reads back (layers as a list)."""
        out = self.model_dump()
        out["layers"] = list(self.layers)
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config", *,
                  check_registries: bool = True) -> "TrialConfig":
        """Validate `raw`; errors name `source` and the field. ``check_registries=False`` checks the structure
        only and imports nothing heavy (for readers of finished runs)."""
        try:
            cfg = cls.model_validate(dict(raw) if isinstance(raw, Mapping) else raw)
        except ValidationError as exc:
            raise config_error(exc, source, cls) from None
        if check_registries:
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
