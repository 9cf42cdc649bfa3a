"""One search trial: fit and evaluate a configuration on each category, reporting as it goes.

`run_trial` is a plain function (no Ray): the search wraps it, tests call it. The fit -> score
path itself is :mod:`anoseg.pipeline`; this module decides the order and when to report:

- A feature head evaluates the categories one by one, in the given order, and reports after each
  (fidelity = categories done), so ASHA can stop a weak configuration after a few.
- A trainable head (STFPM) trains every category's head one epoch at a time, in lockstep, and
  reports after every epoch with every category evaluated (fidelity = epochs), so ASHA compares
  trials after equal training. One head object trains the categories in turn; each category's
  training state waits on the CPU between its turns, and those states together are the trial's
  checkpoint (a resumed trial continues from the last epoch).
"""
from __future__ import annotations

import hashlib
import json
import resource
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from anoseg.backbones import backbone_layers, create_backbone
from anoseg.cache import FeatureCache
from anoseg.config import TrialConfig
from anoseg.data import resolve_categories
from anoseg.errors import ConfigError
from anoseg.features import resolve_device
from anoseg.heads import HEADS, TrainableHead, create_head
from anoseg.holdout import Protocol
from anoseg.pipeline import FeatureSource, evaluate_category, evaluate_trained, load_category, train_epoch, \
    training_source
from anoseg.result import EPOCHS_UNIT, TrialReport, TrialResult

Report = Callable[[TrialReport], None]
Checkpoint = Callable[[dict[str, Any]], None]


def peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    """Peak resident memory of this process (and peak GPU memory allocated on CUDA), in MiB."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": round(rss_mb, 1), "peak_gpu_mb": None if gpu is None else round(gpu, 1)}


def effective_config(config: TrialConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The configuration as it would run: the head's settings with their defaults, clamped to the selected
    layers' channels and with the settings it would ignore at their defaults (see `effective_params`).
    Two configurations with the same effective form give the same results."""
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    channels = {info.name: info.channels for info in backbone_layers(cfg.backbone.name)}
    head = HEADS[cfg.head_name].effective_params(cfg.head_params, sum(channels[layer] for layer in cfg.layers))
    return {**cfg.to_dict(), "head": {"name": cfg.head_name, **head}}


def config_key(effective: Mapping[str, Any]) -> str:
    """A short digest of an effective configuration (equal configurations, equal keys)."""
    text = json.dumps(effective, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def run_trial(
    config: TrialConfig | Mapping[str, Any],
    data_root: str | Path,
    categories: Sequence[str] | str | None = None,
    report: Report | None = None,
    cache: FeatureCache | None = None,
    checkpoint: Checkpoint | None = None,
    resume: Mapping[str, Any] | None = None,
    train_shares: Sequence[float] = (1.0,),
    protocol: Protocol | None = None,
) -> TrialResult:
    """Evaluate `config` on each category in order, calling `report(TrialReport)` after every fidelity unit.

    A feature head goes over the categories once per share of the training images in `train_shares`
    (increasing, ending at 1; a fidelity unit is one category at one share); the result is the last.
    A trainable head also calls `checkpoint(state)` before each report, with a state that
    `resume=state` continues from (a resumed search). `cache` shares backbone features between
    trials (see anoseg.cache); results are the same with and without it. `protocol`: the metrics are
    those of what it ranks on (:class:`anoseg.holdout.Protocol`: a validation part of each category's test
    images, a synthetic set, or both), else of all test images.
    """
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    names = resolve_categories(data_root, categories)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    backbone = create_backbone(cfg.backbone.name, cfg.layers, cfg.backbone.weights).to(device)
    source = FeatureSource(backbone, cfg, device, cache)
    say = report or (lambda _report: None)
    if HEADS[cfg.head_name].trainable:
        head = create_head(cfg.head_name, **cfg.head_params)
        last = _train_in_lockstep(head, source, data_root, names, say, checkpoint, resume, protocol)
    else:
        total, step = len(names) * len(train_shares), 0
        for share in train_shares:
            per_category: dict[str, dict[str, float]] = {}
            for category in names:
                head = create_head(cfg.head_name, **cfg.head_params)
                per_category[category] = evaluate_category(head, source, data_root, category, share, protocol)
                step += 1
                last = TrialReport(dict(per_category), step, total, memory=peak_memory_mb(device), category=category,
                                   train_share=share)
                say(last)
    return TrialResult(cfg.to_dict(), backbone.weights, backbone.pretrained, last)


def _train_in_lockstep(head: TrainableHead, source: FeatureSource, data_root: str | Path, names: Sequence[str],
                       say: Report, checkpoint: Checkpoint | None, resume: Mapping[str, Any] | None,
                       protocol: Protocol | None) -> TrialReport:
    """Train a trainable head on every category one epoch at a time; report after every epoch."""
    head.setup(source.backbone, source.device)
    with training_source(source) as source:
        data = {c: load_category(source, data_root, c, head.holdout_count, protocol) for c in names}
        initial = head.training_state()
        state: dict[str, Any] = {"epoch": 0, "epochs": head.epochs, "categories": list(names),
                                 "heads": {c: initial for c in names}, "train_seconds": {c: 0.0 for c in names},
                                 "per_category": {}}
        if resume:
            check_resume(resume, state)
            state = {**state, **resume}
        per_category: dict[str, dict[str, float]] = dict(state["per_category"])
        last = TrialReport(per_category, int(state["epoch"]), head.epochs, EPOCHS_UNIT)
        for epoch in range(int(state["epoch"]) + 1, head.epochs + 1):
            losses = []
            for c in names:
                head.load_training_state(state["heads"][c])
                loss, seconds = train_epoch(head, data[c], source.device)
                losses.append(loss)
                state["train_seconds"][c] += seconds
                state["heads"][c] = head.training_state()
                per_category[c] = {**evaluate_trained(head, source, data[c], state["train_seconds"][c]), "loss": loss}
            state.update(epoch=epoch, per_category=per_category)
            if checkpoint is not None:
                checkpoint(state)
            last = TrialReport(dict(per_category), epoch, head.epochs, EPOCHS_UNIT,
                               memory=peak_memory_mb(source.device), epoch=epoch, loss=sum(losses) / len(losses),
                               resumed_from=int(resume["epoch"]) if resume else 0)
            say(last)
        return last


def check_resume(resume: Mapping[str, Any], fresh: Mapping[str, Any]) -> None:
    """A checkpoint must belong to this trial: same categories, same number of epochs."""
    for key in ("categories", "epochs"):
        have = resume.get(key)
        if (list(have or []) if key == "categories" else have) != fresh[key]:
            raise ConfigError(f"the checkpoint to resume from has {key} {resume.get(key)!r}, this trial {fresh[key]!r}")
