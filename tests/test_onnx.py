"""ONNX export: one graph (image -> anomaly_map, score) that onnxruntime runs like the torch model.

Tolerance: max |onnx - torch| over the maps below 1e-4 of the torch maps' range, and over the image
scores below 1e-4 of the largest score (measured: about 1e-6 for both heads).
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

from anoseg.data import load_test  # noqa: E402
from anoseg.model import ModelError, fit_model  # noqa: E402
from anoseg.onnx_export import (  # noqa: E402
    INPUT_NAME,
    OUTPUT_NAMES,
    compare_with_torch,
    export_onnx,
    onnx_metadata,
    run_onnx,
)

TOLERANCE = 1e-4
BASE = {"backbone": {"name": "resnet18", "weights": "none"}, "layers": ["layer1", "layer2"], "image_size": 64,
        "device": "cpu"}
HEADS = {
    "patchcore": {"name": "patchcore", "coreset_ratio": 0.05, "k": 3},
    "padim": {"name": "padim", "n_features": 32},
    "stfpm": {"name": "stfpm", "epochs": 1, "batch_size": 4, "discrepancy_scaling": True, "holdout": 0.25},
    "stfpm_seg": {"name": "stfpm_seg", "stfpm_epochs": 1, "seg_epochs": 1, "batch_size": 4, "bank_size": 8,
                  "discrepancy_scaling": True, "holdout": 0.25},
    "simplenet": {"name": "simplenet", "epochs": 1, "batch_size": 4},
    "cse": {"name": "cse", "epochs": 1, "batch_size": 4, "k": 8},
}


@pytest.fixture(scope="module")
def exported(synthetic_root, tmp_path_factory):
    """{head: (model, onnx path)} for each head, fitted on brick."""
    out = {}
    for name, head in HEADS.items():
        folder = tmp_path_factory.mktemp(f"onnx_{name}")
        model = fit_model({**BASE, "head": head}, synthetic_root, "brick", folder / "model")
        out[name] = (model, export_onnx(model, folder / f"{name}.onnx"))
    return out


@pytest.mark.parametrize("head", list(HEADS))
def test_onnx_matches_torch(exported, synthetic_root, head):
    model, path = exported[head]
    images = load_test(synthetic_root, "brick", 64).images
    diff = compare_with_torch(model, path, images)
    assert diff["images"] == len(images)
    assert diff["map_rel_diff"] < TOLERANCE, diff
    assert diff["score_rel_diff"] < TOLERANCE, diff
    # dynamic batch axis: one image and an odd batch run too, with the same results per image
    maps_1, scores_1 = run_onnx(path, images[:1])
    maps_3, scores_3 = run_onnx(path, images[:3])
    assert maps_1.shape == (1, 64, 64) and scores_3.shape == (3,)
    assert torch.allclose(maps_1[0], maps_3[0], atol=1e-5 * diff["map_range"])
    assert torch.allclose(scores_1[0], scores_3[0], rtol=1e-5)


@pytest.mark.parametrize("head", list(HEADS))
def test_onnx_graph_interface_and_metadata(exported, head):
    model, path = exported[head]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    # one graph: no solve / loop operators, the normalisation inside
    ops = {n.op_type for n in proto.graph.node}
    assert "Loop" not in ops and not any("Solve" in op or "Triangular" in op for op in ops)
    meta = onnx_metadata(path)
    assert json.loads(meta["anoseg.thresholds"])["image"] == model.thresholds["image"]
    assert meta["anoseg.category"] == "brick" and meta["anoseg.image_size"] == "64"
    assert meta["anoseg.pretrained"] == "false"


def test_opset_below_17_is_refused(exported, tmp_path):
    model, _ = exported["padim"]
    with pytest.raises(ModelError, match="opset"):
        export_onnx(model, tmp_path / "old.onnx", opset=16)
