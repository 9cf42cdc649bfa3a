"""CSE (Thomine & Snoussi): a contrastively trained embedding of the backbone's features, scored by
the distance to a few k-means centres of the normal embeddings.

- Embedder: per selected layer a 3x3 convolution of its map to `embedding_dim` channels, resized
  (bilinear) to the finest selected grid and summed, then L2-normalised per position.
- Defect bank: on the first epoch of a category, `bank_size` synthetic defect images (null: one per
  training image; :func:`anoseg.anomalies.generate_batch` cycling over the training images, kinds from
  `defect_kinds`, seeded by `seed`; the first 8 training images are the pool of the ``patch`` kind)
  go once through the frozen backbone (the head keeps it from `setup`). Their maps (fp16, like the
  feature cache) and position labels are part of the category's training state, so lockstep training
  of several categories and resumed trials reuse them, and every epoch trains from these cached maps
  (bench/cse_vs_patchcore.py measures what that saves). Memory: bank_size x one image's layer maps
  (fp16) per category, in the trial's state and checkpoints. Labels on the finest grid, from the
  share of each cell the mask covers: defective at >= 0.5, normal where no cell of its 3x3
  neighbourhood is touched, else ignored.
- Loss: supervised-contrastive (Khosla et al. 2020) with the normal positions as anchors: per step
  (`batch_size` training images + as many bank images, the bank in a random order, cycled when it
  is smaller than the training set) up to 1024 normal positions (of the training images and the
  clean parts of the bank images) and up to 1024 defective ones are drawn; for each normal anchor,
  -mean over the other normal positions of log softmax(cos / `temperature`) over all drawn positions
  but itself. Normal positions are pulled together, defective ones pushed away from them. A step
  without a defective position is skipped. Adam. The loss cannot go below log(normal positions
  drawn - 1) (6.93 at 1024): all normal positions alike, the defective ones far.
- Fit (end of every epoch): seeded k-means (k-means++ init, Lloyd) with `k` centres on the normal
  embeddings of the training images (at most 100 000 positions, a seeded sample).
- Score: Euclidean distance of each position's embedding to its nearest centre; image score = map maximum.

ONNX: the scoring (embed, distances by the matmul expansion, ReduceMin) traced as is.

Settings: embedding_dim; k; epochs; lr; temperature; defect_kinds ("all", or kinds of
:data:`anoseg.anomalies.KINDS`, comma-separated or a list); bank_size (defect images; null: as many
as training images); batch_size (training images per step); seed (init, defect bank, sampling,
k-means). Defaults from the embedded dataset (12 training images per category; board, brick, grass
after 10 epochs of batches of 4): mean AUPRO 0.675 with temperature 0.1 and k 10, 0.745 with 0.5 and
10, 0.764 with 0.5 and 32.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anoseg.anomalies import KINDS, DefectConfig, generate_batch
from anoseg.errors import ConfigError
from anoseg.features import extract_layers
from anoseg.heads.base import SEED, TrainableHead, is_int, is_number, register_head
from anoseg.heads.stfpm import _to_cpu

KERNEL_SIZE = 3
POOL = 8  # training images the `patch` defects take their fill from
BANK_BATCH = 16  # defect images per backbone forward
SAMPLES = 1024  # positions of each class drawn per step
KMEANS_POINTS = 100_000  # normal positions k-means fits on, at most
KMEANS_ITERATIONS = 30
CHUNK = 16384  # k-means assigns this many points at a time (bounds memory at CHUNK x k)
DEFECT_SHARE = 0.5  # a cell is defective when the mask covers at least this share of it
KINDS_ALLOWED = f"\"all\" or distinct kinds from {', '.join(KINDS)} (comma-separated or a list)"


def defect_kinds(value: Any) -> tuple[str, ...] | None:
    """"all" -> None (every kind); "cutpaste,noise" or ["cutpaste", "noise"] -> the kinds; else a ConfigError."""
    if value == "all":
        return None
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple)) or not parts or not all(isinstance(p, str) for p in parts):
        raise ConfigError(f"head 'cse': defect_kinds must be {KINDS_ALLOWED}, got {value!r}")
    kinds = tuple(p.strip() for p in parts)
    if any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ConfigError(f"head 'cse': defect_kinds must be {KINDS_ALLOWED}, got {value!r}")
    return kinds


def _kinds_ok(value: Any) -> bool:
    try:
        defect_kinds(value)
    except ConfigError:
        return False
    return True


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """(min(k, n), D) centres of the rows of x (n, D): k-means++ seeding, then Lloyd iterations (an empty
    cluster keeps its centre); seeded by `generator` (CPU)."""
    k = min(k, len(x))
    sq = x.square().sum(1)
    centres = x[int(torch.randint(len(x), (1,), generator=generator))][None]
    nearest = (sq - 2 * x @ centres[0] + centres[0].square().sum()).clamp_min(0)
    for _ in range(1, k):
        weights = nearest.cpu().double()
        pick = int(torch.multinomial(weights / weights.sum(), 1, generator=generator)) if weights.sum() > 0 \
            else int(torch.randint(len(x), (1,), generator=generator))
        centres = torch.cat([centres, x[pick][None]])
        nearest = torch.minimum(nearest, (sq - 2 * x @ x[pick] + x[pick].square().sum()).clamp_min(0))
    for _ in range(iterations):
        centres_sq = centres.square().sum(1)[None]
        assign = torch.cat([torch.addmm(centres_sq, part, centres.T, alpha=-2).argmin(1) for part in x.split(CHUNK)])
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=len(centres)).to(x.dtype)[:, None]
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if torch.equal(updated, centres):
            break
        centres = updated
    return centres


class Embedder(nn.Module):
    """Per layer a conv to `dim` channels, summed on the finest grid, L2-normalised: {layer: map} -> (N, dim, h, w)."""

    def __init__(self, layers: Sequence[str], channels: Sequence[int], dim: int) -> None:
        super().__init__()
        self.layers = list(layers)
        self.convs = nn.ModuleList(nn.Conv2d(c, dim, KERNEL_SIZE, padding=KERNEL_SIZE // 2) for c in channels)

    def forward(self, layer_maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        grid = max((layer_maps[name].shape[-2:] for name in self.layers), key=lambda s: s[0] * s[1])
        total = None
        for name, conv in zip(self.layers, self.convs):
            z = conv(layer_maps[name].float())
            if z.shape[-2:] != grid:
                z = F.interpolate(z, size=tuple(grid), mode="bilinear", align_corners=False)
            total = z if total is None else total + z
        return F.normalize(total, dim=1)


def position_labels(masks: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(n, h, w) int8 labels of defect masks (n, S, S) on `grid`: 1 defective (covered >= DEFECT_SHARE),
    0 normal (no cell of the 3x3 neighbourhood touched), -1 ignored."""
    share = F.adaptive_avg_pool2d(masks[:, None].float(), tuple(grid))
    touched = F.max_pool2d((share > 0).float(), 3, stride=1, padding=1)
    labels = torch.full(share.shape, -1, dtype=torch.int8)
    labels[touched == 0] = 0
    labels[share >= DEFECT_SHARE] = 1
    return labels[:, 0]


def supcon_loss(normal: torch.Tensor, defective: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised-contrastive loss with the normal rows (a, D) as anchors and each other's positives,
    the defective rows (b, D) as negatives (rows L2-normalised)."""
    a = len(normal)
    logits = normal @ torch.cat([normal, defective]).T / temperature
    self_mask = torch.eye(a, len(logits[0]), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = log_prob[:, :a].masked_fill(self_mask[:, :a], 0.0).sum(1) / (a - 1)
    return -positives.mean()


@register_head("cse")
class CSE(TrainableHead):
    constraints = {
        "embedding_dim": (lambda v: is_int(v) and 2 <= v <= 4096, "an integer in [2, 4096]"),
        "k": (lambda v: is_int(v) and 1 <= v <= 4096, "an integer in [1, 4096]"),
        "epochs": (lambda v: is_int(v) and 1 <= v <= 10000, "an integer in [1, 10000]"),
        "lr": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "temperature": (lambda v: is_number(v) and 0 < v <= 10, "a number in (0, 10]"),
        "defect_kinds": (_kinds_ok, KINDS_ALLOWED),
        "bank_size": (lambda v: v is None or (is_int(v) and 1 <= v <= 100_000), "null or an integer in [1, 100000]"),
        "batch_size": (lambda v: is_int(v) and 1 <= v <= 4096, "an integer in [1, 4096]"),
        "seed": SEED,
    }
    fitted_attributes = ("embedder_",)
    embedder_: Embedder | None = None
    centres_: torch.Tensor | None = None  # (k, embedding_dim) k-means centres of the normal embeddings
    optimizer_: torch.optim.Optimizer | None
    backbone_: torch.nn.Module | None  # the frozen backbone, for the defect bank's maps
    layers_: list[str]
    device_: torch.device
    generator_: torch.Generator  # shuffling and sampling (CPU)
    bank_: dict[str, Any] | None  # {"maps": {layer: (n, C, h, w) fp16}, "labels": (n, h, w) int8}, CPU

    def __init__(self, embedding_dim: int = 64, k: int = 32, epochs: int = 10, lr: float = 1e-3,
                 temperature: float = 0.5, defect_kinds: str | list[str] = "all", bank_size: int | None = None,
                 batch_size: int = 4, seed: int = 0):
        self.embedding_dim, self.k, self.epochs, self.lr, self.temperature = embedding_dim, k, epochs, lr, temperature
        self.defect_kinds, self.bank_size, self.batch_size, self.seed = defect_kinds, bank_size, batch_size, seed

    # ------------------------------------------------------------------ set-up
    def setup(self, backbone: torch.nn.Module, device: torch.device | str) -> CSE:
        self._validate_params()
        self.layers_ = list(backbone.layers)
        self.device_ = torch.device(device)
        self.backbone_ = backbone
        self.generator_ = torch.Generator().manual_seed(self.seed)
        self.bank_, self.centres_ = None, None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            embedder = Embedder(self.layers_, [backbone.channels[layer] for layer in self.layers_], self.embedding_dim)
        self.embedder_ = embedder.to(self.device_)
        self.optimizer_ = torch.optim.Adam(self.embedder_.parameters(), lr=self.lr)
        return self

    def cpu_copy(self) -> CSE:
        """A copy for scoring on the CPU: its own CPU embedder and centres, no optimizer, backbone or bank."""
        self._check_fitted("cpu_copy")
        head = copy.copy(self)
        head.embedder_ = copy.deepcopy(self.embedder_).to("cpu").float()
        head.centres_ = None if self.centres_ is None else self.centres_.cpu().float()
        head.optimizer_, head.backbone_, head.bank_ = None, None, None
        head.device_ = torch.device("cpu")
        return head

    def defect_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`bank_size` synthetic defects (null: one per image) cycling over images (N, 3, S, S) (uint8 or
        [0, 1]): defective images (n, 3, S, S) in [0, 1] and masks (n, S, S), seeded by `seed`."""
        pool = images[:POOL] if len(images) > 1 else None
        defective, masks, _ = generate_batch(images.cpu(), self.bank_size or len(images), seed=self.seed,
                                             config=DefectConfig(kinds=defect_kinds(self.defect_kinds)), pool=pool)
        return (defective.float() / 255 if defective.dtype == torch.uint8 else defective.float()), masks

    def make_bank(self, images: torch.Tensor) -> dict[str, Any]:
        """The defect bank of a category's training images: the defect images' backbone maps (fp16, CPU) and
        position labels."""
        defective, masks = self.defect_images(images)
        maps = extract_layers(self.backbone_, defective, BANK_BATCH, self.device_)
        maps = {layer: maps[layer].to("cpu", torch.float16) for layer in self.layers_}
        grid = max((m.shape[-2:] for m in maps.values()), key=lambda s: s[0] * s[1])
        return {"maps": maps, "labels": position_labels(masks, grid)}

    def _embed(self, layer_maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.embedder_({layer: layer_maps[layer].to(self.device_) for layer in self.layers_})

    # ------------------------------------------------------------------ training
    def train_epoch(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> float:
        self._check_fitted("train_epoch")
        if self.bank_ is None:
            self.bank_ = self.make_bank(images)
        bank_maps, bank_labels = self.bank_["maps"], self.bank_["labels"]
        self.embedder_.train(True)
        order = torch.randperm(len(images), generator=self.generator_)
        cycles = -(-len(images) // len(bank_labels))  # as many bank images as training images
        bank_order = torch.randperm(len(bank_labels), generator=self.generator_).repeat(cycles)[:len(images)]
        total, steps = 0.0, 0
        for index, bank_index in zip(order.split(self.batch_size), bank_order.split(self.batch_size)):
            z = self._embed({k: layer_maps[k][index] for k in self.layers_})
            zb = self._embed({k: bank_maps[k][bank_index] for k in self.layers_})
            labels = bank_labels[bank_index].reshape(-1).to(self.device_)
            zb = zb.permute(0, 2, 3, 1).reshape(-1, zb.shape[1])
            normal = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), zb[labels == 0]])
            defective = zb[labels == 1]
            if len(defective) == 0 or len(normal) < 2:
                continue
            normal = normal[torch.randperm(len(normal), generator=self.generator_)[:SAMPLES].to(self.device_)]
            defective = defective[torch.randperm(len(defective), generator=self.generator_)[:SAMPLES].to(self.device_)]
            loss = supcon_loss(normal, defective, self.temperature)
            self.optimizer_.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer_.step()
            total, steps = total + float(loss.detach()), steps + 1
        self.embedder_.train(False)
        self.fit_centres(layer_maps)
        return total / max(steps, 1)

    @torch.no_grad()
    def fit_centres(self, layer_maps: Mapping[str, torch.Tensor]) -> None:
        """k-means centres of the normal embeddings of these (training) maps."""
        n = len(layer_maps[self.layers_[0]])
        parts = [self._embed({k: layer_maps[k][first:first + self.batch_size] for k in self.layers_})
                 for first in range(0, n, self.batch_size)]
        z = torch.cat([p.permute(0, 2, 3, 1).reshape(-1, p.shape[1]) for p in parts])
        generator = torch.Generator().manual_seed(self.seed)
        if len(z) > KMEANS_POINTS:
            z = z[torch.randperm(len(z), generator=generator)[:KMEANS_POINTS].to(z.device)]
        self.centres_ = kmeans(z, self.k, generator)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_images(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        self._check_fitted("score_images")
        if self.centres_ is None:
            raise RuntimeError("cse: no k-means centres yet: train at least one epoch (or load_state_dict) first")
        self.embedder_.train(False)
        z = self._embed(layer_maps)
        n, d, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(n, h * w, d)
        centres = self.centres_.to(z.device)
        d2 = z.square().sum(-1, keepdim=True) - 2 * torch.matmul(z, centres.T) + centres.square().sum(1)
        return d2.min(dim=-1).values.clamp_min(0).sqrt().reshape(n, h, w), None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self._check_fitted("state_dict")
        state: dict[str, Any] = {f"embedder.{k}": v for k, v in self.embedder_.state_dict().items()}
        if self.centres_ is not None:
            state["centres"] = self.centres_
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_fitted("load_state_dict")
        self.embedder_.load_state_dict({k[len("embedder."):]: v for k, v in state.items() if k.startswith("embedder.")})
        self.centres_ = state["centres"].to(self.device_) if "centres" in state else None

    def training_state(self) -> dict[str, Any]:
        """Weights, centres, optimizer, random state and the category's defect bank as CPU copies."""
        state = _to_cpu({"model": self.state_dict(), "optimizer": self.optimizer_.state_dict(),
                         "generator": self.generator_.get_state()})
        if self.bank_ is not None:
            state["bank"] = self.bank_  # on the CPU already and never changed: shared, not copied
        return state

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        self.load_state_dict(dict(state["model"]))
        self.optimizer_.load_state_dict(state["optimizer"])
        self.generator_.set_state(state["generator"])
        bank = state.get("bank")
        self.bank_ = None if bank is None else {"maps": dict(bank["maps"]), "labels": bank["labels"]}
