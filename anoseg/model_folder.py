"""The model folder on disk: what `anoseg fit` writes and `load_model` reads.

```
models/brick/
  model.json           format + version, the trial configuration, backbone (name, weights provenance,
                       layers, normalisation), image size, head (name, settings, non-tensor state),
                       decision thresholds and how and on which images they were chosen
                       (thresholds.method, thresholds.chosen_on), the split of the test images
                       (split: the holdout protocol's validation and test file names), the metrics
                       and which images they are of (metrics_on: the test part), data fingerprint
  weights.safetensors  the backbone's state dict (keys "backbone.*") and the head's tensors ("head.*")
```

Only ``format``, ``format_version``, ``config``, ``backbone``, ``head`` and ``thresholds`` (with ``image``
and ``pixel``) are required to load a model: folders written before the holdout split (no ``split``,
``metrics_on`` or ``thresholds.chosen_on``; thresholds chosen on all test images) still load.

The folder is self-contained: the backbone weights travel with it, so loading needs neither the
weights package nor the network. Reading uses JSON and safetensors only -- nothing is unpickled.
This module knows the files; :mod:`anoseg.model` builds the model from them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

import anoseg
from anoseg.errors import AnosegError
from anoseg.files import write_atomic, write_json_atomic

MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "anoseg-model"
FORMAT_VERSION = "1.0"  # major.minor: a different major version cannot be read
BACKBONE_PREFIX = "backbone."
HEAD_PREFIX = "head."


class ModelError(AnosegError):
    """A model folder is missing, incomplete, corrupted or of another format version."""


def write_model_folder(out_dir: str | Path, info: Mapping[str, Any], backbone_state: Mapping[str, torch.Tensor],
                       head_state: Mapping[str, Any], head_name: str) -> dict[str, Any]:
    """Write weights.safetensors (backbone and head tensors) and model.json (`info` plus the head's
    non-tensor state, its tensor names and layouts, and the weights file's checksum) into `out_dir`
    (created; existing files replaced, each atomically). Returns the model.json content."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    plain = {k: v for k, v in head_state.items() if not isinstance(v, torch.Tensor)}
    try:
        json.dumps(plain)
    except TypeError as exc:
        raise ModelError(f"head {head_name!r}: state_dict() holds a value that is neither a tensor "
                         f"nor JSON ({exc}); it cannot be saved without pickling") from None
    tensors = {BACKBONE_PREFIX + k: v for k, v in backbone_state.items()}
    tensors.update({HEAD_PREFIX + k: v for k, v in head_state.items() if isinstance(v, torch.Tensor)})
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    digest: list[str] = []

    def save(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"format": FORMAT, "format_version": FORMAT_VERSION})
        digest.append(_sha256(Path(tmp)))

    write_atomic(out / WEIGHTS_FILE, save, by_name=True)
    layouts = {k: order for k, v in head_state.items()
               if isinstance(v, torch.Tensor) and (order := _dim_order(v)) is not None}
    info = dict(info)
    info["head"] = {**info.get("head", {}), "state": plain,
                    "tensors": sorted(k[len(HEAD_PREFIX):] for k in tensors if k.startswith(HEAD_PREFIX)),
                    "layouts": layouts}
    info["files"] = {WEIGHTS_FILE: {"sha256": digest[0], "bytes": (out / WEIGHTS_FILE).stat().st_size,
                                    "tensors": len(tensors)}}
    write_json_atomic(out / MODEL_FILE, info)
    return info


def read_model_info(path: str | Path) -> dict[str, Any]:
    """model.json of a model folder, checked for format and version; ModelError otherwise."""
    folder = Path(path)
    if not folder.exists():
        raise ModelError(f"model folder {folder} does not exist (create one with `anoseg fit`)")
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a model folder (expected a folder with {MODEL_FILE} and {WEIGHTS_FILE})")
    info_path = folder / MODEL_FILE
    if not info_path.is_file():
        raise ModelError(f"{folder} is not a complete model folder: {MODEL_FILE} is missing "
                         f"(expected {MODEL_FILE} and {WEIGHTS_FILE}, written by `anoseg fit`)")
    try:
        info = json.loads(info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{info_path} is not valid JSON ({exc}); the model folder is corrupted") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ModelError(f"{info_path} is not an anoseg model description (format {FORMAT!r} expected)")
    version = str(info.get("format_version", "?"))
    if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise ModelError(
            f"{folder} is a model of format version {version} (written by anoseg "
            f"{info.get('anoseg_version', '?')}); this anoseg {anoseg.__version__} reads format "
            f"{FORMAT_VERSION.split('.')[0]}.x: fit the model again with this version"
        )
    for key in ("config", "backbone", "head", "thresholds"):
        if key not in info:
            raise ModelError(f"{info_path} lacks the {key!r} section; the model folder is corrupted")
    return info


def read_model_tensors(path: str | Path, info: Mapping[str, Any], verify: bool = True
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(backbone state dict, head state: its non-tensor state and its tensors in their saved layouts) of a
    model folder whose model.json is `info`. `verify` checks the weights file's SHA-256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelError(f"{folder} is not a complete model folder: {WEIGHTS_FILE} is missing")
    expected = (info.get("files") or {}).get(WEIGHTS_FILE, {}).get("sha256")
    if verify and expected and _sha256(weights_path) != expected:
        raise ModelError(f"{weights_path} does not match the checksum in {MODEL_FILE} (corrupted or replaced)")
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"cannot read {weights_path}: {exc}") from None
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
    head_info = info["head"]
    head: dict[str, Any] = dict(head_info.get("state") or {})
    for name in head_info.get("tensors", []):
        key = HEAD_PREFIX + name
        if key not in tensors:
            raise ModelError(f"{weights_path} lacks the head tensor {key!r}; the model folder is corrupted")
        head[name] = _with_dim_order(tensors[key], (head_info.get("layouts") or {}).get(name))
    return backbone, head


def _dim_order(t: torch.Tensor) -> list[int] | None:
    """For a dense tensor stored in another dimension order than row-major (e.g. a column-major
    Cholesky factor), that order (outermost first); None for row-major or non-dense tensors.

    Saved tensors are row-major; loading restores the order, so that the reloaded head computes
    with the same memory layout and therefore the same roundings as the fitted one."""
    if t.ndim < 2 or t.is_contiguous():
        return None
    order = sorted(range(t.ndim), key=lambda d: (-t.stride(d), d))
    return order if t.permute(order).is_contiguous() else None


def _with_dim_order(t: torch.Tensor, order: Sequence[int] | None) -> torch.Tensor:
    if not order or len(order) != t.ndim:
        return t
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return t.permute(list(order)).contiguous().permute(inverse)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
