"""Search spaces: a YAML file -> a validated :class:`SearchSpace` -> Optuna's define-by-run function.

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
    storage: null                     # null -> sqlite file in the run folder; or a sqlite:/// postgresql:// mysql:// URL
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
``resources: {cpu: 1, gpu: 0}``, ``storage: null``, ``trial: {batch_size: 16, seed: 0, device: auto}``.

* ``name``: letters, digits, ``_ . -``.
* ``dataset``: ``root`` (required), ``categories`` ("all" or a list of unique names; ASHA's rungs follow it),
  ``image_size``.
* ``objective``: a mapping or a list of mappings ``{metric, mode}`` (a bare metric name is also accepted). Metrics: image_auroc, pixel_auroc, aupro,
  pixel_f1_max, image_f1_max (quality, default mode max), fit_seconds, ms_per_image (cost, default mode min).
  Modes: max | min. Several objectives make a Pareto front (use nsga2 or tpe, and scheduler none).
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
    does not use: size the budget with :func:`grid_size` or keep grid spaces to one backbone and one head.
* ``scheduler``: ``{name: none}`` or ``{name: asha, grace_period: 1, reduction_factor: 2, brackets: 1}``. The
  fidelity unit is one category (a trial reports after each category), so grace_period counts categories;
  a trainable head (stfpm) reports after every epoch with every category evaluated, so for it the unit is
  one epoch. ASHA's max_t is the largest fidelity of the space (:meth:`SearchSpace.max_fidelity`).
  ASHA stops trials on one metric: it needs a single objective.
* ``budget``: trials >= 1, max_concurrent >= 1, time_limit_s > 0 or null.
* ``resources``: cpu > 0, gpu >= 0 (a fraction below 1 packs several trials on one GPU; above 1 a whole
  number).
* ``storage``: null, or a URL ``sqlite:///file.db``, ``postgresql[+driver]://...``, ``mysql[+driver]://...``.
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

Optuna parameters (:func:`define_by_run`): ``backbone``, then ``<backbone>.layers`` (a string such as
``"blocks.1+blocks.2"``), ``head``, then ``<head>.<setting>`` for every sampled setting. :func:`trial_config`
turns those flat parameters back into a trial configuration for :meth:`anoseg.config.TrialConfig.from_dict`.

This module needs Optuna, not Ray: the Ray Tune adapter wraps :func:`define_by_run` and :func:`make_sampler`
in ``OptunaSearch``.
"""
from __future__ import annotations

import difflib
import importlib.util
import itertools
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
import yaml

from anoseg.errors import AnosegError, ConfigError

__all__ = [
    "METRICS",
    "SAMPLERS",
    "SCHEDULERS",
    "LAYER_SEP",
    "Objective",
    "SearchSpace",
    "DefineByRun",
    "AskTellGridSampler",
    "load_space",
    "validate_space",
    "define_by_run",
    "trial_config",
    "make_sampler",
    "distributions",
    "grid_search_space",
    "grid_size",
    "layer_choice",
    "parse_layer_choice",
]

TOP_LEVEL_FIELDS = ("name", "dataset", "objective", "sampler", "scheduler", "budget", "resources", "storage",
                    "cache", "trial", "space")
#: Feature cache: on by default, in <run>/feature_cache unless a (shared) path is given.
CACHE_DEFAULTS: dict[str, Any] = {"enabled": True, "path": None, "max_gb": 20}
#: Metric -> its natural mode (the default when an objective gives none).
METRICS: dict[str, str] = {
    "image_auroc": "max", "pixel_auroc": "max", "aupro": "max", "pixel_f1_max": "max", "image_f1_max": "max",
    "fit_seconds": "min", "ms_per_image": "min",
}
MODES = ("max", "min")
#: Sampler name -> its options with their defaults.
SAMPLERS: dict[str, dict[str, Any]] = {
    "tpe": {"seed": 0, "multivariate": True, "group": None, "constant_liar": True, "n_startup_trials": 10,
            "n_ei_candidates": 24},
    "cmaes": {"seed": 0, "n_startup_trials": 1, "sigma0": None, "popsize": None, "with_margin": False,
              "use_separable_cma": False, "lr_adapt": False, "consider_pruned_trials": False},
    "nsga2": {"seed": 0, "population_size": 50, "mutation_prob": None, "crossover_prob": 0.9,
              "swapping_prob": 0.5},
    "random": {"seed": 0},
    "grid": {"seed": 0},
}
SCHEDULERS: dict[str, dict[str, Any]] = {
    "none": {},
    "asha": {"grace_period": 1, "reduction_factor": 2, "brackets": 1},
}
BUDGET_DEFAULTS: dict[str, Any] = {"trials": 20, "max_concurrent": 1, "time_limit_s": None}
RESOURCES_DEFAULTS: dict[str, Any] = {"cpu": 1, "gpu": 0}
TRIAL_DEFAULTS: dict[str, Any] = {"batch_size": 16, "seed": 0, "device": "auto"}
DATASET_FIELDS = ("root", "categories", "image_size")
BACKBONE_FIELDS = ("weights", "layers")
PARAM_TYPES = ("int", "float", "categorical")
SPEC_FIELDS = {
    "int": ("type", "low", "high", "step", "log"),
    "float": ("type", "low", "high", "step", "log"),
    "categorical": ("type", "choices"),
}
#: Joins a layer subset into one categorical choice: ["blocks.1", "blocks.2"] <-> "blocks.1+blocks.2".
LAYER_SEP = "+"
GRID_MAX_VALUES = 1000
GRID_MAX_POINTS = 10_000_000
IMAGE_SIZE_RANGE = (32, 4096)
BATCH_SIZE_RANGE = (1, 4096)
SEED_RANGE = (0, 2**31 - 1)
DEVICES = ("auto", "cpu", "cuda")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STORAGE_RE = re.compile(r"^(sqlite:///.+|(postgresql|mysql)(\+\w+)?://.+)$")
STORAGE_TEXT = "null (a sqlite file in the run folder), sqlite:///<file>, postgresql[+driver]://..., mysql[+driver]://..."


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # max | min


@dataclass(frozen=True)
class SearchSpace:
    """A validated space file.

    ``backbones``: ``{name: {"weights": str, "layers": [[layer, ...], ...]}}``.
    ``heads``: ``{name: {setting: spec}}`` with every spec normalised to one of
    ``{"type": "int", "low", "high", "step", "log"}``, ``{"type": "float", "low", "high", "step", "log"}``,
    ``{"type": "categorical", "choices": [...]}`` or ``{"type": "fixed", "value": v}``.
    ``sampler``, ``scheduler``, ``budget``, ``resources`` and ``trial`` hold every option, defaults filled in.
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
    cache: dict[str, Any] = field(default_factory=lambda: dict(CACHE_DEFAULTS))
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def metric_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]

    def max_fidelity(self, n_categories: int) -> int:
        """The most reports any trial can make: the categories, or a trainable head's largest `epochs`."""
        from anoseg.heads import HEADS, head_defaults

        most = n_categories
        for head, specs in self.heads.items():
            if getattr(HEADS[head], "trainable", False):
                spec = specs.get("epochs", {"type": "fixed", "value": head_defaults(head)["epochs"]})
                most = max(most, *(int(value) for _, value in _extremes(spec)))
        return most


# ----------------------------------------------------------------------------------------------- helpers


def _fail(source: str, path: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {path}: {message}")


def _hint(value: Any, allowed: Sequence[str]) -> str:
    """A "did you mean" for a typo: allowed names holding the value, else the closest spelling."""
    text = str(value)
    close = [a for a in allowed if len(text) >= 3 and text in a and text != a][:3]
    if not close:
        close = difflib.get_close_matches(text, list(allowed), n=1, cutoff=0.7)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number_text(value: Any) -> str:
    """Explain PyYAML's YAML 1.1 float rule: 1e-3 (no dot) is read as a string."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (YAML reads it as text: write it with a dot, e.g. 1.0e-3, or as 0.001)"
    return ""


def _mapping(value: Any, source: str, path: str, allowed: Sequence[str], required: Sequence[str] = (),
             example: str = "") -> dict[str, Any]:
    """A mapping with string keys from `allowed`, holding every `required` key."""
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(source, path, f"expected a mapping with fields {', '.join(allowed)}{example}, got {value!r}")
    for key in value:
        if key not in allowed:
            raise _fail(source, f"{path}.{key}" if path else str(key),
                        f"unknown field {key!r}{_hint(key, allowed)}; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in value:
            raise _fail(source, f"{path}.{key}" if path else str(key), "missing (required)")
    return dict(value)


def _int(value: Any, source: str, path: str, low: int | None = None, high: int | None = None) -> int:
    ok = _is_int(value) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        if low is not None and high is not None:
            want = f"an integer in [{low}, {high}]"
        elif low is not None:
            want = f"an integer >= {low}"
        else:
            want = "an integer"
        raise _fail(source, path, f"must be {want}, got {value!r}{_number_text(value)}")
    return value


def _number(value: Any, source: str, path: str, *, above: float | None = None, at_least: float | None = None,
            at_most: float | None = None, want: str) -> float | int:
    ok = (_is_number(value) and (above is None or value > above) and (at_least is None or value >= at_least)
          and (at_most is None or value <= at_most))
    if not ok:
        raise _fail(source, path, f"must be {want}, got {value!r}{_number_text(value)}")
    return value


def _bool(value: Any, source: str, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(source, path, f"must be true or false, got {value!r}")
    return value


def _seed(value: Any, source: str, path: str) -> int | None:
    if value is None:
        return None
    return _int(value, source, path, *SEED_RANGE)


def _named(value: Any, source: str, path: str, registry: Mapping[str, Mapping[str, Any]],
           default: str | None) -> tuple[str, dict[str, Any]]:
    """`{name: ..., **options}` (or a bare name) -> (name, options with defaults); unknown names/options fail."""
    if value is None:
        value = {}
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise _fail(source, path, f"expected a mapping {{name: {' | '.join(registry)}, ...}}, got {value!r}")
    name = value.get("name", default)
    if name is None:
        raise _fail(source, f"{path}.name", f"missing (required); allowed: {', '.join(registry)}")
    if not isinstance(name, str) or name not in registry:
        raise _fail(source, f"{path}.name",
                    f"unknown {path} {name!r}{_hint(name, registry)}; allowed: {', '.join(registry)}")
    allowed = ("name", *registry[name])
    options = _mapping(value, source, path, allowed)
    out = {"name": name, **registry[name]}
    out.update({k: v for k, v in options.items() if k != "name"})
    return name, out


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
    """Validate a loaded space file (a dict) against the backbone and head registries and Optuna."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping with fields {', '.join(TOP_LEVEL_FIELDS)}, "
                          f"got {type(raw).__name__}")
    top = _mapping(raw, source, "", TOP_LEVEL_FIELDS, required=("dataset", "objective", "space"))

    name = top.get("name", Path(source).stem if source.endswith((".yaml", ".yml")) else None)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _fail(source, "name", "must be a folder name (letters, digits, _ . -), got " + repr(name))

    data_root, categories, image_size = _dataset(top["dataset"], source)
    objectives = _objectives(top["objective"], source)
    _, sampler = _named(top.get("sampler"), source, "sampler", SAMPLERS, "tpe")
    sampler = _sampler_options(sampler, objectives, source)
    _, scheduler = _named(top.get("scheduler"), source, "scheduler", SCHEDULERS, "none")
    scheduler = _scheduler_options(scheduler, objectives, categories, source)
    budget = _budget(top.get("budget"), source)
    resources = _resources(top.get("resources"), source)
    storage = _storage(top.get("storage"), source)
    cache = _cache(top.get("cache"), source)
    trial = _trial(top.get("trial"), resources, source)
    space_raw = _mapping(top["space"], source, "space", ("backbones", "heads"), required=("backbones", "heads"))
    backbones = _backbones(space_raw["backbones"], source)
    heads = _heads(space_raw["heads"], source)

    space = SearchSpace(
        name=name, data_root=data_root, categories=categories, image_size=image_size, objectives=objectives,
        sampler=sampler, scheduler=scheduler, budget=budget, resources=resources, storage=storage, trial=trial,
        backbones=backbones, heads=heads, source=source, raw=dict(raw), cache=cache,
    )
    _check_grace_period(space)
    if sampler["name"] == "grid":
        grid_search_space(space)  # every parameter enumerable, the grid not absurdly large
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_sampler(space)
    except (ValueError, TypeError) as exc:
        raise _fail(source, "sampler", f"Optuna rejects these options: {exc}") from None
    return space


def _dataset(value: Any, source: str) -> tuple[str, list[str] | None, int]:
    ds = _mapping(value, source, "dataset", DATASET_FIELDS, required=("root",),
                  example=" (e.g. {root: results/data/synthetic, categories: all, image_size: 256})")
    root = ds["root"]
    if not isinstance(root, str) or not root.strip():
        raise _fail(source, "dataset.root", f"must be a folder path, got {root!r}")
    categories = ds.get("categories", "all")
    if categories is None or categories == "all":
        cats = None
    elif isinstance(categories, list) and categories:
        for i, cat in enumerate(categories):
            if not isinstance(cat, str) or not cat or "/" in cat or cat == "all":
                raise _fail(source, f"dataset.categories[{i}]", f"must be a category folder name, got {cat!r}")
        dupes = sorted({c for c in categories if categories.count(c) > 1})
        if dupes:
            raise _fail(source, "dataset.categories", f"lists {', '.join(dupes)} twice")
        cats = list(categories)
    else:
        raise _fail(source, "dataset.categories",
                    f'must be "all" or a non-empty list of category names (its order is the fidelity order), '
                    f"got {categories!r}")
    image_size = _int(ds.get("image_size", 256), source, "dataset.image_size", *IMAGE_SIZE_RANGE)
    return root, cats, image_size


def _objectives(value: Any, source: str) -> list[Objective]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _fail(source, "objective", "is empty; give one {metric, mode} or a list of them")
    out: list[Objective] = []
    for i, item in enumerate(items):
        path = f"objective[{i}]" if isinstance(value, list) else "objective"
        if isinstance(item, str):
            item = {"metric": item}
        obj = _mapping(item, source, path, ("metric", "mode"), required=("metric",),
                       example=" (e.g. {metric: aupro, mode: max})")
        metric = obj["metric"]
        if metric not in METRICS:
            raise _fail(source, f"{path}.metric",
                        f"unknown metric {metric!r}{_hint(metric, METRICS)}; allowed: {', '.join(METRICS)}")
        mode = obj.get("mode", METRICS[metric])
        if mode not in MODES:
            raise _fail(source, f"{path}.mode", f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
        if any(o.metric == metric for o in out):
            raise _fail(source, f"{path}.metric", f"{metric!r} is already an objective")
        out.append(Objective(metric, mode))
    return out


def _sampler_options(opts: dict[str, Any], objectives: list[Objective], source: str) -> dict[str, Any]:
    name = opts["name"]
    opts["seed"] = _seed(opts["seed"], source, "sampler.seed")
    for key in ("multivariate", "constant_liar", "with_margin", "use_separable_cma", "lr_adapt",
                "consider_pruned_trials"):
        if key in opts:
            _bool(opts[key], source, f"sampler.{key}")
    if name == "tpe":
        if opts["group"] is None:
            opts["group"] = opts["multivariate"]
        _bool(opts["group"], source, "sampler.group")
        if opts["group"] and not opts["multivariate"]:
            raise _fail(source, "sampler.group", "group: true needs multivariate: true")
        _int(opts["n_startup_trials"], source, "sampler.n_startup_trials", 0)
        _int(opts["n_ei_candidates"], source, "sampler.n_ei_candidates", 1)
    elif name == "cmaes":
        if not _cmaes_available():
            raise _fail(source, "sampler.name", "cmaes needs the Python package 'cmaes', which is not installed "
                        "(pip install cmaes); or use tpe, nsga2, random or grid")
        if len(objectives) > 1:
            raise _fail(source, "sampler.name", f"cmaes optimises a single objective, got {len(objectives)} "
                        f"({', '.join(o.metric for o in objectives)}); use nsga2 or tpe for a Pareto front")
        _int(opts["n_startup_trials"], source, "sampler.n_startup_trials", 0)
        if opts["sigma0"] is not None:
            _number(opts["sigma0"], source, "sampler.sigma0", above=0, want="a number > 0 or null")
        if opts["popsize"] is not None:
            _int(opts["popsize"], source, "sampler.popsize", 2)
        if opts["with_margin"] and opts["use_separable_cma"]:
            raise _fail(source, "sampler.with_margin", "with_margin and use_separable_cma cannot both be true")
    elif name == "nsga2":
        _int(opts["population_size"], source, "sampler.population_size", 2)
        if opts["mutation_prob"] is not None:
            _number(opts["mutation_prob"], source, "sampler.mutation_prob", at_least=0, at_most=1,
                    want="a probability in [0, 1] or null")
        for key in ("crossover_prob", "swapping_prob"):
            _number(opts[key], source, f"sampler.{key}", at_least=0, at_most=1, want="a probability in [0, 1]")
    return opts


def _cmaes_available() -> bool:
    return importlib.util.find_spec("cmaes") is not None


def _scheduler_options(opts: dict[str, Any], objectives: list[Objective], categories: list[str] | None,
                       source: str) -> dict[str, Any]:
    if opts["name"] != "asha":
        return opts
    if len(objectives) > 1:
        raise _fail(source, "scheduler.name",
                    f"asha needs a single objective (ASHA stops trials on one metric), got {len(objectives)} "
                    f"({', '.join(o.metric for o in objectives)}); use scheduler: {{name: none}} for a Pareto "
                    "front, or one objective")
    _int(opts["grace_period"], source, "scheduler.grace_period", 1)
    _number(opts["reduction_factor"], source, "scheduler.reduction_factor", above=1, want="a number > 1")
    _int(opts["brackets"], source, "scheduler.brackets", 1)
    return opts


def _check_grace_period(space: "SearchSpace") -> None:
    """ASHA's first rung must be reachable by some trial of the space."""
    if space.scheduler["name"] != "asha" or space.categories is None:
        return
    most = space.max_fidelity(len(space.categories))
    if space.scheduler["grace_period"] > most:
        raise _fail(space.source, "scheduler.grace_period",
                    f"is {space.scheduler['grace_period']} but no trial of this space gets that far: the fidelity "
                    f"unit is one category ({len(space.categories)}: {', '.join(space.categories)}), or one epoch "
                    f"for trainable heads; the largest fidelity here is {most}")


def _budget(value: Any, source: str) -> dict[str, Any]:
    budget = {**BUDGET_DEFAULTS, **_mapping(value, source, "budget", tuple(BUDGET_DEFAULTS))}
    _int(budget["trials"], source, "budget.trials", 1)
    _int(budget["max_concurrent"], source, "budget.max_concurrent", 1)
    if budget["time_limit_s"] is not None:
        _number(budget["time_limit_s"], source, "budget.time_limit_s", above=0, want="a number of seconds > 0 or null")
    return budget


def _resources(value: Any, source: str) -> dict[str, Any]:
    res = {**RESOURCES_DEFAULTS, **_mapping(value, source, "resources", tuple(RESOURCES_DEFAULTS))}
    _number(res["cpu"], source, "resources.cpu", above=0, want="a number of CPUs per trial > 0")
    gpu = _number(res["gpu"], source, "resources.gpu", at_least=0,
                  want="a number of GPUs per trial >= 0 (a fraction such as 0.5 packs trials on one GPU)")
    if gpu > 1 and gpu != int(gpu):
        raise _fail(source, "resources.gpu", f"must be a fraction below 1 or a whole number, got {gpu!r}")
    return res


def _cache(value: Any, source: str) -> dict[str, Any]:
    cache = {**CACHE_DEFAULTS, **_mapping(value, source, "cache", tuple(CACHE_DEFAULTS))}
    _bool(cache["enabled"], source, "cache.enabled")
    if cache["path"] is not None and not isinstance(cache["path"], str):
        raise _fail(source, "cache.path", f"must be a folder path or null (the run folder), got {cache['path']!r}")
    _number(cache["max_gb"], source, "cache.max_gb", above=0, want="a size in GB > 0")
    return cache


def _storage(value: Any, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not STORAGE_RE.match(value):
        raise _fail(source, "storage", f"must be {STORAGE_TEXT}; got {value!r}")
    return value


def _trial(value: Any, resources: Mapping[str, Any], source: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        for key, home in (("image_size", "dataset.image_size"), ("backbone", "space.backbones"),
                          ("layers", "space.backbones.<name>.layers"), ("head", "space.heads")):
            if key in value:
                raise _fail(source, f"trial.{key}", f"is set by the search ({home}), not in trial; "
                            f"allowed: {', '.join(TRIAL_DEFAULTS)}")
    trial = {**TRIAL_DEFAULTS, **_mapping(value, source, "trial", tuple(TRIAL_DEFAULTS))}
    _int(trial["batch_size"], source, "trial.batch_size", *BATCH_SIZE_RANGE)
    _int(trial["seed"], source, "trial.seed", *SEED_RANGE)
    device = trial["device"]
    if not isinstance(device, str) or not (device in DEVICES or re.fullmatch(r"cuda:\d+", device)):
        raise _fail(source, "trial.device", f"must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")
    if device.startswith("cuda") and not resources["gpu"]:
        raise _fail(source, "trial.device", f"is {device!r} but resources.gpu is 0, so trials see no GPU; "
                    "set resources.gpu > 0 or device: auto | cpu")
    return trial


def _backbones(value: Any, source: str) -> dict[str, dict[str, Any]]:
    from anoseg.backbones import list_backbones, parse_weights, validate_layers

    infos = {b.name: b for b in list_backbones()}
    if not isinstance(value, Mapping) or not value:
        raise _fail(source, "space.backbones", "must map at least one backbone name to {weights, layers}; "
                    f"allowed backbones: {', '.join(infos)}")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in value.items():
        path = f"space.backbones.{name}"
        if name not in infos:
            raise _fail(source, path, f"unknown backbone {name!r}{_hint(name, infos)}; allowed: {', '.join(infos)}")
        spec = _mapping(entry, source, path, BACKBONE_FIELDS, required=("layers",),
                        example=" (e.g. {weights: offline, layers: [[blocks.1, blocks.2]]})")
        weights = spec.get("weights", "offline")
        if weights is None or weights is False:
            weights = "none"
        try:
            kind = parse_weights(weights).kind
        except ConfigError as exc:
            raise _fail(source, f"{path}.weights", str(exc)) from None
        if kind == "offline" and not infos[name].offline_weights:
            have = [b.name for b in infos.values() if b.offline_weights]
            raise _fail(source, f"{path}.weights", f"backbone {name!r} has no offline weights here (only "
                        f"{', '.join(have) or 'none installed'}); use hub, none or a /path/file.pth")
        subsets = spec["layers"]
        if not isinstance(subsets, list) or not subsets:
            raise _fail(source, f"{path}.layers", "must be a non-empty list of layer subsets, each a list of "
                        "layer names, e.g. [[blocks.1, blocks.2], [blocks.2]]")
        seen: dict[frozenset[str], int] = {}
        layers: list[list[str]] = []
        for i, subset in enumerate(subsets):
            sub_path = f"{path}.layers[{i}]"
            if not isinstance(subset, list) or not all(isinstance(x, str) for x in subset):
                raise _fail(source, sub_path, f"must be a list of layer names (a subset), got {subset!r}; "
                            "layers is a list of subsets: [[blocks.1, blocks.2]] is one subset of two layers, "
                            "[[blocks.1], [blocks.2]] two subsets of one")
            try:
                validate_layers(name, subset)
            except ConfigError as exc:
                raise _fail(source, sub_path, str(exc)) from None
            key = frozenset(subset)
            if key in seen:
                raise _fail(source, sub_path, f"holds the same layers as layers[{seen[key]}]")
            seen[key] = i
            layers.append(list(subset))
        out[str(name)] = {"weights": str(weights), "layers": layers}
    return out


def _heads(value: Any, source: str) -> dict[str, dict[str, dict[str, Any]]]:
    from anoseg.heads import HEADS, head_defaults

    if not isinstance(value, Mapping) or not value:
        raise _fail(source, "space.heads", f"must map at least one head name to its settings; allowed heads: "
                    f"{', '.join(sorted(HEADS))}")
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, settings in value.items():
        path = f"space.heads.{name}"
        if name not in HEADS:
            raise _fail(source, path, f"unknown head {name!r}{_hint(name, HEADS)}; allowed: {', '.join(sorted(HEADS))}")
        defaults = head_defaults(name)
        allowed_text = ", ".join(f"{k} (default {v!r})" for k, v in defaults.items())
        if settings is None:
            settings = {}
        if not isinstance(settings, Mapping):
            raise _fail(source, path, f"must map settings to specs; allowed settings: {allowed_text}")
        specs: dict[str, dict[str, Any]] = {}
        for param, spec in settings.items():
            if param not in defaults:
                raise _fail(source, f"{path}.{param}", f"unknown setting {param!r} of head {name!r}"
                            f"{_hint(param, defaults)}; allowed: {allowed_text}")
            specs[str(param)] = _param_spec(spec, source, f"{path}.{param}")
        _check_constructible(name, specs, source, path)
        out[str(name)] = specs
    return out


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _param_spec(spec: Any, source: str, path: str) -> dict[str, Any]:
    if isinstance(spec, list):
        raise _fail(source, path, f"a list is not a setting value; to search over it write "
                    f"{{type: categorical, choices: {spec!r}}}")
    if not isinstance(spec, Mapping):
        if not _scalar(spec) or (isinstance(spec, float) and not math.isfinite(spec)):
            raise _fail(source, path, f"must be a plain value or a spec {{type: int|float|categorical, ...}}, got {spec!r}")
        return {"type": "fixed", "value": spec}
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise _fail(source, f"{path}.type", f"unknown parameter type {kind!r}; allowed: {', '.join(PARAM_TYPES)} "
                    "(or a plain value for a fixed setting)")
    _mapping(spec, source, path, SPEC_FIELDS[kind])
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise _fail(source, f"{path}.choices", f"must be a non-empty list of values, got {choices!r}")
        for i, choice in enumerate(choices):
            if not _scalar(choice):
                raise _fail(source, f"{path}.choices[{i}]",
                            f"must be a plain value (number, string, true/false, null), got {choice!r}")
        for i, choice in enumerate(choices):
            if any(type(c) is type(choice) and c == choice for c in choices[:i]):
                raise _fail(source, f"{path}.choices[{i}]", f"{choice!r} is listed twice")
        return {"type": "categorical", "choices": list(choices)}

    for key in ("low", "high"):
        if key not in spec:
            raise _fail(source, f"{path}.{key}", f"missing (required for type {kind}: {{type: {kind}, low, high}})")
    log = _bool(spec.get("log", False), source, f"{path}.log")
    if kind == "int":
        low = _int(spec["low"], source, f"{path}.low")
        high = _int(spec["high"], source, f"{path}.high")
        step = _int(spec.get("step", 1), source, f"{path}.step", 1)
        if log and step != 1:
            raise _fail(source, f"{path}.step", "must be 1 with log: true (Optuna samples log ranges without a step)")
    else:
        want = "a number"
        low = _number(spec["low"], source, f"{path}.low", want=want)
        high = _number(spec["high"], source, f"{path}.high", want=want)
        step = spec.get("step")
        if step is not None:
            step = _number(step, source, f"{path}.step", above=0, want="a number > 0 or null")
            if log:
                raise _fail(source, f"{path}.step", "must be null with log: true (Optuna cannot combine them)")
        low, high = float(low), float(high)
        step = None if step is None else float(step)
    if low > high:
        raise _fail(source, f"{path}.low", f"is {low!r}, above high {high!r}; need low <= high")
    if log and low <= 0:
        raise _fail(source, f"{path}.low", f"must be > 0 with log: true, got {low!r}")
    if step is not None:
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            fixed = low + math.floor(n + 1e-9) * step
            raise _fail(source, f"{path}.high", f"{high!r} is not low + a multiple of step {step!r}; "
                        f"use high: {fixed!r}")
    return {"type": kind, "low": low, "high": high, "step": step, "log": log}


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
            raise _fail(source, where, str(exc)) from None
        except (TypeError, ValueError) as exc:  # a head constructor without its own checks
            raise _fail(source, where, f"head {head!r} rejects {dict(params)!r}: {exc}") from None

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


# ----------------------------------------------------------------------------------------------- Optuna


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
    choices, or every int of a range). A float range is a ConfigError naming it."""
    grid: dict[str, list[Any]] = {"backbone": list(space.backbones)}
    for name, entry in space.backbones.items():
        grid[f"{name}.layers"] = [layer_choice(s) for s in entry["layers"]]
    grid["head"] = list(space.heads)
    for head, specs in space.heads.items():
        for param, spec in specs.items():
            path = f"{space.source}: space.heads.{head}.{param}"
            if spec["type"] == "categorical":
                grid[f"{head}.{param}"] = list(spec["choices"])
            elif spec["type"] == "int":
                count = (spec["high"] - spec["low"]) // spec["step"] + 1
                if count > GRID_MAX_VALUES:
                    raise ConfigError(f"{path}: the grid sampler would enumerate {count} values (at most "
                                      f"{GRID_MAX_VALUES}); raise step or use {{type: categorical, choices: [...]}}")
                grid[f"{head}.{param}"] = list(range(spec["low"], spec["high"] + 1, spec["step"]))
            elif spec["type"] == "float":
                raise ConfigError(f"{path}: the grid sampler needs categorical or int parameters, this is a "
                                  "float range; list its values as {type: categorical, choices: [...]}")
    size = math.prod(len(v) for v in grid.values())
    if size > GRID_MAX_POINTS:
        raise ConfigError(f"{space.source}: sampler.name: the grid has {size} points (at most {GRID_MAX_POINTS}); "
                          "shrink the space or use another sampler")
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
    with warnings.catch_warnings():  # group / constant_liar are flagged experimental; they are chosen here
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _make_sampler(space)


def _make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    opts = space.sampler
    name, seed = opts["name"], opts["seed"]
    samplers = optuna.samplers
    if name == "tpe":
        return samplers.TPESampler(
            seed=seed, multivariate=opts["multivariate"], group=opts["group"], constant_liar=opts["constant_liar"],
            n_startup_trials=opts["n_startup_trials"], n_ei_candidates=opts["n_ei_candidates"],
        )
    if name == "cmaes":
        # CMA-ES models only numeric parameters present in every trial; the categorical and conditional
        # ones go to this independent sampler (warn_independent_sampling off: that is by design here).
        independent = samplers.TPESampler(seed=seed, n_startup_trials=max(opts["n_startup_trials"], 1))
        return samplers.CmaEsSampler(
            seed=seed, n_startup_trials=opts["n_startup_trials"], sigma0=opts["sigma0"], popsize=opts["popsize"],
            with_margin=opts["with_margin"], use_separable_cma=opts["use_separable_cma"], lr_adapt=opts["lr_adapt"],
            consider_pruned_trials=opts["consider_pruned_trials"], independent_sampler=independent,
            warn_independent_sampling=False,
        )
    if name == "nsga2":
        return samplers.NSGAIISampler(
            seed=seed, population_size=opts["population_size"], mutation_prob=opts["mutation_prob"],
            crossover_prob=opts["crossover_prob"], swapping_prob=opts["swapping_prob"],
        )
    if name == "random":
        return samplers.RandomSampler(seed=seed)
    if name == "grid":
        return AskTellGridSampler(grid_search_space(space), seed=seed)
    raise ConfigError(f"{space.source}: sampler.name: unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")


def describe(params: Mapping[str, Any]) -> str:
    """A short human description of a trial's parameters: backbone [layers] head(settings)."""
    backbone, head = params.get("backbone", "?"), params.get("head", "?")
    layers = params.get(f"{backbone}.layers", "")
    settings = ", ".join(f"{k.split('.', 1)[1]}={short_value(v)}" for k, v in sorted(params.items()) if k.startswith(f"{head}."))
    return f"{backbone} [{layers}] {head}({settings})"


def short_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
