"""Search spaces: the shipped files validate, the define-by-run space is conditional and yields valid trial
configurations, every sampler builds, and each kind of mistake is a ConfigError naming the field."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from anoseg.config import TrialConfig
from anoseg.errors import ConfigError
import search.space_schema as space_module
from search.space_optuna import define_by_run, distributions, grid_search_space, grid_size, make_sampler, trial_config
from search.space_schema import SAMPLERS, SearchSpace, load_space, validate_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "spaces"

optuna.logging.set_verbosity(optuna.logging.WARNING)

# A small valid space; each mistake test changes one field of a deep copy.
BASE: dict = {
    "name": "t",
    "dataset": {"root": "data", "categories": "all", "image_size": 64},
    "objective": [{"metric": "aupro", "mode": "max"}],
    "sampler": {"name": "tpe", "seed": 0},
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    "budget": {"trials": 4, "max_concurrent": 2},
    "resources": {"cpu": 1, "gpu": 0},
    "storage": None,
    "trial": {"batch_size": 4},
    "space": {
        "backbones": {
            "tf_efficientnet_lite0": {"weights": "offline", "layers": [["blocks.1", "blocks.2"], ["blocks.2"]]},
        },
        "heads": {
            "padim": {"n_features": {"type": "int", "low": 10, "high": 20}},
            "patchcore": {
                "coreset_ratio": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
                "k": {"type": "categorical", "choices": [1, 3]},
                "patch_size": 3,
            },
        },
    },
}


def with_change(path: str, value, delete: bool = False) -> dict:
    """BASE with the dotted `path` set to `value` (or deleted)."""
    raw = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return raw


def write(tmp_path: Path, raw: dict | str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


# --------------------------------------------------------------------------- shipped files


@pytest.fixture(scope="module")
def quick() -> SearchSpace:
    return load_space(SPACES / "quick.yaml")


def test_quick_space_validates(quick):
    assert quick.name == "quick"
    assert quick.data_root == "results/data/synthetic"
    assert quick.categories is None and quick.image_size == 128
    assert quick.metric_names() == ["aupro"] and quick.modes() == ["max"] and not quick.multi_objective
    assert quick.sampler["name"] == "tpe" and quick.sampler["group"] is True
    assert quick.scheduler == {"name": "asha", "grace_period": 1, "reduction_factor": 2, "brackets": 1,
                               "train_shares": [1.0]}
    assert quick.budget["trials"] == 20 and quick.budget["max_concurrent"] == 2
    assert quick.resources == {"cpu": 1, "gpu": 0}
    assert set(quick.backbones) == {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"}
    assert all(b["weights"] == "offline" for b in quick.backbones.values())
    assert set(quick.heads) == {"padim", "patchcore"}
    assert quick.heads["patchcore"]["patch_size"] == {"type": "fixed", "value": 3}
    assert quick.raw["name"] == "quick" and quick.source.endswith("quick.yaml")


def test_mvtec_space_validates():
    from anoseg.backbones import list_backbones

    space = load_space(SPACES / "mvtec.yaml")
    assert space.data_root == "/data/mvtec_ad" and space.image_size == 256
    assert len(space.categories) == 15 and len(set(space.categories)) == 15
    assert space.multi_objective and space.metric_names() == ["aupro", "ms_per_image"]
    assert space.modes() == ["max", "min"]
    assert space.sampler["name"] == "nsga2" and space.scheduler["name"] == "none"
    assert space.budget["trials"] == 300 and space.budget["max_concurrent"] == 8
    assert space.resources == {"cpu": 4, "gpu": 1}
    registered = {b.name for b in list_backbones()}
    assert set(space.backbones) == registered, "the full search covers every backbone"
    from anoseg.heads import HEADS

    assert set(space.heads) == set(HEADS), "the full search covers every head"


def test_objective_metrics_match_what_trials_report():
    from anoseg.metrics import COST_METRICS as COST_KEYS, QUALITY_METRICS as METRIC_KEYS

    assert set(space_module.Objective.model_fields["metric"].annotation.__args__) == set(METRIC_KEYS) | set(COST_KEYS)


def test_search_space_modules_do_not_import_ray():
    import search.space_optuna

    for module in (space_module, search.space_optuna):
        source = Path(module.__file__).read_text()
        assert not re.search(r"^\s*(import ray|from ray)", source, re.M)


# --------------------------------------------------------------------------- define-by-run + trial_config


def test_define_by_run_gives_valid_conditional_trial_configs(quick):
    study = optuna.create_study(direction="maximize", sampler=make_sampler(quick))
    fn = define_by_run(quick)
    seen_backbones, seen_heads = set(), set()
    for i in range(30):
        trial = study.ask()
        assert fn(trial) is None
        params = trial.params
        backbone, head = params["backbone"], params["head"]
        seen_backbones.add(backbone)
        seen_heads.add(head)
        # conditional: only the chosen backbone's layers and the chosen head's settings are suggested
        assert {k for k in params if k.endswith(".layers")} == {f"{backbone}.layers"}
        head_keys = {k for k in params if k not in ("backbone", "head") and not k.endswith(".layers")}
        assert all(k.startswith(f"{head}.") for k in head_keys)
        sampled = {p for p, s in quick.heads[head].items() if s["type"] != "fixed"}
        assert head_keys == {f"{head}.{p}" for p in sampled}

        cfg = trial_config(quick, params)
        assert cfg["layers"] in quick.backbones[backbone]["layers"]
        assert cfg["backbone"] == {"name": backbone, "weights": "offline"}
        assert cfg["image_size"] == 128 and cfg["batch_size"] == 16
        assert set(cfg["head"]) == {"name"} | set(quick.heads[head])
        tc = TrialConfig.from_dict(cfg, source=f"trial {i}")
        assert tc.backbone.name == backbone and tc.head_name == head
        if head == "patchcore":
            assert tc.head["patch_size"] == 3 and 0.01 <= tc.head["coreset_ratio"] <= 0.1
            assert tc.head["k"] in (1, 3)
        else:
            spec = quick.heads["padim"]["n_features"]
            assert spec["low"] <= tc.head["n_features"] <= spec["high"]
        study.tell(trial, float(i % 7) / 7)
    assert len(seen_backbones) >= 2 and seen_heads == {"padim", "patchcore"}


def test_distributions_cover_every_branch(quick):
    dists = distributions(quick)
    assert set(dists) == {"backbone", "head", "padim.n_features", "patchcore.coreset_ratio", "patchcore.k"} | {
        f"{b}.layers" for b in quick.backbones}
    assert dists["patchcore.coreset_ratio"].log and dists["tf_efficientnet_lite0.layers"].choices[0] == "blocks.1+blocks.2"


def test_define_by_run_is_picklable(quick):
    fn = pickle.loads(pickle.dumps(define_by_run(quick)))
    trial = optuna.create_study().ask()
    fn(trial)
    assert "backbone" in trial.params


def test_trial_config_rejects_params_outside_the_space(quick):
    good = {"backbone": "tf_efficientnet_lite0", "tf_efficientnet_lite0.layers": "blocks.1+blocks.2",
            "head": "padim", "padim.n_features": 60, "unrelated": 1}
    assert trial_config(quick, good)["layers"] == ["blocks.1", "blocks.2"]
    with pytest.raises(ConfigError, match="backbone 'resnet18' is not in the space"):
        trial_config(quick, {**good, "backbone": "resnet18"})
    with pytest.raises(ConfigError, match="is not one of"):
        trial_config(quick, {**good, "tf_efficientnet_lite0.layers": "blocks.6"})
    with pytest.raises(ConfigError, match="missing 'padim.n_features'"):
        trial_config(quick, {k: v for k, v in good.items() if k != "padim.n_features"})


# --------------------------------------------------------------------------- samplers


CMAES_INSTALLED = importlib.util.find_spec("cmaes") is not None


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_builds_and_samples(name, monkeypatch):
    raw = with_change("sampler", {"name": name, "seed": 1})
    if name == "grid":  # grid needs enumerable settings
        raw["space"]["heads"]["patchcore"]["coreset_ratio"] = {"type": "categorical", "choices": [0.05, 0.1]}
    if name == "cmaes":
        monkeypatch.setattr(space_module, "_cmaes_available", lambda: True)  # building needs no cmaes package
    space = validate_space(raw, "t.yaml")
    sampler = make_sampler(space)
    expected = {"tpe": optuna.samplers.TPESampler, "cmaes": optuna.samplers.CmaEsSampler,
                "nsga2": optuna.samplers.NSGAIISampler, "random": optuna.samplers.RandomSampler,
                "grid": optuna.samplers.GridSampler}[name]
    assert isinstance(sampler, expected)
    pickle.loads(pickle.dumps(sampler))  # Ray checkpoints its searcher with pickle
    if name == "cmaes" and not CMAES_INSTALLED:
        return  # sampling needs the package; see test_cmaes_without_its_package_is_a_clear_error
    study = optuna.create_study(direction="maximize", sampler=sampler)
    fn = define_by_run(space)
    for i in range(4):
        trial = study.ask()
        fn(trial)
        TrialConfig.from_dict(trial_config(space, trial.params))
        study.tell(trial, float(i))


def test_cmaes_without_its_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(space_module, "_cmaes_available", lambda: False)
    with pytest.raises(ConfigError, match=r"t\.yaml: sampler\.name: cmaes needs the Python package 'cmaes'"):
        validate_space(with_change("sampler", {"name": "cmaes"}), "t.yaml")


def test_tpe_options_reach_the_sampler():
    space = validate_space(with_change("sampler", {"name": "tpe", "seed": 3, "multivariate": True,
                                                   "constant_liar": True, "n_startup_trials": 5}), "t.yaml")
    sampler = make_sampler(space)
    assert sampler._n_startup_trials == 5
    assert sampler._multivariate and sampler._group and sampler._constant_liar


def test_grid_sampler_enumerates_the_full_product():
    raw = with_change("sampler", {"name": "grid", "seed": 0})
    raw["scheduler"] = {"name": "none"}
    raw["space"]["heads"] = {"patchcore": {"coreset_ratio": {"type": "categorical", "choices": [0.05, 0.1]},
                                           "k": {"type": "categorical", "choices": [1, 3, 5]},
                                           "patch_size": {"type": "int", "low": 1, "high": 3, "step": 2}}}
    space = validate_space(raw, "t.yaml")
    grid = grid_search_space(space)
    assert grid["patchcore.patch_size"] == [1, 3]
    expected = 1 * 2 * 1 * 2 * 3 * 2  # backbone, its layers, head, coreset_ratio, k, patch_size
    assert grid_size(space) == (expected, expected)
    study = optuna.create_study(sampler=make_sampler(space))
    fn = define_by_run(space)
    combos = set()
    for _ in range(expected):
        trial = study.ask()
        fn(trial)
        combos.add(tuple(sorted(trial.params.items())))
        study.tell(trial, 0.0)  # the last tell exhausts the grid: must not raise outside study.optimize
    assert len(combos) == expected


def test_grid_rejects_float_ranges():
    with pytest.raises(ConfigError, match=r"space\.heads\.patchcore\.coreset_ratio: the grid sampler needs "
                                          r"categorical or int"):
        validate_space(with_change("sampler", {"name": "grid"}), "t.yaml")


def test_grid_size_counts_conditional_repeats(quick):
    raw = copy.deepcopy(quick.raw)
    raw["sampler"] = {"name": "grid"}
    raw["space"]["heads"]["patchcore"]["coreset_ratio"] = {"type": "categorical", "choices": [0.05, 0.1]}
    raw["space"]["heads"]["padim"]["n_features"] = {"type": "int", "low": 50, "high": 100, "step": 50}
    points, distinct = grid_size(validate_space(raw, "q.yaml"))
    layer_subsets = sum(len(b["layers"]) for b in quick.backbones.values())
    assert distinct == layer_subsets * (2 + 2 * 2) and points > distinct


# --------------------------------------------------------------------------- mistakes


MISTAKES = [
    # (description, changed raw, expected message pieces)
    ("unknown top-level field", with_change("samplr", {"name": "tpe"}),
     [r"samplr: unknown field 'samplr'.*allowed: name, dataset, objective, sampler"]),
    ("missing required section", with_change("space", None, delete=True), [r"space: missing"]),
    ("unknown backbone", with_change("space.backbones", {"resnet19": {"layers": [["layer1"]]}}),
     [r"space\.backbones\.resnet19: unknown backbone 'resnet19'", "allowed: .*resnet18"]),
    ("layer of another backbone",
     with_change("space.backbones.tf_efficientnet_lite0.layers", [["blocks.1"], ["layer1", "blocks.2"]]),
     [r"space\.backbones\.tf_efficientnet_lite0\.layers\[1\]", "'layer1'", r"valid layers: blocks\.0, blocks\.1"]),
    ("layers not a list of subsets", with_change("space.backbones.tf_efficientnet_lite0.layers", ["blocks.1"]),
     [r"space\.backbones\.tf_efficientnet_lite0\.layers\[0\]: must be a list of layer names"]),
    ("duplicate layer subset",
     with_change("space.backbones.tf_efficientnet_lite0.layers", [["blocks.1", "blocks.2"], ["blocks.2", "blocks.1"]]),
     [r"layers\[1\]: holds the same layers as layers\[0\]"]),
    ("offline weights unavailable", with_change("space.backbones", {"resnet18": {"weights": "offline",
                                                                                "layers": [["layer1"]]}}),
     [r"space\.backbones\.resnet18\.weights: backbone 'resnet18' has no offline weights", "use hub"]),
    ("bad weights value", with_change("space.backbones.tf_efficientnet_lite0.weights", "imagenet"),
     [r"space\.backbones\.tf_efficientnet_lite0\.weights:.*offline \| hub \| none"]),
    ("unknown head", with_change("space.heads.knn", {}),
     [r"space\.heads\.knn: unknown head 'knn'; allowed: .*padim, patchcore"]),
    ("unknown head setting", with_change("space.heads.patchcore.coreset", 0.1),
     [r"space\.heads\.patchcore\.coreset: unknown setting 'coreset'", r"did you mean 'coreset_ratio'",
      r"allowed: coreset_ratio \(default 0\.1\), k"]),
    ("int low > high", with_change("space.heads.padim.n_features", {"type": "int", "low": 30, "high": 20}),
     [r"space\.heads\.padim\.n_features\.low: is 30, above high 20"]),
    ("float low > high", with_change("space.heads.patchcore.coreset_ratio", {"type": "float", "low": 0.3, "high": 0.2}),
     [r"space\.heads\.patchcore\.coreset_ratio\.low: is 0\.3, above high 0\.2"]),
    ("missing low", with_change("space.heads.padim.n_features", {"type": "int", "high": 20}),
     [r"space\.heads\.padim\.n_features\.low: missing"]),
    ("missing high", with_change("space.heads.patchcore.coreset_ratio", {"type": "float", "low": 0.1}),
     [r"space\.heads\.patchcore\.coreset_ratio\.high: missing"]),
    ("int bound not an integer", with_change("space.heads.padim.n_features", {"type": "int", "low": 10.5, "high": 20}),
     [r"space\.heads\.padim\.n_features\.low: must be an integer, got 10\.5"]),
    ("YAML 1.1 float written as text",
     with_change("space.heads.patchcore.coreset_ratio", {"type": "float", "low": "1e-2", "high": 0.2}),
     [r"coreset_ratio\.low: must be a number, got '1e-2'.*write it with a dot"]),
    ("log with low <= 0",
     with_change("space.heads.patchcore.coreset_ratio", {"type": "float", "low": 0.0, "high": 0.2, "log": True}),
     [r"space\.heads\.patchcore\.coreset_ratio\.low: must be > 0 with log: true"]),
    ("log with step", with_change("space.heads.patchcore.coreset_ratio",
                                  {"type": "float", "low": 0.1, "high": 0.2, "log": True, "step": 0.05}),
     [r"coreset_ratio\.step: must be null with log: true"]),
    ("range end not on the step", with_change("space.heads.padim.n_features",
                                              {"type": "int", "low": 10, "high": 25, "step": 10}),
     [r"n_features\.high: 25 is not low \+ a multiple of step 10; use high: 20"]),
    ("unknown spec field", with_change("space.heads.padim.n_features", {"type": "int", "low": 1, "high": 2, "stpe": 1}),
     [r"space\.heads\.padim\.n_features\.stpe: unknown field 'stpe'.*allowed: type, low, high, step, log"]),
    ("unknown spec type", with_change("space.heads.padim.n_features", {"type": "integer", "low": 1, "high": 2}),
     [r"n_features\.type: unknown parameter type 'integer'; allowed: int, float, categorical"]),
    ("empty categorical", with_change("space.heads.patchcore.k", {"type": "categorical", "choices": []}),
     [r"space\.heads\.patchcore\.k\.choices: must be a non-empty list"]),
    ("list instead of categorical", with_change("space.heads.patchcore.k", [1, 3]),
     [r"space\.heads\.patchcore\.k: a list is not a setting value.*type: categorical, choices: \[1, 3\]"]),
    ("range end the head rejects",
     with_change("space.heads.patchcore.coreset_ratio", {"type": "float", "low": 0.1, "high": 2.0}),
     [r"space\.heads\.patchcore\.coreset_ratio\.high: head 'patchcore': coreset_ratio must be a number in \(0, 1\]"]),
    ("choice the head rejects", with_change("space.heads.patchcore.k", {"type": "categorical", "choices": [1, 0]}),
     [r"space\.heads\.patchcore\.k\.choices\[1\]: head 'patchcore': k must be an integer in \[1, 64\]"]),
    ("fixed value the head rejects", with_change("space.heads.patchcore.patch_size", 4),
     [r"space\.heads\.patchcore\.patch_size: head 'patchcore': patch_size must be one of 1, 3, 5, 7"]),
    ("unknown metric", with_change("objective", [{"metric": "auroc", "mode": "max"}]),
     [r"objective\[0\]\.metric: unknown metric 'auroc' \(did you mean 'image_auroc' or 'pixel_auroc'\?\); "
      r"allowed: image_auroc, pixel_auroc, aupro"]),
    ("unknown mode", with_change("objective", [{"metric": "aupro", "mode": "maximize"}]),
     [r"objective\[0\]\.mode: unknown mode 'maximize'; allowed: max, min"]),
    ("multi-objective with asha",
     with_change("objective", [{"metric": "aupro", "mode": "max"}, {"metric": "ms_per_image", "mode": "min"}]),
     [r"scheduler\.name: asha needs a single objective", "aupro, ms_per_image", r"scheduler: \{name: none\}"]),
    ("unknown sampler", with_change("sampler", {"name": "bayes"}),
     [r"sampler\.name: unknown sampler 'bayes'; allowed: tpe, cmaes, nsga2, random, grid"]),
    ("tpe option typo", with_change("sampler", {"name": "tpe", "n_startup": 5}),
     [r"sampler\.n_startup: unknown field 'n_startup'", r"did you mean 'n_startup_trials'",
      "allowed: name, seed, multivariate"]),
    ("cmaes option typo", with_change("sampler", {"name": "cmaes", "sigma": 0.5}),
     [r"sampler\.sigma: unknown field 'sigma'", "allowed: name, seed, n_startup_trials, sigma0"]),
    ("cmaes options Optuna cannot combine", with_change("sampler", {"name": "cmaes", "lr_adapt": True,
                                                                    "use_separable_cma": True}),
     [r"sampler\.lr_adapt: lr_adapt cannot be combined with with_margin or use_separable_cma"]),
    ("grid too large", {**with_change("sampler", {"name": "grid"}), "space": {
        "backbones": BASE["space"]["backbones"],
        "heads": {"patchcore": {p: {"type": "int", "low": 1, "high": 1000} for p in ("k", "projection_dim")},
                  "padim": {"n_features": {"type": "int", "low": 1, "high": 1000}}}}},
     [r"sampler\.name: the grid has 4000000000 points \(at most 10000000\)"]),
    ("int range too long for the grid", {**with_change("sampler", {"name": "grid"}), "space": {
        "backbones": BASE["space"]["backbones"],
        "heads": {"padim": {"n_features": {"type": "int", "low": 1, "high": 1001}}}}},
     [r"space\.heads\.padim\.n_features: the grid sampler would enumerate 1001 values \(at most 1000\)"]),
    ("unknown scheduler", with_change("scheduler", {"name": "hyperband"}),
     [r"scheduler\.name: unknown scheduler 'hyperband'; allowed: none, asha"]),
    ("asha grace beyond the categories",
     {**with_change("scheduler", {"name": "asha", "grace_period": 3}),
      "dataset": {"root": "d", "categories": ["a", "b"]}},
     [r"scheduler\.grace_period: is 3 but no trial of this space gets that far", "largest fidelity here is 2"]),
    ("train shares not ending at 1", with_change("scheduler", {"name": "asha", "train_shares": [0.25, 0.5]}),
     [r"scheduler\.train_shares: must be increasing shares in \(0, 1\] ending at 1"]),
    ("train shares decreasing", with_change("scheduler", {"name": "asha", "train_shares": [0.5, 0.25, 1]}),
     [r"scheduler\.train_shares: must be increasing shares"]),
    ("budget.trials < 1", with_change("budget.trials", 0), [r"budget\.trials: must be an integer >= 1, got 0"]),
    ("max_concurrent < 1", with_change("budget.max_concurrent", 0),
     [r"budget\.max_concurrent: must be an integer >= 1, got 0"]),
    ("negative time limit", with_change("budget.time_limit_s", -5), [r"budget\.time_limit_s: must be"]),
    ("resources.gpu < 0", with_change("resources.gpu", -0.5), [r"resources\.gpu: must be a number of GPUs.*>= 0"]),
    ("fractional gpu above 1", with_change("resources.gpu", 1.5), [r"resources\.gpu: must be a fraction below 1"]),
    ("cuda without a gpu", with_change("trial.device", "cuda"),
     [r"trial\.device: is 'cuda' but resources\.gpu is 0"]),
    ("trial field that belongs to the space", with_change("trial.image_size", 64),
     [r"trial\.image_size: is set by the search \(dataset\.image_size\).*allowed: batch_size, seed, device"]),
    ("unknown trial field", with_change("trial.batch", 8),
     [r"trial\.batch: unknown field 'batch' \(did you mean 'batch_size'\?\); allowed: batch_size, seed, device"]),
    ("categories neither list nor all", with_change("dataset.categories", "brick"),
     [r'dataset\.categories: must be "all" or a non-empty list']),
    ("image_size out of range", with_change("dataset.image_size", 16),
     [r"dataset\.image_size: must be an integer in \[32, 4096\], got 16"]),
    ("missing dataset root", with_change("dataset.root", None, delete=True), [r"dataset\.root: missing"]),
    ("bad storage URL", with_change("storage", "redis://host"), [r"storage: must be null.*postgresql"]),
    ("bad run name", with_change("name", "my run/1"), [r"name: must be a folder name"]),
]


@pytest.mark.parametrize("description, raw, patterns", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistakes_are_config_errors_naming_the_field(tmp_path, description, raw, patterns):
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and "pydantic" not in message and "Input should" not in message, message
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


def test_cmaes_rejects_multi_objective(monkeypatch):
    monkeypatch.setattr(space_module, "_cmaes_available", lambda: True)
    raw = {**with_change("objective", [{"metric": "aupro"}, {"metric": "fit_seconds"}]),
           "sampler": {"name": "cmaes"}, "scheduler": {"name": "none"}}
    with pytest.raises(ConfigError, match=r"t\.yaml: sampler\.name: cmaes optimises a single objective"):
        validate_space(raw, "t.yaml")


def test_base_fixture_is_valid(tmp_path):
    space = load_space(write(tmp_path, BASE))
    assert space.name == "t" and space.trial == {"batch_size": 4, "seed": 0, "device": "auto"}


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "name: x\nspace: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not valid YAML at line 3, column 1: [^\n]+$"):
        load_space(path)


def test_duplicate_yaml_key(tmp_path):
    text = yaml.safe_dump(BASE, sort_keys=False).replace("  heads:\n", "  heads:\n    padim: {}\n", 1)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"x\.yaml: not valid YAML at line \d+, column \d+: duplicate key 'padim'"):
        load_space(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"space file .*nope\.yaml does not exist"):
        load_space(tmp_path / "nope.yaml")


def test_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"x\.yaml: expected a mapping with fields name, dataset"):
        load_space(write(tmp_path, "- a\n- b\n"))


def test_defaults_and_shorthands(tmp_path):
    raw = {"dataset": {"root": "d"}, "objective": "pixel_auroc",
           "space": {"backbones": {"tf_efficientnet_lite0": {"layers": [["blocks.2"]]}}, "heads": {"padim": None}}}
    space = load_space(write(tmp_path, raw, "mine.yaml"))
    assert space.name == "mine" and space.categories is None and space.image_size == 256
    assert space.metric_names() == ["pixel_auroc"] and space.modes() == ["max"]
    assert space.sampler["name"] == "tpe" and space.scheduler == {"name": "none"}
    assert space.budget == {"trials": 20, "max_concurrent": 1, "time_limit_s": None}
    assert space.backbones["tf_efficientnet_lite0"]["weights"] == "offline"
    assert space.heads == {"padim": {}}
    trial = optuna.create_study().ask()
    define_by_run(space)(trial)
    cfg = trial_config(space, trial.params)
    assert cfg["head"] == {"name": "padim"} and cfg["layers"] == ["blocks.2"]
    TrialConfig.from_dict(cfg)
    cost = validate_space({**raw, "objective": {"metric": "ms_per_image"}}, "c.yaml")
    assert cost.modes() == ["min"]


def test_anoseg_never_imports_search():
    code = "import anoseg, anoseg.config, anoseg.heads, anoseg.trial, sys; print('search' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_max_fidelity_counts_epochs_of_trainable_heads(tmp_path):
    raw = {"name": "t", "dataset": {"root": "d", "categories": ["a", "b"]}, "objective": "aupro",
           "scheduler": {"name": "asha", "grace_period": 5},
           "space": {"backbones": {"resnet18": {"weights": "none", "layers": [["layer1"]]}},
                     "heads": {"padim": {}, "stfpm": {"epochs": {"type": "int", "low": 5, "high": 30, "step": 5}}}}}
    space = validate_space(raw, "t.yaml")  # grace 5 > 2 categories is fine: STFPM trials report per epoch
    assert space.max_fidelity(2) == 30
    raw["space"]["heads"] = {"stfpm": {}}
    assert validate_space(raw, "t.yaml").max_fidelity(2) == 20  # the head's default epochs
    raw["space"]["heads"] = {"padim": {}}
    with pytest.raises(ConfigError, match="largest fidelity here is 2"):
        validate_space(raw, "t.yaml")


# --------------------------------------------------------------------------- stored form


@pytest.mark.parametrize("raw", [
    BASE,
    {**with_change("sampler", {"name": "nsga2", "population_size": 8, "mutation_prob": 0.25}),
     "objective": ["aupro", {"metric": "ms_per_image"}], "scheduler": "none",
     "dataset": {"root": "d", "categories": ["b", "a"]}, "resources": {"cpu": 0.5, "gpu": 0.25},
     "cache": {"path": "/shared/cache", "max_gb": 1.5}, "budget": {"trials": 9, "time_limit_s": 60.5}},
], ids=["base", "pareto"])
def test_stored_space_round_trips_exactly(raw):
    space = validate_space(raw, "t.yaml")
    stored = space.to_stored()
    assert json.loads(json.dumps(stored)) == stored  # JSON-serialisable as it is
    again = SearchSpace.from_stored(json.loads(json.dumps(stored)), "run/space.json")
    assert again == dataclasses.replace(space, source="run/space.json")
    assert again.to_stored() == stored
    assert validate_space(stored, "stored") == dataclasses.replace(space, source="stored")  # a valid space file
    assert stored["sampler"] == space.sampler and stored["trial"] == {"batch_size": 4, "seed": 0, "device": "auto"}
    assert stored["space"]["heads"]["patchcore"]["patch_size"] == 3  # a fixed setting as its plain value


def test_shipped_spaces_round_trip(quick):
    for space in (quick, load_space(SPACES / "mvtec.yaml")):
        stored = json.loads(json.dumps(space.to_stored()))
        assert SearchSpace.from_stored(stored, space.source) == space


def test_from_stored_checks_structure_but_no_registry():
    stored = validate_space(BASE, "t.yaml").to_stored()
    stored["space"]["backbones"] = {"gone_backbone": {"weights": "hub", "layers": [["x"]]}}
    assert set(SearchSpace.from_stored(stored, "s.json").backbones) == {"gone_backbone"}
    with pytest.raises(ConfigError, match=r"^s\.json: budget\.trials: must be an integer >= 1, got 0$"):
        SearchSpace.from_stored({**stored, "budget": {"trials": 0}}, "s.json")


def test_from_stored_imports_no_torch(tmp_path):
    stored = tmp_path / "space.json"
    stored.write_text(json.dumps(validate_space(BASE, "t.yaml").to_stored()))
    code = (f"import json, sys\n"
            f"from search.space_schema import SearchSpace\n"
            f"space = SearchSpace.from_stored(json.loads(open({str(stored)!r}).read()), 'space.json')\n"
            f"assert space.heads['patchcore']['patch_size'] == {{'type': 'fixed', 'value': 3}}\n"
            f"heavy = sorted({{'torch', 'timm', 'ray', 'optuna', 'anoseg.backbones', 'anoseg.heads'}} & set(sys.modules))\n"
            f"assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_train_shares_multiply_the_fidelity():
    from search.space_schema import validate_space

    raw = {**BASE, "scheduler": {"name": "asha", "train_shares": [0.25, 0.5, 1]},
           "dataset": {"root": "d", "categories": ["a", "b"]}}
    space = validate_space(raw, "shares.yaml")
    assert space.train_shares == [0.25, 0.5, 1.0] and space.max_fidelity(2) == 6


def test_the_demo_space_documents_every_other_head_with_valid_settings():
    import re

    from anoseg.heads import HEADS

    text = Path("spaces/quick.yaml").read_text()
    documented = {}
    for line in text.splitlines():
        found = re.match(r"^    # (\w+): (\{.*\})", line)
        if found:
            documented[found.group(1)] = yaml.safe_load(found.group(2).split("   #")[0])
    raw = yaml.safe_load(text)
    assert set(documented) | set(raw["space"]["heads"]) == set(HEADS), "every head is searched or documented"
    raw["space"]["heads"].update(documented)
    space = validate_space(raw, "spaces/quick.yaml with the documented heads")
    assert set(space.heads) == set(HEADS)
