"""Search spaces in Optuna's terms: the define-by-run function, the distributions, the samplers, the grid.

A validated :class:`search.space_schema.SearchSpace` becomes the Optuna parameters ``backbone``, then
``<backbone>.layers`` (a layer subset as one string, ``"blocks.1+blocks.2"``), ``head``, then
``<head>.<setting>`` for every sampled setting (:func:`define_by_run`); :func:`trial_config` turns the flat
parameters of a trial back into a trial configuration for :meth:`anoseg.config.TrialConfig.from_dict`.

This module needs Optuna, not Ray: the Ray Tune adapter wraps :func:`define_by_run` and :func:`make_sampler`
in ``OptunaSearch``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import optuna

from anoseg.errors import ConfigError
from search.space_schema import SearchSpace

__all__ = [
    "LAYER_SEP",
    "DefineByRun",
    "AskTellGridSampler",
    "define_by_run",
    "trial_config",
    "make_sampler",
    "distributions",
    "grid_search_space",
    "grid_size",
    "layer_choice",
    "parse_layer_choice",
    "describe",
    "short_value",
]

#: Joins a layer subset into one categorical choice: ["blocks.1", "blocks.2"] <-> "blocks.1+blocks.2".
LAYER_SEP = "+"


def layer_choice(layers: Sequence[str]) -> str:
    """A layer subset as one categorical choice: ["blocks.1", "blocks.2"] -> "blocks.1+blocks.2"."""
    return LAYER_SEP.join(layers)


def parse_layer_choice(value: str | Sequence[str]) -> list[str]:
    """Inverse of :func:`layer_choice` (a list passes through)."""
    if isinstance(value, str):
        return value.split(LAYER_SEP)
    return list(value)


def distributions(space: SearchSpace) -> dict[str, optuna.distributions.BaseDistribution]:
    """Every parameter of the conditional space (all branches) with its Optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, optuna.distributions.BaseDistribution] = {
        "backbone": CategoricalDistribution(list(space.backbones)),
    }
    for name, entry in space.backbones.items():
        out[f"{name}.layers"] = CategoricalDistribution([layer_choice(s) for s in entry["layers"]])
    out["head"] = CategoricalDistribution(list(space.heads))
    for head, specs in space.heads.items():
        for param, spec in specs.items():
            key = f"{head}.{param}"
            if spec["type"] == "int":
                out[key] = IntDistribution(spec["low"], spec["high"], log=spec["log"], step=spec["step"])
            elif spec["type"] == "float":
                out[key] = FloatDistribution(spec["low"], spec["high"], log=spec["log"], step=spec["step"])
            elif spec["type"] == "categorical":
                out[key] = CategoricalDistribution(spec["choices"])
    return out


class DefineByRun:
    """The define-by-run function for ``OptunaSearch(space=...)``: a picklable callable (Ray's searcher
    checkpoints pickle it). It only calls ``trial.suggest_*`` and returns None (no constants)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> None:
        space = self.space
        backbone = trial.suggest_categorical("backbone", list(space.backbones))
        trial.suggest_categorical(f"{backbone}.layers",
                                  [layer_choice(s) for s in space.backbones[backbone]["layers"]])
        head = trial.suggest_categorical("head", list(space.heads))
        for param, spec in space.heads[head].items():
            key = f"{head}.{param}"
            if spec["type"] == "int":
                trial.suggest_int(key, spec["low"], spec["high"], step=spec["step"], log=spec["log"])
            elif spec["type"] == "float":
                trial.suggest_float(key, spec["low"], spec["high"], step=spec["step"], log=spec["log"])
            elif spec["type"] == "categorical":
                trial.suggest_categorical(key, spec["choices"])
        return None

    def __repr__(self) -> str:
        return f"DefineByRun({self.space.source!r})"


def define_by_run(space: SearchSpace) -> Callable[[optuna.Trial], None]:
    """Suggest ``backbone``, ``<backbone>.layers``, ``head`` and ``<head>.<setting>`` for each sampled
    setting. Fixed settings are not suggested; :func:`trial_config` fills them in."""
    return DefineByRun(space)


def _plain(value: Any) -> Any:
    """numpy scalars (which some tools hand back) -> Python scalars."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (list, tuple, dict, str)) else value


def trial_config(space: SearchSpace, params: Mapping[str, Any]) -> dict[str, Any]:
    """Flat suggested parameters (as Optuna / Ray Tune give them) -> a trial configuration dict
    ``{backbone: {name, weights}, layers, image_size, head: {name, **settings}, batch_size, seed, device}``
    for :meth:`anoseg.config.TrialConfig.from_dict`. Keys that are not parameters of the space are ignored;
    a missing or out-of-space parameter is a ConfigError."""
    where = f"{space.source}: trial parameters"
    backbone = params.get("backbone")
    if backbone not in space.backbones:
        raise ConfigError(f"{where}: backbone {backbone!r} is not in the space; allowed: {', '.join(space.backbones)}")
    key = f"{backbone}.layers"
    if key not in params:
        raise ConfigError(f"{where}: missing {key!r}")
    layers = parse_layer_choice(params[key])
    choices = space.backbones[backbone]["layers"]
    if layers not in choices:
        raise ConfigError(f"{where}: {key} {params[key]!r} is not one of "
                          f"{', '.join(layer_choice(c) for c in choices)}")
    head = params.get("head")
    if head not in space.heads:
        raise ConfigError(f"{where}: head {head!r} is not in the space; allowed: {', '.join(space.heads)}")
    settings: dict[str, Any] = {}
    for param, spec in space.heads[head].items():
        if spec["type"] == "fixed":
            settings[param] = spec["value"]
            continue
        key = f"{head}.{param}"
        if key not in params:
            raise ConfigError(f"{where}: missing {key!r}")
        settings[param] = _plain(params[key])
    return {
        "backbone": {"name": backbone, "weights": space.backbones[backbone]["weights"]},
        "layers": layers,
        "image_size": space.image_size,
        "head": {"name": head, **settings},
        **space.trial,
    }


def grid_search_space(space: SearchSpace) -> dict[str, list[Any]]:
    """The GridSampler search space: every parameter of the conditional space with its values (categorical
    choices, or every int of a range; the schema allows no float range with the grid sampler)."""
    grid: dict[str, list[Any]] = {"backbone": list(space.backbones)}
    for name, entry in space.backbones.items():
        grid[f"{name}.layers"] = [layer_choice(s) for s in entry["layers"]]
    grid["head"] = list(space.heads)
    for head, specs in space.heads.items():
        for param, spec in specs.items():
            if spec["type"] == "categorical":
                grid[f"{head}.{param}"] = list(spec["choices"])
            elif spec["type"] == "int":
                grid[f"{head}.{param}"] = list(range(spec["low"], spec["high"] + 1, spec["step"]))
    return grid


def grid_size(space: SearchSpace) -> tuple[int, int]:
    """(points in the full-product grid, distinct trial configurations among them)."""
    grid = grid_search_space(space)
    points = math.prod(len(v) for v in grid.values())
    distinct = sum(len(e["layers"]) for e in space.backbones.values()) * sum(
        math.prod(len(grid[f"{h}.{p}"]) for p, s in specs.items() if s["type"] != "fixed")
        for h, specs in space.heads.items()
    )
    return points, distinct


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler, usable through ask / tell (as Ray Tune's OptunaSearch drives it).

    Optuna's ``after_trial`` calls ``study.stop()`` once the grid is exhausted, which raises a RuntimeError
    outside ``study.optimize`` and would surface from ``study.tell``. Here that stop is a no-op; the
    search's trial budget ends the run (a trial past the end of the grid repeats a grid point).
    """

    def after_trial(self, study: optuna.Study, trial: Any, state: Any, values: Any) -> None:
        try:
            super().after_trial(study, trial, state, values)
        except RuntimeError as exc:
            if "Study.stop" not in str(exc):
                raise


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named in the space, with its options."""
    build = _SAMPLER_BUILDERS[space.sampler["name"]]  # the schema allows only these names
    with warnings.catch_warnings():  # group / constant_liar are flagged experimental; they are chosen here
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return build(space)


def _tpe(space: SearchSpace) -> optuna.samplers.BaseSampler:
    opts = space.sampler
    return optuna.samplers.TPESampler(
        seed=opts["seed"], multivariate=opts["multivariate"], group=opts["group"],
        constant_liar=opts["constant_liar"], n_startup_trials=opts["n_startup_trials"],
        n_ei_candidates=opts["n_ei_candidates"],
    )


def _cmaes(space: SearchSpace) -> optuna.samplers.BaseSampler:
    opts = space.sampler
    # CMA-ES models only numeric parameters present in every trial; the categorical and conditional
    # ones go to this independent sampler (warn_independent_sampling off: that is by design here).
    independent = optuna.samplers.TPESampler(seed=opts["seed"], n_startup_trials=max(opts["n_startup_trials"], 1))
    return optuna.samplers.CmaEsSampler(
        seed=opts["seed"], n_startup_trials=opts["n_startup_trials"], sigma0=opts["sigma0"], popsize=opts["popsize"],
        with_margin=opts["with_margin"], use_separable_cma=opts["use_separable_cma"], lr_adapt=opts["lr_adapt"],
        consider_pruned_trials=opts["consider_pruned_trials"], independent_sampler=independent,
        warn_independent_sampling=False,
    )


def _nsga2(space: SearchSpace) -> optuna.samplers.BaseSampler:
    opts = space.sampler
    return optuna.samplers.NSGAIISampler(
        seed=opts["seed"], population_size=opts["population_size"], mutation_prob=opts["mutation_prob"],
        crossover_prob=opts["crossover_prob"], swapping_prob=opts["swapping_prob"],
    )


def _random(space: SearchSpace) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=space.sampler["seed"])


def _grid(space: SearchSpace) -> optuna.samplers.BaseSampler:
    return AskTellGridSampler(grid_search_space(space), seed=space.sampler["seed"])


#: Sampler name (the keys of search.space_schema.SAMPLERS) -> its builder from the space's options.
_SAMPLER_BUILDERS: dict[str, Callable[[SearchSpace], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe, "cmaes": _cmaes, "nsga2": _nsga2, "random": _random, "grid": _grid,
}


def describe(params: Mapping[str, Any]) -> str:
    """A short human description of a trial's parameters: backbone [layers] head(settings)."""
    backbone, head = params.get("backbone", "?"), params.get("head", "?")
    layers = params.get(f"{backbone}.layers", "")
    settings = ", ".join(f"{k.split('.', 1)[1]}={short_value(v)}" for k, v in sorted(params.items()) if k.startswith(f"{head}."))
    return f"{backbone} [{layers}] {head}({settings})"


def short_value(value: Any) -> str:
    """A float to 3 significant digits, anything else as text."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)
