"""One ONNX graph for deployment: image (N, 3, S, S) in [0, 1] -> anomaly_map (N, S, S), score (N,).

The graph holds the whole pipeline of :meth:`anoseg.model.FittedModel.predict`: normalisation with
the backbone's mean / std, the backbone up to its deepest selected layer, the layer combination
(PatchCore's neighbourhood averaging, bilinear resize to the finest grid, concatenation), the head's
scoring, bilinear upsampling to S x S and the Gaussian blur (sigma 4), and the image score (the
head's own, or the map maximum). The batch axis is dynamic; S is fixed (the model's image size).

Heads are rewritten into plain tensor algebra that every ONNX runtime has:

* PaDiM: the triangular solve with each position's Cholesky factor L becomes a batched matmul with
  L^-1, precomputed here in float64 (ONNX has no triangular solve).
* PatchCore: distances to the memory bank by the matmul expansion |a|^2 - 2 a.b + |b|^2 (as the
  torch head computes them), TopK for the k nearest, Max/ArgMax for the image score, and the
  re-weighting exactly as the torch head does it: the nearest bank entry of the most anomalous patch,
  its `reweight_neighbours` nearest bank entries (TopK), and 1 - softmax of the distances. The whole
  (N * h * w) x bank distance matrix is materialised (the torch head works in chunks of 4096 rows).

* A trainable head (STFPM): its student network runs next to the backbone in the same graph and
  its ``score_images()`` is traced as is (normalisation, squared distances, the per-position
  statistics of discrepancy scaling, the resize to the finest grid: all plain ONNX operations).

A head can bring its own rewrite: a method ``onnx_scorer()`` returning an ``nn.Module`` that maps
features (N, C, h, w) to (patch maps (N, h, w), image scores (N,) or None) with ONNX-friendly
operations. Other heads are exported by tracing their own ``score()``; a head whose scoring uses
operations ONNX lacks (triangular solves) or fixes the batch size (Python loops over chunks of the
batch) fails with a ModelError naming the head and the cause.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter; it needs the
``onnxscript`` package), opset 18 by default. Graphs over 1.5 GB of weights (e.g. PaDiM on large
grids) are written with their tensors in ``<out>.data`` next to the .onnx file (protobuf's 2 GB
limit). The model's thresholds, image size, category and provenance are stored in the ONNX
metadata (``metadata_props``).

Tolerance: against :meth:`FittedModel.predict` on the CPU with onnxruntime, the maps agree to a
max absolute difference below 1e-4 of the map range and the scores below 1e-4 relative (see
:func:`compare_with_torch`; tests assert 1e-3).
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from anoseg.features import combine_layers
from anoseg.heads import anomaly_maps
from anoseg.model import FittedModel, ModelError

DEFAULT_OPSET = 18
MIN_OPSET = 17
EXTERNAL_DATA_BYTES = 1_500_000_000
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")


class PadimScorer(nn.Module):
    """PaDiM's Mahalanobis distances as matmuls with the precomputed inverse Cholesky factors."""

    def __init__(self, head: Any) -> None:
        super().__init__()
        chol = head.cholesky.detach().to("cpu", torch.float64)
        eye = torch.eye(chol.shape[-1], dtype=torch.float64).expand_as(chol)
        inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        self.register_buffer("channels", head.channels.detach().cpu().long().clone())
        self.register_buffer("mean", head.mean.detach().cpu().float().contiguous().clone())  # (P, d)
        self.register_buffer("inv_cholesky", inv.float().contiguous())  # (P, d, d)
        self.shape = tuple(int(v) for v in head.shape)

    def forward(self, features: Tensor) -> tuple[Tensor, None]:
        n, _, h, w = features.shape
        x = features.index_select(1, self.channels).reshape(n, self.channels.shape[0], h * w)
        diff = x.permute(2, 1, 0) - self.mean[:, :, None]  # (P, d, N)
        whitened = torch.matmul(self.inv_cholesky, diff)  # (P, d, N)
        dist = whitened.square().sum(dim=1).sqrt()  # (P, N)
        return dist.transpose(0, 1).reshape(n, h, w), None


class PatchCoreScorer(nn.Module):
    """PatchCore's k-NN patch scores and re-weighted image score with matmuls, TopK and Gather."""

    def __init__(self, head: Any) -> None:
        super().__init__()
        bank = head.memory_bank.detach().cpu().float().contiguous().clone()
        self.register_buffer("bank", bank)  # (M, C)
        self.register_buffer("bank_sq", bank.square().sum(1))  # (M,)
        self.k = min(int(head.k), len(bank))
        self.b = min(int(head.reweight_neighbours), len(bank))

    def _distances(self, a: Tensor) -> Tensor:
        """Euclidean distances of rows of a (..., C) to every bank row: (..., M)."""
        d2 = a.square().sum(-1, keepdim=True) - 2 * torch.matmul(a, self.bank.T) + self.bank_sq
        return d2.clamp_min(0).sqrt()

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = features.shape
        patches = features.permute(0, 2, 3, 1).reshape(n, h * w, c)
        dists, idx = self._distances(patches).topk(self.k, dim=-1, largest=False)  # (N, hw, k)
        patch_scores = dists.mean(-1)  # (N, hw)
        image_scores, argmax = patch_scores.max(dim=1)  # (N,)
        if self.b > 1:
            worst = patches.gather(1, argmax[:, None, None].expand(n, 1, c))[:, 0]  # (N, C)
            nearest_idx = idx[:, :, 0].gather(1, argmax[:, None])[:, 0]  # (N,) m* of each image
            nearest = self.bank.index_select(0, nearest_idx)  # (N, C)
            support = self._distances(nearest).topk(self.b, dim=-1, largest=False).indices  # (N, b)
            neighbours = self.bank.index_select(0, support.reshape(-1)).reshape(n, self.b, c)
            d = (worst[:, None, :] - neighbours).square().sum(-1).sqrt()  # (N, b)
            image_scores = image_scores * (1 - torch.softmax(d, dim=1)[:, 0])
        return patch_scores.reshape(n, h, w), image_scores


class TracedHeadScorer(nn.Module):
    """Any other head: its own score(), traced as is."""

    def __init__(self, head: Any) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.head.score(features)


SCORERS: dict[str, type[nn.Module]] = {"padim": PadimScorer, "patchcore": PatchCoreScorer}


def make_scorer(name: str, head: Any) -> nn.Module:
    """The ONNX-friendly scoring module of a head: its own onnx_scorer(), a rewrite here, or its score()."""
    if callable(getattr(head, "onnx_scorer", None)):
        return head.onnx_scorer()
    if name in SCORERS:
        return SCORERS[name](head)
    return TracedHeadScorer(head)


def has_rewrite(name: str, head: Any) -> bool:
    return name in SCORERS or callable(getattr(head, "onnx_scorer", None))


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
        head = model.head
        if head.trainable:  # scores images with its own network (the student): a CPU copy of it
            from anoseg.heads import create_head

            head = create_head(model.config.head_name, **model.head.get_params())
            head.setup(self.backbone, "cpu")
            head.load_state_dict({k: v.cpu() if isinstance(v, Tensor) else v for k, v in model.head.state_dict().items()})
            self.student = head.student  # registered here, so its weights are the graph's parameters
            self.trainable_head = head
        else:
            if model.device.type != "cpu":
                head = copy.deepcopy(head)
                head.load_state_dict({k: v.cpu() if isinstance(v, Tensor) else v for k, v in head.state_dict().items()})
            self.scorer = make_scorer(model.config.head_name, head)
            self.trainable_head = None
        self.register_buffer("mean", torch.tensor(model.backbone.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.backbone.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.layers = list(model.config.layers)
        self.patch_size = int(model.head.patch_size)
        self.image_size = int(model.image_size)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        x = (image - self.mean) / self.std
        if self.trainable_head is not None:
            patch_maps, image_scores = self.trainable_head.score_images(image, self.backbone(x))
        else:
            patch_maps, image_scores = self.scorer(combine_layers(self.backbone(x), self.layers, self.patch_size))
        maps = anomaly_maps(patch_maps, self.image_size)
        scores = maps.amax(dim=(1, 2)) if image_scores is None else image_scores
        return maps, scores


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
            + ("" if has_rewrite(model.config.head_name, model.head) else
               f" (head {model.config.head_name!r} has no ONNX rewrite; its score() was traced as is)")
        ) from exc
    proto = program.model_proto
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:  # the exporter fell back to a fixed batch size
        raise ModelError(
            f"ONNX export of {model.config.backbone.name} + {model.config.head_name}: the graph would only take "
            f"batches of {batch_dim.dim_value} images (the scoring fixes the batch size)"
            + ("" if has_rewrite(model.config.head_name, model.head) else
               f"; head {model.config.head_name!r} has no ONNX rewrite (its score() was traced as is)")
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
