"""Search spaces: a YAML file -> a validated :class:`SearchSpace` (the file's schema and every check).

A space file (see ``spaces/quick.yaml`` and ``spaces/mvtec.yaml``)::

    name: quick                       # run name (results/<name>/); default: the file name without .yaml
    dataset:
      root: results/data/synthetic    # dataset root (MVTec AD layout); the CLI's --data overrides it
      categories: all                 # "all" or a list; the list order is the fidelity order (fixed per search)
      image_size: 128                 # 32 .. 4096; default 256
    objective:                        # one metric, or a list of them for a Pareto front
      - {metric: aupro, mode: max}
    sampler: {name: tpe, seed: 0, multivariate: true, constant_liar: true, n_startup_trials: 5}
    scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or {name: none}
    budget: {trials: 20, max_concurrent: 2, time_limit_s: 3600}     # time_limit_s optional
    resources: {cpu: 1, gpu: 0}       # per trial; gpu may be a fraction (0.25)
    storage: null                     # null -> sqlite in the run folder (journal with --address); sqlite | journal | a URL
    cache: {enabled: true, path: null, max_gb: 20}   # feature cache; path null -> <run>/feature_cache
    trial: {batch_size: 16, seed: 0, device: auto}   # fixed TrialConfig fields
    space:
      backbones:                      # backbone -> its weights and its own layer subsets
        tf_efficientnet_lite0:
          weights: offline            # offline | hub | none | /path/file.pth; default offline
          layers: [[blocks.1, blocks.2], [blocks.2, blocks.4]]
      heads:                          # head -> its own settings (unnamed settings keep the head's default)
        padim:
          n_features: {type: int, low: 50, high: 100}
        patchcore:
          coreset_ratio: {type: float, low: 0.01, high: 0.2, log: true}
          k: {type: categorical, choices: [1, 3]}
          patch_size: 3               # a plain value = fixed

Fields
------
Only ``dataset`` (with ``root``), ``objective`` and ``space`` are required; the others default to
``sampler: {name: tpe, seed: 0}``, ``scheduler: {name: none}``, ``budget: {trials: 20, max_concurrent: 1}``,
``resources: {cpu: 1, gpu: 0}``, ``storage: null``, ``cache: {enabled: true, path: null, max_gb: 20}``,
``trial: {batch_size: 16, seed: 0, device: auto}``, ``selection: {protocol: holdout, validation_share: 0.5}``.

* ``name``: letters, digits, ``_ . -``.
* ``dataset``: ``root`` (required), ``categories`` ("all" or a list of unique names; ASHA's rungs follow it),
  ``image_size``.
* ``objective``: a mapping or a list of mappings ``{metric, mode}`` (a bare metric name is also accepted).
  Metrics (:data:`anoseg.metrics.METRIC_NAMES`): image_auroc, pixel_auroc, aupro (to 30% FPR), pixel_f1_max,
  image_f1_max, aupro_0.05 (to 5% FPR), seg_f1 (pixel F1 at mean + 3 std of the good validation pixels),
  miss_rate_0.05 (defective images missed at 5% false alarms, mode min) (quality), fit_seconds, ms_per_image
  (cost, mode min); each metric's default mode is its natural one. Modes: max | min. Several
  objectives make a Pareto front (use nsga2 or tpe, and scheduler none).
* ``sampler.name`` and its options (anything else is an error; ``sampler: tpe`` is short for ``{name: tpe}``):

  - ``tpe``: seed, multivariate (true), group (= multivariate: the space is conditional), constant_liar (true),
    n_startup_trials (10), n_ei_candidates (24).
  - ``cmaes`` (needs the ``cmaes`` package): seed, n_startup_trials (1), sigma0, popsize, with_margin,
    use_separable_cma, lr_adapt, consider_pruned_trials. **CMA-ES only models the numeric settings that occur in every trial**; the
    categorical ones (backbone, layers, head, categorical settings) and the conditional ones (the settings of a
    head when the space has several heads) are drawn by an independent TPE sampler. It pays off for one head
    with several numeric settings; single objective only.
  - ``nsga2``: seed, population_size (50), mutation_prob, crossover_prob (0.9), swapping_prob (0.5). Keep
    population_size well below budget.trials (it is one generation).
  - ``random``: seed.
  - ``grid``: seed. Every sampled setting must be categorical or an int range (at most 1000 values). The grid
    is the full product of every parameter of the conditional space (all backbones' layer choices, all heads'
    settings), so with several backbones or heads a configuration recurs for every value of the parameters it
    does not use: size the budget with :func:`search.space_optuna.grid_size` or keep grid spaces to one
    backbone and one head.
* ``scheduler``: ``{name: none}`` or ``{name: asha, grace_period: 1, reduction_factor: 2, brackets: 1,
  train_shares: [1]}``. The fidelity unit is one category (a trial reports after each category), so grace_period
  counts categories; with ``train_shares: [0.25, 0.5, 1]`` a feature head's trial goes over every category at
  25% of its training images, then at 50%, then at 100% (a fixed, nested subset), and the unit is one category at
  one share (the trial's result is that at 100%);
  a trainable head (stfpm) reports after every epoch with every category evaluated, so for it the unit is
  one epoch. ASHA's max_t is the largest fidelity of the space (:meth:`SearchSpace.max_fidelity`).
  ASHA stops trials on one metric: it needs a single objective.
* ``budget``: trials >= 1, max_concurrent >= 1, time_limit_s > 0 or null.
* ``resources``: cpu > 0, gpu >= 0 (a fraction below 1 packs several trials on one GPU; above 1 a whole
  number).
* ``storage`` (:mod:`search.storage`): null (SQLite in the run folder, or an Optuna journal file there when
  ``--address`` points at a Ray cluster), ``sqlite``, ``journal`` (``optuna.journal`` in the run folder: for run
  folders on NFS/EFS), a URL ``sqlite:///file.db``, ``journal:///abs/file.journal``, ``postgresql[+driver]://...``,
  ``mysql[+driver]://...``. A password only as an environment variable reference: ``postgresql://user:${VAR}@host/db``.
* ``cache``: enabled (true), path (a shared folder, or null for the run folder), max_gb (> 0).
* ``dedup`` (true): a trial whose effective configuration (the head's settings as it would run them: clamped to
  the layers' channels, ignored ones at their defaults) equals a completed trial's is answered from that record.
* ``selection`` (:mod:`anoseg.holdout`, :mod:`search.finalize`): ``{protocol: holdout, validation_share: 0.5,
  seed: 0, top_k: 3, prefer: best, bootstrap: 200, level: 0.95, n_images: 20, kinds: null, good_source: train,
  defects_per_type: 1}``. ``holdout`` splits each category's test
  images (stratified by defect type, deterministic) into a validation part, which every trial is evaluated and
  ranked on, and a test part, which only the chosen configurations see, once, when the search ends
  (``anoseg search finalize``): the best (or the Pareto set) and the top_k by the first objective, with
  bootstrap intervals (``bootstrap`` resamples; 0: none) at ``level``. ``prefer: cheapest_tied`` chooses, among
  the trials tied with the best (their paired difference interval holds 0), the one with the lowest
  ms_per_image. ``protocol: test`` ranks and reports on all test images (as published MVTec AD tables do):
  every output then says "selected on the test set". ``synthetic`` needs no real defect: ``n_images`` good
  images per category (held out of fitting from train/good, or with ``good_source: test`` taken from test/good)
  and a generated defect on each (:mod:`anoseg.anomalies`, ``kinds``: null for all) are what trials are ranked
  on; real defects, where there are any, only make the final report. ``few_shot`` adds ``defects_per_type``
  real defective images of each type to that validation set; the remaining real images are the test part.
* ``trial``: batch_size, seed, device (auto | cpu | cuda | cuda:N; cuda needs resources.gpu > 0).
* ``space.backbones``: backbone name (see ``anoseg backbones``) -> ``weights`` and ``layers``, a list of layer
  subsets, each a list of that backbone's layer names (``anoseg backbones --layers NAME``), no subset twice.
  ``weights: offline`` only for backbones whose weights package is installed (``anoseg backbones``).
* ``space.heads``: head name (see ``anoseg heads``) -> setting -> spec. Specs: ``{type: int, low, high,
  step: 1, log: false}``, ``{type: float, low, high, step: null, log: false}`` (log needs low > 0 and no step),
  ``{type: categorical, choices: [...]}`` (scalars), or a plain scalar (fixed). Every setting must be one the
  head has, and the head is built at the ends of every range (and with every choice) during validation, so
  out-of-range bounds fail before anything launches. ``padim: {}`` (or ``padim:``) searches no settings.

A key given twice in one YAML mapping is an error (PyYAML would keep the last one silently).

Checking
--------
:func:`load_space` / :func:`validate_space` check the structure (the pydantic schema :class:`SpaceFile`: types,
ranges, unknown fields, the cross-field rules) and then everything that needs the installed packages: the
backbone and head registries (imported here lazily: they pull in torch), ASHA's grace period and the
``cmaes`` package. Neither step imports Optuna: :mod:`search.space_optuna` builds on a validated space. :meth:`SearchSpace.to_stored` gives the normalised space
(every default filled in, JSON-serialisable, itself a valid space file) that a run folder keeps;
:meth:`SearchSpace.from_stored` reads it back checking the structure only, importing neither torch nor Optuna.

Optuna parameters (:func:`search.space_optuna.define_by_run`): ``backbone``, then ``<backbone>.layers`` (a
string such as ``"blocks.1+blocks.2"``), ``head``, then ``<head>.<setting>`` for every sampled setting.
:func:`search.space_optuna.trial_config` turns those flat parameters back into a trial configuration for
:meth:`anoseg.config.TrialConfig.from_dict`.
"""
from __future__ import annotations

import copy
import importlib.util
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, Union

import yaml
from pydantic import BeforeValidator, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from anoseg.config import BatchSize, Device, ImageSize, Seed, Weights
from anoseg.errors import AnosegError, ConfigError
from anoseg.holdout import DEFECT_KINDS as KINDS, GOOD_SOURCES, PROTOCOLS, Protocol
from anoseg.metrics import METRIC_NAMES, MODES, metric
from anoseg.schema import FieldError, Schema, config_error, fail, hint
from search.storage import SPEC_TEXT, check_spec

__all__ = [
    "SAMPLERS",
    "SCHEDULERS",
    "PARAM_TYPES",
    "GRID_MAX_VALUES",
    "GRID_MAX_POINTS",
    "Objective",
    "SpaceFile",
    "SearchSpace",
    "load_space",
    "validate_space",
]

PARAM_TYPES = ("int", "float", "categorical")
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
STORAGE_TEXT = SPEC_TEXT  # the forms of `storage` (search.storage)
GRID_MAX_VALUES = 1000  # values of one int range
GRID_MAX_POINTS = 10_000_000  # points of the full-product grid
#: Keys of ``trial`` that the search itself sets, and where they belong instead.
SEARCHED_TRIAL_FIELDS = {"image_size": "dataset.image_size", "backbone": "space.backbones",
                         "layers": "space.backbones.<name>.layers", "head": "space.heads"}

Number = Union[int, float]  # kept as written: 1 stays 1, 0.5 stays 0.5


def _scalar(value: Any) -> bool:
    """A plain setting value: null, true/false, a finite number or a string."""
    return value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value))


def _or_empty(value: Any) -> Any:
    """A section written as ``budget:`` (null) means its defaults."""
    return {} if value is None else value


# ----------------------------------------------------------------------------------------------- settings


class IntSpec(Schema):
    """``{type: int, low, high, step: 1, log: false}``."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> "IntSpec":
        if self.log and self.step != 1:
            raise FieldError("must be 1 with log: true (Optuna samples log ranges without a step)", "step")
        _check_range(self.low, self.high, self.step, self.log)
        return self


class FloatSpec(Schema):
    """``{type: float, low, high, step: null, log: false}``."""

    type: Literal["float"]
    low: float
    high: float
    step: float | None = Field(None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> "FloatSpec":
        if self.log and self.step is not None:
            raise FieldError("must be null with log: true (Optuna cannot combine them)", "step")
        _check_range(self.low, self.high, self.step, self.log)
        return self


def _check_range(low: float, high: float, step: float | None, log: bool) -> None:
    if low > high:
        raise FieldError(f"is {low!r}, above high {high!r}; need low <= high", "low")
    if log and low <= 0:
        raise FieldError(f"must be > 0 with log: true, got {low!r}", "low")
    if step is not None:
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            fixed = low + math.floor(n + 1e-9) * step
            raise FieldError(f"{high!r} is not low + a multiple of step {step!r}; use high: {fixed!r}", "high")


class CategoricalSpec(Schema):
    """``{type: categorical, choices: [...]}`` with distinct plain values."""

    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1, description="a non-empty list of values")

    @field_validator("choices")
    @classmethod
    def _plain_and_distinct(cls, choices: list[Any]) -> list[Any]:
        for i, choice in enumerate(choices):
            if not _scalar(choice):
                raise FieldError(f"must be a plain value (number, string, true/false, null), got {choice!r}", f"[{i}]")
            if any(type(c) is type(choice) and c == choice for c in choices[:i]):
                raise FieldError(f"{choice!r} is listed twice", f"[{i}]")
        return choices


class FixedSpec(Schema):
    """A plain value in the file: the setting is not searched."""

    type: Literal["fixed"]
    value: Any


def _spec_shorthand(value: Any) -> Any:
    """A plain value -> a fixed spec; a spec mapping must name a known type."""
    if isinstance(value, list):
        raise FieldError(f"a list is not a setting value; to search over it write "
                         f"{{type: categorical, choices: {value!r}}}")
    if isinstance(value, Mapping):
        if value.get("type") not in PARAM_TYPES:
            raise FieldError(f"unknown parameter type {value.get('type')!r}; allowed: {', '.join(PARAM_TYPES)} "
                             "(or a plain value for a fixed setting)", "type")
        return dict(value)
    if not _scalar(value):
        raise FieldError(f"must be a plain value or a spec {{type: int|float|categorical, ...}}, got {value!r}")
    return {"type": "fixed", "value": value}


ParamSpec = Annotated[
    Union[Annotated[IntSpec, Tag("int")], Annotated[FloatSpec, Tag("float")],
          Annotated[CategoricalSpec, Tag("categorical")], Annotated[FixedSpec, Tag("fixed")]],
    Discriminator(lambda v: v["type"] if isinstance(v, dict) else v.type),
    BeforeValidator(_spec_shorthand),
]
HeadSettings = Annotated[dict[str, ParamSpec], BeforeValidator(_or_empty),
                         Field(description="a mapping of the head's settings to specs (or nothing)")]
LayerSubset = Annotated[list[str], Field(
    description="a list of layer names (a subset; layers is a list of subsets: [[blocks.1, blocks.2]] is one "
                "subset of two layers, [[blocks.1], [blocks.2]] two subsets of one)")]


class Backbone(Schema):
    """``space.backbones.<name>``: the weights and the layer subsets to search."""

    example: ClassVar[str] = " (e.g. {weights: offline, layers: [[blocks.1, blocks.2]]})"
    weights: Weights = "offline"
    layers: list[LayerSubset] = Field(
        min_length=1, description="a non-empty list of layer subsets, each a list of layer names, e.g. "
                                  "[[blocks.1, blocks.2], [blocks.2]]")

    @field_validator("layers")
    @classmethod
    def _distinct(cls, subsets: list[list[str]]) -> list[list[str]]:
        seen: dict[frozenset[str], int] = {}
        for i, subset in enumerate(subsets):
            earlier = seen.setdefault(frozenset(subset), i)
            if earlier != i:
                raise FieldError(f"holds the same layers as layers[{earlier}]", f"[{i}]")
        return subsets


class Space(Schema):
    """``space``: the backbones and heads to search."""

    example: ClassVar[str] = " (e.g. {backbones: {resnet18: {layers: [[layer2]]}}, heads: {padim: {}}})"
    backbones: dict[str, Backbone] = Field(
        min_length=1, description="a mapping of at least one backbone name (see `anoseg backbones`) to "
                                  "{weights, layers}")
    heads: dict[str, HeadSettings] = Field(
        min_length=1, description="a mapping of at least one head name (see `anoseg heads`) to its settings")


# ----------------------------------------------------------------------------------------------- sections


class Dataset(Schema):
    """``dataset``: where the data is, which categories (in fidelity order) and the image size."""

    example: ClassVar[str] = " (e.g. {root: results/data/synthetic, categories: all, image_size: 256})"
    root: str = Field(pattern=r"\S", description="a folder path")
    categories: list[str] | None = None  # None = every category under root
    image_size: ImageSize = 256

    @field_validator("categories", mode="before")
    @classmethod
    def _categories(cls, value: Any) -> list[str] | None:
        if value is None or value == "all":
            return None
        if not isinstance(value, list) or not value:
            raise FieldError('must be "all" or a non-empty list of category names (its order is the fidelity '
                             f"order), got {value!r}")
        for i, cat in enumerate(value):
            if not isinstance(cat, str) or not cat or "/" in cat or cat == "all":
                raise FieldError(f"must be a category folder name, got {cat!r}", f"[{i}]")
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise FieldError(f"lists {', '.join(dupes)} twice")
        return value


class Objective(Schema):
    """One objective: a metric of :data:`anoseg.metrics.METRIC_NAMES` and its mode (default: the metric's)."""

    example: ClassVar[str] = " (e.g. {metric: aupro, mode: max})"
    metric: Literal[METRIC_NAMES]  # type: ignore[valid-type]
    mode: Literal[MODES]  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"metric": value}
        if isinstance(value, Mapping) and "mode" not in value and value.get("metric") in METRIC_NAMES:
            return {**value, "mode": metric(value["metric"]).mode}
        return value


def _objective_list(value: Any) -> Any:
    """One objective or a list of them."""
    if isinstance(value, list) and not value:
        raise FieldError("is empty; give one {metric, mode} or a list of them")
    return value if isinstance(value, list) else [value]


class _Sampler(Schema):
    """Options every sampler has."""

    name: str
    seed: Seed | None = 0


class TPEOptions(_Sampler):
    """``sampler: {name: tpe, ...}``: Optuna's TPESampler."""

    name: Literal["tpe"] = "tpe"
    multivariate: bool = True
    group: bool = True  # default: multivariate
    constant_liar: bool = True
    n_startup_trials: int = Field(10, ge=0)
    n_ei_candidates: int = Field(24, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _group_default(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and value.get("group") is None:
            return {**value, "group": value.get("multivariate", True)}
        return value

    @model_validator(mode="after")
    def _group_needs_multivariate(self) -> "TPEOptions":
        if self.group and not self.multivariate:
            raise FieldError("true needs multivariate: true", "group")
        return self


class CmaEsOptions(_Sampler):
    """``sampler: {name: cmaes, ...}``: Optuna's CmaEsSampler (numeric settings; TPE draws the others)."""

    name: Literal["cmaes"] = "cmaes"
    n_startup_trials: int = Field(1, ge=0)
    sigma0: Number | None = Field(None, gt=0)
    popsize: int | None = Field(None, ge=2)
    with_margin: bool = False
    use_separable_cma: bool = False
    lr_adapt: bool = False
    consider_pruned_trials: bool = False

    @model_validator(mode="after")
    def _margin_or_separable(self) -> "CmaEsOptions":
        if self.with_margin and self.use_separable_cma:
            raise FieldError("with_margin and use_separable_cma cannot both be true", "with_margin")
        if self.lr_adapt and (self.with_margin or self.use_separable_cma):
            raise FieldError("lr_adapt cannot be combined with with_margin or use_separable_cma", "lr_adapt")
        return self


class NSGA2Options(_Sampler):
    """``sampler: {name: nsga2, ...}``: Optuna's NSGAIISampler."""

    name: Literal["nsga2"] = "nsga2"
    population_size: int = Field(50, ge=2)
    mutation_prob: Number | None = Field(None, ge=0, le=1, description="a probability in [0, 1] or null")
    crossover_prob: Number = Field(0.9, ge=0, le=1, description="a probability in [0, 1]")
    swapping_prob: Number = Field(0.5, ge=0, le=1, description="a probability in [0, 1]")


class RandomOptions(_Sampler):
    """``sampler: random``."""

    name: Literal["random"] = "random"


class GridOptions(_Sampler):
    """``sampler: grid``: the full product of every parameter (see :meth:`SpaceFile._check_grid`)."""

    name: Literal["grid"] = "grid"


class NoScheduler(Schema):
    """``scheduler: none``: every trial runs to the end."""

    name: Literal["none"] = "none"


class ASHAOptions(Schema):
    """``scheduler: {name: asha, ...}``: Ray Tune's ASHA; the unit is one category (or epoch)."""

    name: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: Number = Field(2, gt=1)
    brackets: int = Field(1, ge=1)
    train_shares: list[Number] = Field(
        [1.0], min_length=1, strict=False,
        description="a list of increasing shares of each category's training images in (0, 1], ending at 1 "
                    "(e.g. [0.25, 0.5, 1]): feature heads are evaluated on every category at each share in turn")

    @field_validator("train_shares")
    @classmethod
    def _increasing_to_one(cls, shares: list[float]) -> list[float]:
        if any(not 0 < s <= 1 for s in shares) or any(b <= a for a, b in zip(shares, shares[1:])) or shares[-1] != 1:
            raise FieldError(f"must be increasing shares in (0, 1] ending at 1 (e.g. [0.25, 0.5, 1]), got {shares!r}")
        return [float(s) for s in shares]


#: Sampler name -> its options (with their defaults).
SAMPLERS: dict[str, type[_Sampler]] = {"tpe": TPEOptions, "cmaes": CmaEsOptions, "nsga2": NSGA2Options,
                                       "random": RandomOptions, "grid": GridOptions}
#: Scheduler name -> its options.
SCHEDULERS: dict[str, type[Schema]] = {"none": NoScheduler, "asha": ASHAOptions}


def _named(registry: Mapping[str, type[Schema]], default: str, noun: str) -> Any:
    """The type of a ``{name: ..., **options}`` section (or a bare name), its options checked per name."""

    def shorthand(value: Any) -> Any:
        value = {"name": value} if isinstance(value, str) else _or_empty(value)
        if not isinstance(value, Mapping):
            raise FieldError(f"expected a mapping {{name: {' | '.join(registry)}, ...}}, got {value!r}")
        name = value.get("name", default)
        if not isinstance(name, str) or name not in registry:
            raise FieldError(f"unknown {noun} {name!r}{hint(name, registry)}; allowed: {', '.join(registry)}", "name")
        return {**value, "name": name}

    members = tuple(Annotated[model, Tag(name)] for name, model in registry.items())
    return Annotated[Union[members], Discriminator(lambda v: v["name"] if isinstance(v, dict) else v.name),
                     BeforeValidator(shorthand)]


Sampler = _named(SAMPLERS, "tpe", "sampler")
Scheduler = _named(SCHEDULERS, "none", "scheduler")


class Budget(Schema):
    """How many trials, how many at once, and an optional wall-clock limit."""

    trials: int = Field(20, ge=1)
    max_concurrent: int = Field(1, ge=1)
    time_limit_s: Number | None = Field(None, gt=0, description="a number of seconds > 0 or null")


class Resources(Schema):
    """Per trial."""

    cpu: Number = Field(1, gt=0, description="a number of CPUs per trial > 0")
    gpu: Number = Field(0, ge=0, description="a number of GPUs per trial >= 0 (a fraction such as 0.5 packs "
                                             "trials on one GPU)")

    @field_validator("gpu")
    @classmethod
    def _fraction_or_whole(cls, gpu: float) -> float:
        if gpu > 1 and gpu != int(gpu):
            raise FieldError(f"must be a fraction below 1 or a whole number, got {gpu!r}")
        return gpu


class Cache(Schema):
    """The feature cache: on by default, in <run>/feature_cache unless a (shared) path is given."""

    enabled: bool = True
    path: str | None = Field(None, description="a folder path or null (the run folder)")
    max_gb: Number = Field(20, gt=0, description="a size in GB > 0")


PREFERENCES = ("best", "cheapest_tied")


def _kinds(value: Any) -> Any:
    """Defect kinds of the generator (anoseg.anomalies.KINDS), or null for all of them."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise FieldError(f"must be a non-empty list of defect kinds ({', '.join(KINDS)}) or null for all, got {value!r}")
    for i, kind in enumerate(value):
        if kind not in KINDS:
            raise FieldError(f"unknown defect kind {kind!r}; allowed: {', '.join(KINDS)}", f"[{i}]")
    return value


class Selection(Schema):
    """``selection``: which test images choose the configuration and which report it (anoseg.holdout)."""

    example: ClassVar[str] = " (e.g. {protocol: holdout, validation_share: 0.5, seed: 0})"
    protocol: Literal[PROTOCOLS] = "holdout"  # type: ignore[valid-type]
    validation_share: Number = Field(0.5, gt=0, lt=1, description="a fraction strictly between 0 and 1")
    seed: int = Field(0, ge=0)
    top_k: int = Field(3, ge=1, description="a number of trials >= 1 evaluated on the test part at the end")
    prefer: Literal[PREFERENCES] = "best"  # type: ignore[valid-type]
    bootstrap: int = Field(200, ge=0, le=100_000, description="a number of bootstrap resamples, 0 (no intervals) "
                                                              "to 100000")
    level: Number = Field(0.95, gt=0.5, lt=1, description="a confidence level strictly between 0.5 and 1")
    n_images: int = Field(20, ge=2, description="a number of good images >= 2 (synthetic, few_shot)")
    kinds: Annotated[list[str] | None, BeforeValidator(_kinds)] = None
    good_source: Literal[GOOD_SOURCES] = "train"  # type: ignore[valid-type]
    defects_per_type: int = Field(1, ge=1, description="a number of real defective images per type >= 1 (few_shot)")


class Trial(Schema):
    """The TrialConfig fields the search does not set."""

    batch_size: BatchSize = 16
    seed: Seed = 0
    device: Device = "auto"

    @model_validator(mode="before")
    @classmethod
    def _not_searched(cls, value: Any) -> Any:
        for key, home in SEARCHED_TRIAL_FIELDS.items():
            if isinstance(value, Mapping) and key in value:
                raise FieldError(f"is set by the search ({home}), not in trial; allowed: {', '.join(cls.model_fields)}",
                                 key)
        return value


def _storage(value: Any) -> Any:
    """The storage's form, checked here so that an error never shows a password (search.storage.check_spec)."""
    try:
        return check_spec(value)
    except ValueError as exc:
        raise FieldError(str(exc)) from None


class SpaceFile(Schema):
    """A space file's structure, with the checks that need no registry."""

    name: str = Field(pattern=NAME_RE, description="a folder name (letters, digits, _ . -)")
    dataset: Dataset
    objective: Annotated[list[Objective], BeforeValidator(_objective_list)]
    sampler: Sampler = TPEOptions()
    scheduler: Scheduler = NoScheduler()
    budget: Annotated[Budget, BeforeValidator(_or_empty)] = Budget()
    resources: Annotated[Resources, BeforeValidator(_or_empty)] = Resources()
    storage: Annotated[str | None, BeforeValidator(_storage)] = Field(None, description=STORAGE_TEXT)
    cache: Annotated[Cache, BeforeValidator(_or_empty)] = Cache()
    dedup: bool = True
    selection: Annotated[Selection, BeforeValidator(_or_empty)] = Selection()
    trial: Annotated[Trial, BeforeValidator(_or_empty)] = Trial()
    space: Space

    @field_validator("objective")
    @classmethod
    def _distinct_metrics(cls, objectives: list[Objective]) -> list[Objective]:
        for i, objective in enumerate(objectives):
            if any(o.metric == objective.metric for o in objectives[:i]):
                raise FieldError(f"{objective.metric!r} is already an objective", f"[{i}].metric")
        return objectives

    @model_validator(mode="after")
    def _consistent(self) -> "SpaceFile":
        metrics = ", ".join(o.metric for o in self.objective)
        if self.sampler.name == "cmaes" and len(self.objective) > 1:
            raise FieldError(f"cmaes optimises a single objective, got {len(self.objective)} ({metrics}); use "
                             "nsga2 or tpe for a Pareto front", "sampler.name")
        if self.scheduler.name == "asha" and len(self.objective) > 1:
            raise FieldError(f"asha needs a single objective (ASHA stops trials on one metric), got "
                             f"{len(self.objective)} ({metrics}); use scheduler: {{name: none}} for a Pareto "
                             "front, or one objective", "scheduler.name")
        if self.trial.device.startswith("cuda") and not self.resources.gpu:
            raise FieldError(f"is {self.trial.device!r} but resources.gpu is 0, so trials see no GPU; set "
                             "resources.gpu > 0 or device: auto | cpu", "trial.device")
        if self.sampler.name == "grid":
            self._check_grid()
        if self.selection.prefer == "cheapest_tied" and len(self.objective) > 1:
            raise FieldError("cheapest_tied picks among the trials tied on one objective; with several objectives "
                             "the Pareto set is exported: use prefer: best", "selection.prefer")
        return self

    def _check_grid(self) -> None:
        """Every sampled setting enumerable (categorical, or an int range of at most GRID_MAX_VALUES values) and
        the full product of every parameter at most GRID_MAX_POINTS points."""
        backbones, heads = self.space.backbones, self.space.heads
        points = len(backbones) * math.prod(len(b.layers) for b in backbones.values()) * len(heads)
        for head, specs in heads.items():
            for param, spec in specs.items():
                path = f"space.heads.{head}.{param}"
                if isinstance(spec, FloatSpec):
                    raise FieldError("the grid sampler needs categorical or int parameters, this is a float range; "
                                     "list its values as {type: categorical, choices: [...]}", path)
                if isinstance(spec, IntSpec):
                    count = (spec.high - spec.low) // spec.step + 1
                    if count > GRID_MAX_VALUES:
                        raise FieldError(f"the grid sampler would enumerate {count} values (at most "
                                         f"{GRID_MAX_VALUES}); raise step or use {{type: categorical, choices: "
                                         "[...]}", path)
                    points *= count
                elif isinstance(spec, CategoricalSpec):
                    points *= len(spec.choices)
        if points > GRID_MAX_POINTS:
            raise FieldError(f"the grid has {points} points (at most {GRID_MAX_POINTS}); shrink the space or use "
                             "another sampler", "sampler.name")


# ----------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class SearchSpace:
    """A validated space file.

    ``backbones``: ``{name: {"weights": str, "layers": [[layer, ...], ...]}}``.
    ``heads``: ``{name: {setting: spec}}`` with every spec normalised to one of
    ``{"type": "int", "low", "high", "step", "log"}``, ``{"type": "float", "low", "high", "step", "log"}``,
    ``{"type": "categorical", "choices": [...]}`` or ``{"type": "fixed", "value": v}``.
    ``sampler``, ``scheduler``, ``budget``, ``resources``, ``cache`` and ``trial`` hold every option, defaults
    filled in.
    """

    name: str
    data_root: str
    categories: list[str] | None  # None = every category under data_root
    image_size: int
    objectives: list[Objective]
    sampler: dict[str, Any]
    scheduler: dict[str, Any]
    budget: dict[str, Any]
    resources: dict[str, Any]
    storage: str | None
    trial: dict[str, Any]
    backbones: dict[str, dict[str, Any]]
    heads: dict[str, dict[str, dict[str, Any]]]
    source: str = "space"
    cache: dict[str, Any] = field(default_factory=lambda: Cache().model_dump())
    dedup: bool = True  # answer a trial whose effective configuration has completed from that record
    selection: dict[str, Any] = field(default_factory=lambda: Selection().model_dump())
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def metric_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]

    @property
    def train_shares(self) -> list[float]:
        """The shares of the training images a feature head's trial is evaluated at, in turn (ASHA only)."""
        return list(self.scheduler.get("train_shares") or [1.0])

    def max_fidelity(self, n_categories: int) -> int:
        """The most reports any trial can make: the categories (at every training share), or a trainable head's
        largest `epochs`."""
        from anoseg.heads import HEADS, create_head, head_defaults

        most = n_categories * len(self.train_shares)
        for head, specs in self.heads.items():
            if getattr(HEADS[head], "trainable", False):  # its epochs at every combination of the range ends
                ends = [[(param, value) for _, value in _extremes(spec)] for param, spec in specs.items()]
                for combination in itertools.product(*ends):
                    most = max(most, int(create_head(head, **{**head_defaults(head), **dict(combination)}).epochs))
        return most

    def to_stored(self) -> dict[str, Any]:
        """The normalised space as a JSON-serialisable space file: every default filled in, fixed settings as
        plain values. :meth:`from_stored` reads it back into an equal SearchSpace."""
        return copy.deepcopy({
            "name": self.name,
            "dataset": {"root": self.data_root, "categories": self.categories, "image_size": self.image_size},
            "objective": [o.model_dump() for o in self.objectives],
            "sampler": self.sampler,
            "scheduler": self.scheduler,
            "budget": self.budget,
            "resources": self.resources,
            "storage": self.storage,
            "cache": self.cache,
            "dedup": self.dedup,
            "selection": self.selection,
            "trial": self.trial,
            "space": {
                "backbones": self.backbones,
                "heads": {head: {param: spec["value"] if spec["type"] == "fixed" else spec
                                 for param, spec in specs.items()} for head, specs in self.heads.items()},
            },
        })

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any], source: str) -> "SearchSpace":
        """The SearchSpace of :meth:`to_stored`'s dict, its structure checked; no registry check, no torch, no
        Optuna (for readers of a run folder). A run stored before ``selection`` existed ranked its trials
        on the test images: it reads back as ``protocol: test``."""
        stored = dict(stored)
        stored.setdefault("selection", {"protocol": "test"})
        return _space(stored, source)

    @property
    def protocol(self) -> Protocol | None:
        """What trials are ranked on (:class:`anoseg.holdout.Protocol`), or None for protocol test (all test
        images)."""
        if self.selection["protocol"] == "test":
            return None
        return Protocol.from_selection(self.selection)


# ----------------------------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (the second one would silently replace the first)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file; every mistake is a ConfigError naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {' '.join(str(problem).split())}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the space file: {exc}") from None
    return validate_space(raw, str(path))


def validate_space(raw: Any, source: str = "space") -> SearchSpace:
    """Validate a loaded space file (a dict): its structure, then against what is installed: the backbone and
    head registries, ASHA's grace period (trainable heads report per epoch) and the sampler's package."""
    space = _space(raw, source)
    for check in (_check_sampler, _check_backbones, _check_heads, _check_grace_period):
        check(space)
    return space


def _space(raw: Any, source: str) -> SearchSpace:
    """The structure check (:class:`SpaceFile`) and the SearchSpace it gives."""
    data = dict(raw) if isinstance(raw, Mapping) else raw
    if isinstance(data, dict) and source.endswith((".yaml", ".yml")):
        data.setdefault("name", Path(source).stem)
    try:
        spec = SpaceFile.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, source, SpaceFile) from None
    return SearchSpace(
        name=spec.name, data_root=spec.dataset.root, categories=spec.dataset.categories,
        image_size=spec.dataset.image_size, objectives=list(spec.objective), sampler=spec.sampler.model_dump(),
        scheduler=spec.scheduler.model_dump(), budget=spec.budget.model_dump(),
        resources=spec.resources.model_dump(), storage=spec.storage, trial=spec.trial.model_dump(),
        backbones={name: entry.model_dump() for name, entry in spec.space.backbones.items()},
        heads={head: {param: s.model_dump() for param, s in specs.items()}
               for head, specs in spec.space.heads.items()},
        source=source, cache=spec.cache.model_dump(), dedup=spec.dedup, selection=spec.selection.model_dump(),
        raw=dict(raw),
    )


# ----------------------------------------------------------------------------------------------- checks


def _check_backbones(space: SearchSpace) -> None:
    """Known backbone names, weights that load here, layers the backbone has."""
    from anoseg.backbones import list_backbones, parse_weights, validate_layers

    infos = {b.name: b for b in list_backbones()}
    for name, entry in space.backbones.items():
        path = f"space.backbones.{name}"
        if name not in infos:
            raise fail(space.source, path, f"unknown backbone {name!r}{hint(name, infos)}; "
                       f"allowed: {', '.join(infos)}")
        try:
            kind = parse_weights(entry["weights"]).kind
        except ConfigError as exc:
            raise fail(space.source, f"{path}.weights", str(exc)) from None
        if kind == "offline" and not infos[name].offline_weights:
            have = [b.name for b in infos.values() if b.offline_weights]
            raise fail(space.source, f"{path}.weights", f"backbone {name!r} has no offline weights here (only "
                       f"{', '.join(have) or 'none installed'}); use hub, none or a /path/file.pth")
        for i, subset in enumerate(entry["layers"]):
            try:
                validate_layers(name, subset)
            except ConfigError as exc:
                raise fail(space.source, f"{path}.layers[{i}]", str(exc)) from None


def _check_heads(space: SearchSpace) -> None:
    """Known head names and settings; the head builds at every range end and with every choice."""
    from anoseg.heads import HEADS, head_defaults

    for name, specs in space.heads.items():
        path = f"space.heads.{name}"
        if name not in HEADS:
            raise fail(space.source, path, f"unknown head {name!r}{hint(name, HEADS)}; "
                       f"allowed: {', '.join(sorted(HEADS))}")
        defaults = head_defaults(name)
        for param in specs:
            if param not in defaults:
                allowed = ", ".join(f"{k} (default {v!r})" for k, v in defaults.items())
                raise fail(space.source, f"{path}.{param}", f"unknown setting {param!r} of head {name!r}"
                           f"{hint(param, defaults)}; allowed: {allowed}")
        _check_constructible(name, specs, space.source, path)


def _extremes(spec: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(field suffix, value) pairs a head must accept for this spec: the range ends or every choice."""
    if spec["type"] == "fixed":
        return [("", spec["value"])]
    if spec["type"] == "categorical":
        return [(f".choices[{i}]", c) for i, c in enumerate(spec["choices"])]
    return [(".low", spec["low"]), (".high", spec["high"])]


def _check_constructible(head: str, specs: Mapping[str, Mapping[str, Any]], source: str, path: str) -> None:
    """Build the head with every fixed value, every range end and every choice (each alone, then the
    corners together) so that bounds the head rejects fail now rather than in a trial."""
    from anoseg.heads import create_head

    def build(params: Mapping[str, Any], where: str) -> None:
        try:
            create_head(head, **params)
        except AnosegError as exc:
            raise fail(source, where, str(exc)) from None
        except (TypeError, ValueError) as exc:  # a head constructor without its own checks
            raise fail(source, where, f"head {head!r} rejects {dict(params)!r}: {exc}") from None

    fixed = {p: s["value"] for p, s in specs.items() if s["type"] == "fixed"}
    for param, value in fixed.items():
        build({param: value}, f"{path}.{param}")
    for param, spec in specs.items():
        if spec["type"] != "fixed":
            for suffix, value in _extremes(spec):
                build({param: value}, f"{path}.{param}{suffix}")
    sampled = {p: _extremes(s) for p, s in specs.items() if s["type"] != "fixed"}
    corners = itertools.product(*sampled.values())
    for combo in itertools.islice(corners, 256):
        params = {**fixed, **{p: v for p, (_, v) in zip(sampled, combo)}}
        build(params, f"{path} (the combination {params!r})")


def _check_grace_period(space: SearchSpace) -> None:
    """ASHA's first rung must be reachable by some trial of the space."""
    if space.scheduler["name"] != "asha" or space.categories is None:
        return
    most = space.max_fidelity(len(space.categories))
    if space.scheduler["grace_period"] > most:
        raise fail(space.source, "scheduler.grace_period",
                   f"is {space.scheduler['grace_period']} but no trial of this space gets that far: the fidelity "
                   f"unit is one category ({len(space.categories)}: {', '.join(space.categories)}), or one epoch "
                   f"for trainable heads; the largest fidelity here is {most}")


def _cmaes_available() -> bool:
    return importlib.util.find_spec("cmaes") is not None


def _check_sampler(space: SearchSpace) -> None:
    """The sampler's package is installed."""
    if space.sampler["name"] == "cmaes" and not _cmaes_available():
        raise fail(space.source, "sampler.name", "cmaes needs the Python package 'cmaes', which is not installed "
                   "(pip install cmaes); or use tpe, nsga2, random or grid")
