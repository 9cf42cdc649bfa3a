"""Anomaly-map examples of one configuration, for the run dashboard.

:func:`anomaly_examples` fits a trial configuration on ONE category with anoseg's building
blocks (backbone -> layers -> head -> anomaly maps, exactly the steps of a trial), scores that
category's test set and renders a few defective test images as PNG panels:

* left: the test image with the ground-truth defect outline;
* right: the anomaly map over the image (Turbo colours, alpha 0.5) with the same outline.

Colours share one scale over the whole test set of the category (its lowest and highest map
value), so panels compare with each other. Images are picked round-robin over the defect types,
in file order: they are not the best-looking ones.

Importing this module loads neither Ray nor the model stack: torch and anoseg's model are
imported by :func:`fit_and_score`, when examples are made.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from anoseg.data import TestSplit

OVERLAY_ALPHA = 0.5
PANEL_MIN, PANEL_MAX = 192, 320  # displayed panel side in pixels (upscaled / downscaled to this range)
# Plotly's Turbo colour scale (a perceptual "jet"), low -> high.
TURBO = ("#30123b", "#4145ab", "#4675ed", "#39a2fc", "#1bcfd4", "#24eca6", "#61fc6c", "#a4fc3b", "#d1e834",
         "#f3c63a", "#fe9b2d", "#f36315", "#d93806", "#b11901", "#7a0402")


@dataclass
class Example:
    """One rendered test image."""

    path: str  # the image file, relative to the category folder
    defect: str
    score: float  # the image score of the configuration
    png: bytes  # the rendered panel (image | overlay)

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


@dataclass
class ExampleSet:
    """The examples of one category with what a reader needs to judge the scores."""

    category: str
    config: dict[str, Any]
    examples: list[Example] = field(default_factory=list)
    map_range: tuple[float, float] = (0.0, 1.0)  # the colour scale: lowest and highest map value of the test set
    normal_score_max: float | None = None  # the highest image score among the defect-free test images
    defect_score_min: float | None = None  # the lowest image score among the defective test images
    n_test: int = 0
    n_defective: int = 0


def colormap_lut(colors: Sequence[str] = TURBO) -> np.ndarray:
    """A 256 x 3 uint8 lookup table interpolated linearly between hex colours."""
    anchors = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in colors], dtype=float)
    positions = np.linspace(0.0, 1.0, len(anchors))
    x = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(x, positions, anchors[:, ch]) for ch in range(3)], axis=1).round().astype(np.uint8)


def fit_and_score(config: Mapping[str, Any], data_root: str | Path, category: str,
                  device: str | None = None) -> tuple[TestSplit, np.ndarray, np.ndarray]:
    """Fit `config` on `category`'s train set; return (test split, maps (N, S, S) numpy, image scores (N,)).

    The model is fitted as `anoseg fit` does it (any head, trainable ones included).
    """
    from anoseg.config import TrialConfig
    from anoseg.data import load_test
    from anoseg.model import fit_model

    cfg = TrialConfig.from_dict(dict(config), source="best trial configuration")
    model = fit_model(cfg, data_root, category, device=device)
    test = load_test(data_root, category, cfg.image_size)
    maps, scores = model.predict(test.images)
    return test, maps.numpy(), scores.numpy()


def pick_defective(defect_types: Sequence[str], labels: Sequence[int], n: int) -> list[int]:
    """Indices of up to `n` defective images, round-robin over the defect types, in file order."""
    by_type: dict[str, list[int]] = {}
    for index, (defect, label) in enumerate(zip(defect_types, labels)):
        if label:
            by_type.setdefault(defect, []).append(index)
    picked: list[int] = []
    queues = [list(v) for _, v in sorted(by_type.items())]
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return picked


def _panel_side(size: int) -> int:
    return int(min(max(size, PANEL_MIN), PANEL_MAX))


def _draw_contours(draw: ImageDraw.ImageDraw, mask: np.ndarray, scale: float) -> None:
    """The ground-truth outline: a dark line under a white one, visible on any background."""
    from skimage.measure import find_contours

    padded = np.pad(mask.astype(float), 1)  # closes regions that touch the border
    for contour in find_contours(padded, 0.5):
        points = [((c - 1 + 0.5) * scale, (r - 1 + 0.5) * scale) for r, c in contour]
        if len(points) < 2:
            continue
        draw.line(points, fill=(0, 0, 0), width=4, joint="curve")
        draw.line(points, fill=(255, 255, 255), width=2, joint="curve")


def render_example(image: np.ndarray, amap: np.ndarray, mask: np.ndarray, vmin: float, vmax: float,
                   alpha: float = OVERLAY_ALPHA, gap: int = 6) -> Image.Image:
    """One panel: image (3, S, S) or (S, S, 3) in [0, 1] with the outline | the map overlay with the outline."""
    rgb = np.asarray(image, dtype=float)
    if rgb.ndim == 3 and rgb.shape[0] == 3 and rgb.shape[-1] != 3:
        rgb = rgb.transpose(1, 2, 0)
    rgb = np.clip(rgb, 0.0, 1.0)
    norm = np.clip((np.asarray(amap, dtype=float) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = colormap_lut()[(norm * 255).round().astype(int)] / 255.0
    overlay = (1 - alpha) * rgb + alpha * heat

    size = rgb.shape[0]
    side = _panel_side(size)
    scale = side / size
    panels = []
    for array in (rgb, overlay):
        img = Image.fromarray((array * 255).round().astype(np.uint8)).resize((side, side), Image.BILINEAR)
        _draw_contours(ImageDraw.Draw(img), np.asarray(mask, dtype=bool), scale)
        panels.append(img)
    out = Image.new("RGB", (2 * side + gap, side), (255, 255, 255))
    out.paste(panels[0], (0, 0))
    out.paste(panels[1], (side + gap, 0))
    return out


def png_bytes(img: Image.Image) -> bytes:
    """The image as PNG file contents."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def anomaly_examples(config: Mapping[str, Any], data_root: str | Path, category: str, n: int = 4,
                     device: str | None = None) -> ExampleSet:
    """Fit `config` on `category` and render up to `n` defective test images (see the module doc)."""
    test, maps, scores = fit_and_score(config, data_root, category, device)
    labels = np.asarray(test.labels)
    result = ExampleSet(
        category=category, config=dict(config), map_range=(float(maps.min()), float(maps.max())),
        normal_score_max=float(scores[labels == 0].max()) if (labels == 0).any() else None,
        defect_score_min=float(scores[labels == 1].min()) if (labels == 1).any() else None,
        n_test=len(labels), n_defective=int(labels.sum()),
    )
    vmin, vmax = result.map_range
    category_dir = Path(data_root) / category
    for index in pick_defective(test.defect_types, labels, n):
        panel = render_example(test.images[index].numpy(), maps[index], test.masks[index].numpy(), vmin, vmax)
        path = Path(test.paths[index])
        try:
            shown = path.relative_to(category_dir).as_posix()
        except ValueError:
            shown = path.name
        result.examples.append(Example(path=shown, defect=test.defect_types[index], score=float(scores[index]),
                                       png=png_bytes(panel)))
    return result
