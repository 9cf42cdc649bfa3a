from __future__ import annotations

import pytest

from anoseg.config import TrialConfig, load_config
from anoseg.errors import ConfigError

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


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": 1}, "unknown field colour; allowed: backbone, layers"),
        ({"backbone": {"name": "resnet999"}}, "backbone.name 'resnet999' is unknown; allowed: .*resnet18"),
        ({"layers": ["blocks.9"]}, "blocks.9.*blocks.1"),
        ({"layers": []}, "layers must be a non-empty list"),
        ({"head": {"name": "nohead"}}, "head 'nohead' is unknown"),
        ({"head": {"name": "padim", "n_feature": 3}}, "no setting n_feature; allowed: n_features"),
        ({"image_size": 8}, "image_size must be an integer in \\[32, 4096\\]"),
        ({"device": "tpu"}, "device must be one of auto, cpu, cuda"),
        ({"backbone": {"name": "resnet18", "wieghts": "hub"}}, "unknown field backbone.wieghts"),
    ],
)
def test_bad_config_names_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        TrialConfig.from_dict({**GOOD, **change}, source="cfg.yaml")


def test_missing_field():
    raw = dict(GOOD)
    del raw["layers"]
    with pytest.raises(ConfigError, match="missing field 'layers'"):
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
