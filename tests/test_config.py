from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, ValidationError

from anoseg.config import TrialConfig, load_config
from anoseg.errors import ConfigError
from anoseg.schema import Schema, config_error

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "backbone": {"name": "tf_efficientnet_lite0", "weights": "offline"},
    "layers": ["blocks.1", "blocks.2"],
    "image_size": 128,
    "head": {"name": "patchcore", "coreset_ratio": 0.1, "k": 1},
}


def test_valid_config_round_trips():
    cfg = TrialConfig.from_dict(GOOD)
    assert cfg.head_name == "patchcore" and cfg.head_params == {"coreset_ratio": 0.1, "k": 1}
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg


def test_shorthands():
    cfg = TrialConfig.from_dict({"backbone": "resnet18", "layers": "layer2", "head": "padim"})
    assert cfg.backbone.weights == "offline" and cfg.layers == ("layer2",) and cfg.head == {"name": "padim"}
    for no_weights in (None, False):
        raw = {"backbone": {"name": "resnet18", "weights": no_weights}, "layers": "layer2", "head": "padim"}
        assert TrialConfig.from_dict(raw).backbone.weights == "none"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": 1}, "colour: unknown field 'colour'; allowed: backbone, layers"),
        ({"backbone": {"name": "resnet999"}}, "backbone.name 'resnet999' is unknown; allowed: .*resnet18"),
        ({"layers": ["blocks.9"]}, "blocks.9.*blocks.1"),
        ({"layers": []}, "layers: must be a non-empty list"),
        ({"head": {"name": "nohead"}}, "head 'nohead' is unknown"),
        ({"head": {"name": "padim", "n_feature": 3}}, "no setting n_feature; allowed: n_features"),
        ({"image_size": 8}, "image_size: must be an integer in \\[32, 4096\\]"),
        ({"device": "tpu"}, "device: must be one of auto, cpu, cuda"),
        ({"backbone": {"name": "resnet18", "wieghts": "hub"}}, "backbone\\.wieghts: unknown field 'wieghts'"),
    ],
)
def test_bad_config_names_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        TrialConfig.from_dict({**GOOD, **change}, source="cfg.yaml")


def test_missing_field():
    raw = dict(GOOD)
    del raw["layers"]
    with pytest.raises(ConfigError, match="layers: missing"):
        TrialConfig.from_dict(raw)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("backbone: resnet18\nlayers: [layer2]\nhead: {name: patchcore, corset_ratio: 0.1}\n")
    with pytest.raises(ConfigError, match="typo.yaml: head 'patchcore' has no setting corset_ratio"):
        load_config(typo)


def test_structure_only_check_imports_no_torch():
    code = ("import sys\n"
            "from anoseg.config import TrialConfig\n"
            "cfg = TrialConfig.from_dict({'backbone': 'not_registered', 'layers': 'x', 'head': 'padim'},"
            " source='run', check_registries=False)\n"
            "assert cfg.backbone.name == 'not_registered' and cfg.layers == ('x',)\n"
            "heavy = sorted({'torch', 'timm', 'anoseg.backbones', 'anoseg.heads'} & set(sys.modules))\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


class _Item(Schema):
    mode: Literal["max", "min"]
    weight: float = Field(1.0, gt=0)


class _File(Schema):
    items: list[_Item]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"items": [{"mode": "max"}, {"mode": "up"}]}, "f.yaml: items[1].mode: unknown mode 'up'; allowed: max, min"),
        ({"items": [{"mode": "max", "wieght": 2}]},
         "f.yaml: items[0].wieght: unknown field 'wieght' (did you mean 'weight'?); allowed: mode, weight"),
        ({"items": [{"mode": "min", "weight": 0}]}, "f.yaml: items[0].weight: must be a number > 0, got 0"),
        ({"items": [{"mode": "min", "weight": "1e-3"}]},
         "f.yaml: items[0].weight: must be a number > 0, got '1e-3' (YAML reads it as text: write it with a dot, "
         "e.g. 1.0e-3, or as 0.001)"),
        ({"items": [{}]}, "f.yaml: items[0].mode: missing (required)"),
        ({"items": 3}, "f.yaml: items: must be a list, got 3"),
    ],
)
def test_pydantic_errors_become_one_line_config_errors(raw, message):
    with pytest.raises(ValidationError) as info:
        _File.model_validate(raw)
    error = config_error(info.value, "f.yaml", _File)
    assert isinstance(error, ConfigError) and str(error) == message


def test_config_errors_show_no_pydantic_text():
    with pytest.raises(ConfigError) as info:
        TrialConfig.from_dict({**GOOD, "seed": "7"}, source="cfg.yaml", check_registries=False)
    assert str(info.value) == "cfg.yaml: seed: must be an integer in [0, 2147483647], got '7'"
    assert info.value.__cause__ is None and info.value.__suppress_context__
