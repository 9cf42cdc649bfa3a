"""One ONNX graph for deployment: image (N, 3, S, S) in [0, 1] -> anomaly_map (N, S, S), score (N,).

The graph holds the whole pipeline of :meth:`anoseg.model.FittedModel.predict`: normalisation with
the backbone's mean / std, the backbone up to its deepest selected layer, the head's scoring module,
bilinear upsampling to S x S and the Gaussian blur (sigma 4), and the image score (the head's own,
or the map maximum). The batch axis is dynamic; S is fixed (the model's image size).

The head's scoring module is whatever its ``onnx_scorer(layers)`` returns (see anoseg.heads.base):
an ``nn.Module`` on the CPU mapping (images, layer maps) to (patch maps (N, h, w), image scores (N,)
or None). A feature head combines the selected layers (neighbourhood averaging, bilinear resize to
the finest grid, concatenation) and scores them with its own rewrite into plain tensor algebra
(``has_onnx_rewrite``) or with its ``score()`` traced as is; a trainable head runs its own network
next to the backbone in the same graph. Scoring that uses operations ONNX lacks (triangular solves)
or fixes the batch size (Python loops over chunks of the batch) fails with a ModelError naming the
head and the cause.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter; it needs the
``onnxscript`` package), opset 18 by default. Graphs over 1.5 GB of weights (e.g. per-position
covariances on large grids) are written with their tensors in ``<out>.data`` next to the .onnx file
(protobuf's 2 GB limit). The model's thresholds, image size, category and provenance are stored in
the ONNX metadata (``metadata_props``).

Tolerance: against :meth:`FittedModel.predict` on the CPU with onnxruntime, the maps agree to a
max absolute difference below 1e-4 of the map range and the scores below 1e-4 relative (see
:func:`compare_with_torch`; tests assert 1e-3).
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from anoseg.pipeline import anomaly_maps
from anoseg.model import FittedModel, ModelError

DEFAULT_OPSET = 18
MIN_OPSET = 17
EXTERNAL_DATA_BYTES = 1_500_000_000
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")


def _cause(exc: BaseException) -> str:
    """The innermost cause's first line, without terminal colour codes."""
    import re

    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


class OnnxPipeline(nn.Module):
    """The full predict pipeline of a FittedModel as one module (on the CPU, float32)."""

    def __init__(self, model: FittedModel) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(model.backbone).to("cpu").float().eval()
        self.head = model.head.onnx_scorer(model.config.layers)
        self.register_buffer("mean", torch.tensor(model.backbone.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.backbone.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.image_size = int(model.image_size)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        patch_maps, image_scores = self.head(image, self.backbone((image - self.mean) / self.std))
        maps = anomaly_maps(patch_maps, self.image_size)
        return maps, maps.amax(dim=(1, 2)) if image_scores is None else image_scores


def _metadata(model: FittedModel, opset: int) -> dict[str, str]:
    info = model.info
    meta = {
        "anoseg.format": "anoseg-onnx",
        "anoseg.anoseg_version": str(info.get("anoseg_version", "")),
        "anoseg.category": str(info.get("category", "")),
        "anoseg.image_size": str(model.image_size),
        "anoseg.thresholds": json.dumps(info.get("thresholds", {})),
        "anoseg.metrics": json.dumps(info.get("metrics", {})),
        "anoseg.config": json.dumps(info.get("config", {})),
        "anoseg.backbone_weights": str(info.get("backbone", {}).get("weights", "")),
        "anoseg.pretrained": str(info.get("backbone", {}).get("pretrained", "")).lower(),
        "anoseg.map_range": json.dumps(info.get("map_range", {})),
        "anoseg.io": f"{INPUT_NAME}: float32 (N, 3, {model.image_size}, {model.image_size}) RGB in [0, 1]; "
                     f"{OUTPUT_NAMES[0]}: float32 (N, {model.image_size}, {model.image_size}); "
                     f"{OUTPUT_NAMES[1]}: float32 (N,); fail when score >= thresholds.image",
        "anoseg.opset": str(opset),
    }
    return meta


def export_onnx(model: FittedModel, out: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write `model` as one ONNX graph to `out`; returns the path. See the module docstring."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ModelError(f"ONNX export needs the onnx and onnxscript packages ({exc}); "
                         "pip install onnx onnxscript onnxruntime") from None
    if opset < MIN_OPSET:
        raise ModelError(f"opset must be >= {MIN_OPSET}, got {opset}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline = OnnxPipeline(model).eval()
    s = model.image_size
    example = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    n_bytes = sum(t.numel() * t.element_size() for t in (*pipeline.parameters(), *pipeline.buffers()))
    external = n_bytes > EXTERNAL_DATA_BYTES
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                pipeline, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"image": {0: batch}}, opset_version=opset, external_data=external,
                optimize=True, verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the user needs the gist
        raise ModelError(
            f"ONNX export of {model.config.backbone.name} + {model.config.head_name} failed: {_cause(exc)}"
            + ("" if model.head.has_onnx_rewrite else
               f" (head {model.config.head_name!r} has no ONNX rewrite; its scoring was traced as is)")
        ) from exc
    proto = program.model_proto
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:  # the exporter fell back to a fixed batch size
        raise ModelError(
            f"ONNX export of {model.config.backbone.name} + {model.config.head_name}: the graph would only take "
            f"batches of {batch_dim.dim_value} images (the scoring fixes the batch size)"
            + ("" if model.head.has_onnx_rewrite else
               f"; head {model.config.head_name!r} has no ONNX rewrite (its scoring was traced as is)")
        )
    for key, value in _metadata(model, opset).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    if external:
        import onnx

        data_name = out.name + ".data"
        onnx.save_model(proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        import onnx

        onnx.save_model(proto, str(out))
    return out


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The anoseg.* metadata of an exported graph."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def run_onnx(path: str | Path, images: Tensor) -> tuple[Tensor, Tensor]:
    """Run an exported graph with onnxruntime on the CPU: (maps, scores) as tensors."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError("running ONNX graphs needs onnxruntime: pip install onnxruntime") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.detach().cpu().float().numpy()})
    return torch.from_numpy(maps), torch.from_numpy(scores)


def compare_with_torch(model: FittedModel, path: str | Path, images: Tensor) -> dict[str, float]:
    """Max absolute differences between onnxruntime and the torch model on `images`, absolute and
    relative (maps: to the torch maps' range; scores: to the largest torch score magnitude)."""
    maps_t, scores_t = model.predict(images)
    maps_o, scores_o = run_onnx(path, images)
    map_range = float(maps_t.max() - maps_t.min()) or 1.0
    score_scale = float(scores_t.abs().max()) or 1.0
    map_diff = float((maps_o - maps_t).abs().max())
    score_diff = float((scores_o - scores_t).abs().max())
    return {
        "images": int(len(images)),
        "map_max_abs_diff": map_diff,
        "map_range": map_range,
        "map_rel_diff": map_diff / map_range,
        "score_max_abs_diff": score_diff,
        "score_rel_diff": score_diff / score_scale,
    }
