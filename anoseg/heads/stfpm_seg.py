"""STFPM-assisted segmentation ("student-teacher model assisted segmentation", from the STFPM thesis).

Two phases on one category, counted in one epoch axis (epochs = stfpm_epochs + seg_epochs; the trial
calls `train_epoch` once per epoch and reports after each):

1. STFPM phase (epochs 1 .. stfpm_epochs): the existing :class:`~anoseg.heads.stfpm.STFPM` head, held by
   composition and trained as is (discrepancy scaling optional). Scores in this phase are the STFPM's
   own maps, bit for bit those of a plain ``stfpm`` head with the same settings.
2. Segmentation phase: the student is frozen. At its first epoch a FIXED bank of `bank_size` images is
   built once: a quarter are the training images as they are (empty masks), the rest carry generated
   defects (:func:`anoseg.anomalies.generate_batch`, seeded, `defect_kinds`, other training images as the
   ``patch`` pool). One pass computes their backbone maps (fp16, as the feature cache keeps them) and the
   frozen STFPM's per-layer discrepancy maps (scaled when `discrepancy_scaling`); these (the backbone
   maps only with `with_features`) and the masks (area-averaged to the output grid) stay in the
   per-category training state, so later epochs run no backbone or student forward (about
   3x faster segmentation epochs on the CPU, bench/stfpm_seg_vs_stfpm.py). Size: bank_size x (layers + with_features
   the selected layers' channels at their own grids) x 2 bytes.
   The segmentation network reads, on the finest selected grid, one channel per layer of discrepancy
   (+ the selected backbone channels with `with_features`), standardised per channel with the bank's
   statistics: conv 3x3 -> conv 3x3 (dilation 2) -> bilinear upsampling x2 -> conv 3x3 -> conv 1x1,
   ReLUs between, trained with Adam (`lr`) on sigmoid focal loss (`focal_gamma`, mean over pixels) +
   `dice_weight` x soft dice (over the batch).

Scores (segmentation phase): the network's LOGIT per position of its output grid (2x the finest
selected grid) is the patch map; the image score is the map maximum (None). The logit, not the
sigmoid probability: the pipeline ranks and thresholds the maps after upsampling and smoothing, and
float32 sigmoids saturate at 1 for confident defects (ties at the top of the ranking); the logit is the
same decision (sigmoid(logit) > 0.5 <=> logit > 0) without the ties. Measured (bench): pixel F1 at a
validation-chosen threshold 0.329 with logit maps, 0.309 with sigmoid maps (AUPRO 0.723 / 0.740).

Settings: stfpm_epochs, seg_epochs; lr (segmentation network, Adam); focal_gamma; dice_weight;
with_features; defect_kinds (null: every kind of anoseg.anomalies, or comma-separated kinds);
bank_size; batch_size (both phases); seed; passed through to the STFPM: stfpm_lr (null: the optimizer's
usual rate), stfpm_optimizer, discrepancy_scaling, holdout.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anoseg.anomalies import KINDS, DefectConfig, generate_batch
from anoseg.errors import ConfigError
from anoseg.features import combine_layers
from anoseg.heads.base import SEED, TracedImageScorer, TrainableHead, head_defaults, is_int, is_number, \
    register_head
from anoseg.heads.stfpm import DEFAULT_LR, STFPM, _to_cpu

WIDTH = 32  # channels of the segmentation network
NORMAL_SHARE = 0.25  # share of the bank left defect-free (empty masks)
POOL_SIZE = 8  # training images offered as the 'patch' kind's pool
PRIOR = 0.01  # initial defect probability of the output (focal loss bias initialisation)


def _kinds(value: Any) -> tuple[str, ...] | None:
    """None -> None (every kind); "a,b" or ["a", "b"] -> ("a", "b"); () when not a list of known kinds."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        kinds = tuple(p.strip() for p in parts)
    except (TypeError, AttributeError):
        return ()
    return kinds if kinds and all(k in KINDS for k in kinds) and len(set(kinds)) == len(kinds) else ()


class SegNet(nn.Module):
    """A few convolutions and one x2 upsampling: (N, C, h, w) inputs -> (N, 2h, 2w) defect logits."""

    def __init__(self, in_channels: int, width: int = WIDTH) -> None:
        super().__init__()
        self.register_buffer("in_mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("in_std", torch.ones(1, in_channels, 1, 1))
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(width, width // 2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width // 2, 1, 1),
        )
        nn.init.constant_(self.body[-1].bias, -float(torch.log(torch.tensor((1 - PRIOR) / PRIOR))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.in_mean) / self.in_std)[:, 0]


def focal_dice_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float, dice_weight: float) -> torch.Tensor:
    """Sigmoid focal loss (mean over pixels) + dice_weight x (1 - soft dice over the whole batch); targets in [0, 1]."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    focal = (ce * (1 - p_t).pow(gamma)).mean() if gamma > 0 else ce.mean()
    dice = 1 - (2 * (p * targets).sum() + 1) / (p.sum() + targets.sum() + 1)
    return focal + dice_weight * dice


@register_head("stfpm_seg")
class STFPMSeg(TrainableHead):
    constraints = {
        "stfpm_epochs": (lambda v: is_int(v) and 1 <= v <= 10000, "an integer in [1, 10000]"),
        "seg_epochs": (lambda v: is_int(v) and 1 <= v <= 10000, "an integer in [1, 10000]"),
        "lr": (lambda v: is_number(v) and 0 < v <= 10, "a number in (0, 10]"),
        "focal_gamma": (lambda v: is_number(v) and 0 <= v <= 10, "a number in [0, 10]"),
        "dice_weight": (lambda v: is_number(v) and 0 <= v <= 100, "a number in [0, 100]"),
        "with_features": (lambda v: isinstance(v, bool), "true or false"),
        "defect_kinds": (lambda v: _kinds(v) != (), f"null (all) or distinct kinds from {', '.join(KINDS)}, "
                                                    "comma-separated or a list"),
        "bank_size": (lambda v: is_int(v) and 2 <= v <= 100000, "an integer in [2, 100000]"),
        "batch_size": (lambda v: is_int(v) and 1 <= v <= 4096, "an integer in [1, 4096]"),
        "seed": SEED,
        "stfpm_lr": STFPM.constraints["lr"],
        "stfpm_optimizer": STFPM.constraints["optimizer"],
        "discrepancy_scaling": STFPM.constraints["discrepancy_scaling"],
        "holdout": STFPM.constraints["holdout"],
    }
    fitted_attributes = ("stfpm_",)
    stfpm_: STFPM | None = None  # the STFPM (phase 1), frozen in phase 2
    seg_: SegNet | None = None
    optimizer_: torch.optim.Optimizer | None
    backbone_: torch.nn.Module | None  # the frozen backbone: the bank's maps
    layers_: list[str]
    device_: torch.device
    generator_: torch.Generator  # shuffles the bank
    epoch_: int  # epochs trained on the current category (both phases)
    bank_: dict[str, torch.Tensor]  # phase 2: "disc" (B, L, h, w), "maps.<layer>" (with_features), "targets"
    #                                  (B, 2h, 2w), all fp16; empty in phase 1
    timing_: dict[str, float]  # seconds of the latest bank build: "generate", "forward" (backbone + student)

    def __init__(self, stfpm_epochs: int = 20, seg_epochs: int = 20, lr: float = 3e-3, focal_gamma: float = 2.0,
                 dice_weight: float = 1.0, with_features: bool = True, defect_kinds: str | None = None,
                 bank_size: int = 64, batch_size: int = 16, seed: int = 0, stfpm_lr: float | None = None,
                 stfpm_optimizer: str = "sgd", discrepancy_scaling: bool = False, holdout: float = 0.2):
        self.stfpm_epochs, self.seg_epochs, self.lr, self.focal_gamma, self.dice_weight = (
            stfpm_epochs, seg_epochs, lr, focal_gamma, dice_weight)
        self.with_features, self.defect_kinds, self.bank_size, self.batch_size, self.seed = (
            with_features, defect_kinds, bank_size, batch_size, seed)
        self.stfpm_lr, self.stfpm_optimizer, self.discrepancy_scaling, self.holdout = (
            stfpm_lr, stfpm_optimizer, discrepancy_scaling, holdout)

    @property
    def epochs(self) -> int:  # type: ignore[override]
        """The fidelity: STFPM epochs, then segmentation epochs."""
        return self.stfpm_epochs + self.seg_epochs

    @property
    def in_segmentation(self) -> bool:
        """Whether the segmentation phase has started (its network scores)."""
        return self.epoch_ > self.stfpm_epochs

    # ------------------------------------------------------------------ set-up
    @classmethod
    def effective_params(cls, params: Mapping[str, Any], n_channels: int) -> dict[str, Any]:
        """stfpm_lr null is the optimizer's usual rate; holdout matters only with discrepancy scaling;
        defect_kinds as a comma-separated string."""
        out = super().effective_params(params, n_channels)
        if out["stfpm_lr"] is None:
            out["stfpm_lr"] = DEFAULT_LR.get(out["stfpm_optimizer"])
        if not out["discrepancy_scaling"]:
            out["holdout"] = head_defaults(cls.name)["holdout"]
        kinds = _kinds(out["defect_kinds"])
        out["defect_kinds"] = ",".join(kinds) if kinds else out["defect_kinds"]
        return out

    def _stfpm(self) -> STFPM:
        return STFPM(epochs=self.stfpm_epochs, lr=self.stfpm_lr, batch_size=self.batch_size,
                     optimizer=self.stfpm_optimizer, discrepancy_scaling=self.discrepancy_scaling,
                     holdout=self.holdout, seed=self.seed)

    def setup(self, backbone: torch.nn.Module, device: torch.device | str) -> STFPMSeg:
        self._validate_params()
        self.stfpm_ = self._stfpm().setup(backbone, device)
        self.backbone_ = backbone
        self.layers_ = list(backbone.layers)
        self.device_ = torch.device(device)
        self.generator_ = torch.Generator().manual_seed(self.seed)
        self.epoch_, self.bank_, self.timing_ = 0, {}, {}
        n_in = len(self.layers_) + (sum(backbone.channels[k] for k in self.layers_) if self.with_features else 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.seg_ = SegNet(n_in).to(self.device_)
        self.optimizer_ = torch.optim.Adam(self.seg_.parameters(), lr=self.lr)
        return self

    def holdout_count(self, n_train: int) -> int:
        try:
            return self._stfpm().holdout_count(n_train)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("head 'stfpm'", f"head {self.name!r}", 1)) from None

    def cpu_copy(self) -> STFPMSeg:
        """A copy for scoring on the CPU: its own STFPM and network, no optimizer, bank or backbone."""
        self._check_fitted("cpu_copy")
        head = copy.copy(self)
        head.stfpm_ = self.stfpm_.cpu_copy()
        head.seg_ = copy.deepcopy(self.seg_).to("cpu").float()
        head.optimizer_, head.backbone_, head.bank_ = None, None, {}
        head.device_ = torch.device("cpu")
        return head

    def onnx_scorer(self, layers: Sequence[str]) -> nn.Module:
        """score_images traced, with the student registered next to the network (its weights in the graph)."""
        self._check_fitted("onnx_scorer")
        scorer = TracedImageScorer(self.cpu_copy())
        scorer.networks["student"] = scorer.head.stfpm_.student_
        return scorer

    # ------------------------------------------------------------------ inputs of the network
    def _discrepancy(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(N, L, h, w) on the finest grid: each layer's discrepancy, scaled as the STFPM scales it."""
        stfpm = self.stfpm_
        disc = stfpm._discrepancies(images, layer_maps)
        grid = max((d.shape[-2:] for d in disc.values()), key=lambda s: s[0] * s[1])
        parts = []
        for layer, d in disc.items():
            if self.discrepancy_scaling:
                mean, std = stfpm.stats_[layer]
                d = (d - mean.to(d.device)) / std.to(d.device)
            if d.shape[-2:] != grid:
                d = F.interpolate(d[:, None], size=tuple(grid), mode="bilinear", align_corners=False)[:, 0]
            parts.append(d)
        return torch.stack(parts, dim=1)

    def _inputs(self, disc: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The network's input: the discrepancies, then with_features the backbone's channels on their grid."""
        if not self.with_features:
            return disc.float()
        features = combine_layers({k: layer_maps[k].to(disc.device) for k in self.layers_}, self.layers_)
        return torch.cat([disc.float(), features], dim=1)

    @torch.no_grad()
    def _build_bank(self, images: torch.Tensor) -> None:
        """The fixed bank of this category: generated once, its backbone and student forward done once."""
        start = time.perf_counter()
        n_normal = int(NORMAL_SHARE * self.bank_size)
        kinds = _kinds(self.defect_kinds)
        pool = images[:POOL_SIZE] if len(images) > 1 and (kinds is None or "patch" in kinds) else None
        defective, masks, _ = generate_batch(images, self.bank_size - n_normal, seed=self.seed,
                                             config=DefectConfig(kinds=kinds), pool=pool)
        bank_images = torch.cat([images[torch.arange(n_normal) % len(images)], defective])
        bank_masks = torch.cat([torch.zeros((n_normal, *masks.shape[1:]), dtype=torch.bool), masks])
        generated = time.perf_counter()
        mean = torch.tensor(self.backbone_.mean, device=self.device_).view(1, 3, 1, 1)
        std = torch.tensor(self.backbone_.std, device=self.device_).view(1, 3, 1, 1)
        self.stfpm_.student_.body.train(False)
        parts: dict[str, list[torch.Tensor]] = {}
        for first in range(0, len(bank_images), self.batch_size):
            batch = bank_images[first:first + self.batch_size]
            x = batch.to(self.device_).float() / 255
            maps = {k: m.half() for k, m in self.backbone_((x - mean) / std).items()}  # as the feature cache has them
            parts.setdefault("disc", []).append(self._discrepancy(batch, maps).half())
            if self.with_features:
                for layer in self.layers_:
                    parts.setdefault(f"maps.{layer}", []).append(maps[layer])
        bank = {key: torch.cat(chunks) for key, chunks in parts.items()}
        self._synchronize()
        grid = bank["disc"].shape[-2:]
        targets = F.adaptive_avg_pool2d(bank_masks[:, None].float(), (2 * grid[0], 2 * grid[1]))[:, 0]
        bank["targets"] = targets.half().to(self.device_)
        self.bank_ = bank
        total, total_sq = 0.0, 0.0  # the network's input statistics per channel, over the bank
        for index in torch.arange(len(bank_images)).split(self.batch_size):
            x = self._bank_inputs(index).double()
            total = total + x.sum(dim=(0, 2, 3))
            total_sq = total_sq + x.square().sum(dim=(0, 2, 3))
        count = len(bank_images) * grid[0] * grid[1]
        mean_c = total / count
        std_c = (total_sq / count - mean_c.square()).clamp_min(0).sqrt()
        self.seg_.in_mean.copy_(mean_c.float().view(1, -1, 1, 1))
        self.seg_.in_std.copy_(std_c.float().clamp_min(1e-6).view(1, -1, 1, 1))
        self.timing_ = {"generate": generated - start, "forward": time.perf_counter() - generated}

    def _bank_inputs(self, index: torch.Tensor) -> torch.Tensor:
        at = index.to(self.bank_["disc"].device)
        maps = {k: self.bank_[f"maps.{k}"][at] for k in self.layers_} if self.with_features else {}
        return self._inputs(self.bank_["disc"][at], maps)

    def _synchronize(self) -> None:
        if self.device_.type == "cuda":
            torch.cuda.synchronize(self.device_)

    # ------------------------------------------------------------------ training
    def train_epoch(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> float:
        """An STFPM epoch for the first stfpm_epochs calls, then a segmentation epoch over the bank."""
        self._check_fitted("train_epoch")
        self.epoch_ += 1
        if not self.in_segmentation:
            return self.stfpm_.train_epoch(images, layer_maps)
        if not self.bank_:
            self._build_bank(images)
        return self._seg_epoch()

    def _seg_epoch(self) -> float:
        targets = self.bank_["targets"]
        self.seg_.train(True)
        total = 0.0
        for index in torch.randperm(len(targets), generator=self.generator_).split(self.batch_size):
            loss = focal_dice_loss(self.seg_(self._bank_inputs(index)), targets[index.to(targets.device)].float(),
                                   self.focal_gamma, self.dice_weight)
            self.optimizer_.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer_.step()
            total += float(loss.detach()) * len(index)
        self.seg_.train(False)
        return total / len(targets)

    def calibrate(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> None:
        """The STFPM's discrepancy statistics, while it trains (frozen afterwards, so are they)."""
        if not self.in_segmentation:
            self.stfpm_.calibrate(images, layer_maps)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_images(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        """Segmentation phase: the network's logits (N, 2h, 2w) on the finest grid; before it: the STFPM's maps."""
        self._check_fitted("score_images")
        if not self.in_segmentation:
            return self.stfpm_.score_images(images, layer_maps)
        self.stfpm_.student_.body.train(False)
        self.seg_.train(False)
        return self.seg_(self._inputs(self._discrepancy(images, layer_maps), layer_maps)), None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self._check_fitted("state_dict")
        state: dict[str, Any] = {f"stfpm.{k}": v for k, v in self.stfpm_.state_dict().items()}
        state.update({f"seg.{k}": v for k, v in self.seg_.state_dict().items()})
        state["epoch"] = self.epoch_
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_fitted("load_state_dict")
        self.stfpm_.load_state_dict({k[len("stfpm."):]: v for k, v in state.items() if k.startswith("stfpm.")})
        self.seg_.load_state_dict({k[len("seg."):]: v for k, v in state.items() if k.startswith("seg.")})
        self.epoch_ = int(state["epoch"])

    def training_state(self) -> dict[str, Any]:
        """The STFPM's training state, the network, its optimizer and shuffling, the epoch (hence the phase) and the
        bank, as CPU copies."""
        return _to_cpu({"stfpm": self.stfpm_.training_state(), "seg": self.seg_.state_dict(),
                        "optimizer": self.optimizer_.state_dict(), "generator": self.generator_.get_state(),
                        "epoch": self.epoch_, "bank": self.bank_})

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        self.stfpm_.load_training_state(state["stfpm"])
        self.seg_.load_state_dict(state["seg"])
        self.optimizer_.load_state_dict(state["optimizer"])
        self.generator_.set_state(state["generator"])
        self.epoch_ = int(state["epoch"])
        self.bank_ = {k: v.to(self.device_) for k, v in state["bank"].items()}
