"""Shared machinery of the torchvision families: a truncated "plan" body that keeps the full model's
parameter names (so a full-model state dict loads into it), and the weights handling."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from torch import Tensor, nn

from anoseg.backbones.registry import FeatureExtractor
from anoseg.backbones.weights import (
    WeightsSource,
    WeightsSpec,
    apply_state_dict,
    fetch_from_torch_hub,
    read_state_dict,
    torch_hub_source,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Step:
    """Run the module at ``path`` (of the full model) on the running tensor; record it as layer ``tap``.

    ``fn(module, x)`` replaces ``module(x)`` where the module's own forward is not what we want."""

    tap: str | None
    path: str
    fn: Callable[[nn.Module, Tensor], Tensor] | None = None


def mirror_into(root: nn.Module, model: nn.Module, paths: Iterable[str]) -> None:
    """Register ``model``'s submodules at ``paths`` under ``root`` at the same dotted paths (plain
    ``nn.Module`` containers in between), so ``root.state_dict()`` keys are a subset of ``model``'s."""
    for path in paths:
        *parents, leaf = path.split(".")
        node = root
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]  # type: ignore[assignment]
        if leaf not in node._modules:
            node.add_module(leaf, model.get_submodule(path))


class PlanBody(nn.Module):
    """Runs a linear plan of steps, stopping after the deepest wanted tap; returns every tap computed."""

    def __init__(self, model: nn.Module, plan: Sequence[Step], wanted: Iterable[str]) -> None:
        super().__init__()
        wanted = set(wanted)
        taps = [i for i, step in enumerate(plan) if step.tap in wanted]
        self.steps = list(plan[: max(taps) + 1]) if taps else []
        mirror_into(self, model, [s.path for s in self.steps])

    def run_plan(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for step in self.steps:
            module = self.get_submodule(step.path)
            x = step.fn(module, x) if step.fn is not None else module(x)
            if step.tap is not None:
                out[step.tap] = x
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.run_plan(x)


def plan_taps(plan: Sequence[Step]) -> list[str]:
    return [s.tap for s in plan if s.tap is not None]


def hub_weights(model: "str | Callable[..., nn.Module]"):
    """The torchvision weights enum ``weights="hub"`` loads for ``model`` (a builder or its name): its DEFAULT."""
    import torchvision

    return torchvision.models.get_model_weights(model).DEFAULT


def torchvision_hub_source(model: str) -> Callable[[], WeightsSource]:
    """For :func:`~anoseg.backbones.registry.register_backbone`: where the hub weights of torchvision model
    ``model`` come from (its weights enum's URL) and whether they are in the torch hub cache."""

    def source() -> WeightsSource:
        enum = hub_weights(model)
        return torch_hub_source(enum.url, where=f"torchvision:{enum}")

    return source


def build_torchvision(
    name: str,
    ctor: Callable[..., nn.Module],
    layers: Sequence[str] | None,
    weights: WeightsSpec,
    all_layers: Sequence[str],
    make_body: Callable[[nn.Module, list[str]], nn.Module],
    **ctor_kwargs,
) -> FeatureExtractor:
    """Build torchvision model ``ctor`` with ``weights``, cut out ``make_body(model, layers)`` and wrap it."""
    import torchvision

    wanted = list(all_layers) if layers is None else list(layers)
    detail = ""
    if weights.kind == "hub":
        enum = hub_weights(ctor)
        detail = f"torchvision:{enum} ({enum.url})"
        model = fetch_from_torch_hub(
            f"{name} weights {enum}", enum.url, lambda: ctor(weights=enum, weights_backbone=None, **ctor_kwargs)
        )
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ctor(weights=None, weights_backbone=None, **ctor_kwargs)
    body = make_body(model, wanted)
    if weights.kind == "file":
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        apply_state_dict(body, read_state_dict(weights.path), shapes, source=f"file {weights.path}", backbone=name)
    return FeatureExtractor(
        body,
        wanted,
        name=name,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights=weights.provenance(),
        weights_detail=detail,
        pretrained=weights.pretrained,
    )
