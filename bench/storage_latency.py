"""Study storage latency: what each `storage:` kind costs the search driver per trial.

    python bench/storage_latency.py [--trials 60 --repeats 3] [--space spaces/quick.yaml] [--samplers space random]

The driver's own searcher (search.tune_adapter.HonestOptunaSearch on the space's define-by-run function and
sampler, with the storage search.storage opens) goes through what Ray Tune asks of it for every trial:
`suggest` (Optuna's ask plus every parameter of the define-by-run space, each a storage write), one
`on_trial_result` per category (an intermediate value) and `on_trial_complete` (tell). No Ray, no trial
computation: only the study. Storages: sqlite (optuna.db), journal (optuna.journal), and postgresql when a
throw-away server can be started here (tests/postgres_server.py, Debian's postgresql package; loopback, fsync
on, the password from an environment variable as in a real run). Kinds alternate trial by trial, so machine
noise hits all of them; the figures are medians (and 90th percentiles) over the trials of every repeat,
and the ratios to SQLite are also given per repeat (the disk's fsync latency varies on a shared machine).
Suggest grows with the study for TPE (the sampler reads every earlier trial); the random sampler isolates
the storage.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine_info import machine  # noqa: E402


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def ratio(ms: list[float], reference: list[float]) -> float:
    return round(statistics.median(ms) / statistics.median(reference), 2)


def summary(ms: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(ms), 3), "p90_ms": round(quantile(ms, 0.9), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60, help="trials per study")
    parser.add_argument("--repeats", type=int, default=3, help="new studies per sampler and storage")
    parser.add_argument("--space", default="spaces/quick.yaml")
    parser.add_argument("--samplers", nargs="+", choices=["space", "random"], default=["space", "random"],
                        help="the space's sampler (TPE for quick.yaml) and/or a random one (storage cost only)")
    parser.add_argument("--reports", type=int, default=4, help="intermediate results per trial (one per category)")
    args = parser.parse_args()

    import optuna

    from search.space_schema import load_space
    from search.storage import resolve_storage
    from tests.postgres_server import Unavailable, postgres_server

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(ROOT / args.space)
    samplers = [space.sampler["name"] if s == "space" else s for s in args.samplers]
    reports = args.reports
    notes: list[str] = []

    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="storage-bench-")))
        storages = {"sqlite": resolve_storage("sqlite", folder / "sqlite", cluster=False),
                    "journal": resolve_storage("journal", folder / "journal", cluster=False)}
        (folder / "sqlite").mkdir()
        try:
            server = stack.enter_context(postgres_server(fsync=True))
            os.environ["ANOSEG_BENCH_PG_PASSWORD"] = server.password
            storages["postgresql"] = resolve_storage(server.url("${ANOSEG_BENCH_PG_PASSWORD}"), folder, cluster=False)
        except Unavailable as exc:
            notes.append(f"postgresql skipped: {exc}")

        per_sampler: dict[str, dict[str, dict[str, list[float]]]] = {}
        repeat_ratios: dict[str, list[dict[str, float]]] = {}
        for repeat in range(args.repeats):
            for sampler_name in samplers:
                times = measure(space, storages, sampler_name, args.trials, reports, f"{repeat}")
                repeat_ratios.setdefault(sampler_name, []).append(
                    {kind: ratio(t["trial"], times["sqlite"]["trial"]) for kind, t in times.items()})
                pooled = per_sampler.setdefault(sampler_name, {k: {} for k in times})
                for kind, t in times.items():
                    for key, values in t.items():
                        pooled[kind].setdefault(key, []).extend(values)

    result = {
        "benchmark": "storage_latency",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "setting": {"space": args.space, "samplers": samplers, "trials": args.trials, "repeats": args.repeats,
                    "reports_per_trial": reports, "optuna": optuna.__version__,
                    "postgresql": "loopback, fsync on" if "postgresql" in storages else None},
        "machine": machine(),
        "per_trial": {name: {kind: {"suggest": summary(t["suggest"]), "report (each)": summary(t["report"]),
                                    "tell": summary(t["tell"]), "suggest + reports + tell": summary(t["trial"])}
                             for kind, t in times.items()} for name, times in per_sampler.items()},
        "ratio_to_sqlite": {name: {kind: ratio(t["trial"], times["sqlite"]["trial"]) for kind, t in times.items()}
                            for name, times in per_sampler.items()},
        "ratio_to_sqlite_per_repeat": repeat_ratios,
        "notes": notes,
    }
    print(json.dumps(result, indent=2))


def measure(space, storages, sampler_name: str, trials: int, reports: int, tag: str) -> dict:
    """Per storage kind: suggest, report and tell times (ms) of `trials` trials in a new study, the kinds
    alternating trial by trial."""
    import optuna

    from search.space_optuna import define_by_run, make_sampler
    from search.tune_adapter import HonestOptunaSearch

    metric, mode = space.metric_names()[0], space.modes()[0]
    searchers = {}
    for kind, storage in storages.items():
        sampler = make_sampler(space) if sampler_name != "random" else optuna.samplers.RandomSampler(seed=0)
        searchers[kind] = HonestOptunaSearch(space=define_by_run(space), metric=metric, mode=mode, sampler=sampler,
                                             study_name=f"bench-{sampler_name}-{kind}-{tag}", storage=storage.open())
    times: dict[str, dict[str, list[float]]] = {k: {"suggest": [], "report": [], "tell": [], "trial": []}
                                                 for k in storages}
    for i in range(trials):
        for kind, searcher in searchers.items():
            trial_id = f"t{i:05d}"
            start = time.perf_counter()
            searcher.suggest(trial_id)
            suggested = time.perf_counter()
            value = 0.5 + 0.4 * ((i * 7919) % 101) / 101  # a fixed, varied objective
            for step in range(1, reports + 1):
                searcher.on_trial_result(trial_id, {metric: value, "training_iteration": step, "fidelity": step})
            reported = time.perf_counter()
            searcher.on_trial_complete(trial_id, {metric: value, "fidelity": reports, "fidelity_total": reports})
            done = time.perf_counter()
            t = times[kind]
            t["suggest"].append(1000 * (suggested - start))
            t["report"].append(1000 * (reported - suggested) / reports)
            t["tell"].append(1000 * (done - reported))
            t["trial"].append(1000 * (done - start))
    for kind, searcher in searchers.items():
        states = [t.state.name for t in searcher._ot_study.get_trials(deepcopy=False)]
        assert states == ["COMPLETE"] * trials, (kind, states[:5])
    return times


if __name__ == "__main__":
    main()
