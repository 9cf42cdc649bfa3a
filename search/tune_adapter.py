"""The one module that imports Ray: a trial as a Tune trainable, the searcher, the Tuner.

- The trainable calls `anoseg.trial.run_trial` and reports after every category
  (fidelity = categories done), or for a trainable head (STFPM) after every epoch with every
  category evaluated (fidelity = epochs), so ASHA can stop a weak configuration early. ASHA's
  time attribute is `fidelity`; its max_t is the largest fidelity any trial of the space can have.
- A trainable head's trial saves its state after every epoch to the run folder
  (`checkpoints/<trial id>.pt`, replaced atomically, deleted when the trial ends); a restarted
  trial (resumed search, retried trial) continues from it. Not Tune's own checkpoints: Tune
  deletes old ones before its experiment state points at the new one, so a driver killed in
  between left a resumed trial with no checkpoint at all.
- An exception inside a trial (bad combination, out of memory, unreadable
  image) is reported as that trial's failure and the search goes on; a lost
  worker or node is a Ray-level failure that Tune retries (`MAX_RETRIES`).
- Trials ASHA stops early are told to Optuna as PRUNED, failed ones as FAIL:
  only trials that finished their whole budget count as COMPLETE, which keeps TPE honest.
"""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from anoseg.files import write_atomic
from anoseg.result import TrialReport
from search.run_dir import COMPLETED, ERROR, FAILED, FINISHED, LOST, RUNNING, STOPPED, RunDir, best_trial, \
    record_report
from search.space_optuna import define_by_run, describe, make_sampler, trial_config
from search.space_schema import SearchSpace
from search.storage import run_storage

logger = logging.getLogger(__name__)
MAX_RETRIES = 3  # per trial, for Ray-level failures (lost worker or node)
ERROR_TEXT_LIMIT = 4000


def run_trainable(params: dict[str, Any], *, space: SearchSpace, data_root: str, categories: list[str],
                  run_path: str, cache_dir: str | None) -> None:
    """Tune function trainable: one anoseg trial, reporting after each category."""
    from anoseg.cache import FeatureCache
    from anoseg.config import TrialConfig
    from anoseg.trial import config_key, effective_config, run_trial  # heavy; imported once per (reused) worker

    run = RunDir(Path(run_path))
    record = run.read_record(tune.get_context().get_trial_id())
    if record and record.get("status") in FINISHED:
        return replay(record, space)

    state: dict[str, Any] = {"in_report": False, "done": 0, "config": "", "key": ""}

    def report(trial_report: TrialReport, **extra: Any) -> None:
        state["in_report"], state["done"] = True, trial_report.fidelity
        tune.report({**trial_report.to_flat(), "trial_error": "", "trial_config": state["config"],
                     "effective_key": state["key"], **extra})
        state["in_report"] = False

    checkpoint_path = run.checkpoint_path(tune.get_context().get_trial_id())
    try:
        raw = trial_config(space, params)
        state["config"] = json.dumps(raw)  # a string: Tune's loggers only take scalars
        cfg = TrialConfig.from_dict(raw)  # validated once, for the key and the trial
        state["key"] = config_key(effective_config(cfg))
        original = run.completed_record(state["key"]) if space.dedup else None
        if original is not None:  # the same effective configuration has finished: answer from its record
            return report(record_report(original), duplicate_of=original["trial_id"])
        cache = FeatureCache(cache_dir, max_bytes=int(space.cache["max_gb"] * 2**30))
        run_trial(cfg, data_root, categories, report, cache=cache,
                  checkpoint=lambda trial_state: save_checkpoint(checkpoint_path, trial_state),
                  resume=load_checkpoint(checkpoint_path), train_shares=space.train_shares, protocol=space.protocol)
    except Exception as exc:  # noqa: BLE001 - a failing trial is data, not a crash
        if state["in_report"]:
            raise  # Tune's own control flow
        report_failure(space, f"{type(exc).__name__}: {exc}", traceback.format_exc()[-ERROR_TEXT_LIMIT:],
                       state["done"], state["config"])


def save_checkpoint(path: Path, trial_state: Mapping[str, Any]) -> None:
    """Write a trainable head's trial state atomically (a crash never leaves half a file)."""
    import torch

    write_atomic(path, lambda tmp: torch.save(dict(trial_state), tmp), by_name=True)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The state a trainable head's trial saved after its last epoch (a resumed search or a retried
    trial continues from it); None for a fresh trial or an unreadable file (the trial starts over)."""
    if not path.is_file():
        return None
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any damage means: start over
        logger.warning("ignoring unreadable trial checkpoint %s: %s", path, exc)
        return None


def report_failure(space: SearchSpace, error: str, detail: str, done: int, config: str, **extra: Any) -> None:
    failure = {m: float("nan") for m in space.metric_names()}
    tune.report({**failure, "fidelity": done, "trial_error": error, "trial_traceback": detail,
                 "trial_config": config, **extra})


def replay(record: Mapping[str, Any], space: SearchSpace) -> None:
    """Re-report a trial that had finished before a driver crash instead of computing it again.

    Tune may restore a trial as unfinished when the driver died between the trial's end and
    Tune's next saved state; the run folder's record holds its results (its last report).
    """
    config = json.dumps(record.get("config", {}))
    if record.get("status") == FAILED:
        return report_failure(space, record.get("error", ""), "", int(record.get("step") or 0), config, replayed=True)
    tune.report({**record_report(record).to_flat(), "trial_error": "", "trial_config": config, "replayed": True})


def finished_all(result: Mapping[str, Any]) -> bool:
    """Whether a trial's last result covers its whole budget (every category, or every epoch)."""
    total = result.get("fidelity_total")
    return bool(total) and int(result.get("fidelity") or 0) >= int(total)


class HonestOptunaSearch(OptunaSearch):
    """OptunaSearch that tells early-stopped trials as PRUNED and failed ones as FAIL."""


    def restore(self, checkpoint_path: str) -> None:
        """After a driver crash, fail the Optuna trials asked for after the last saved state.

        Tune never learned of them, so nothing would ever finish them; left RUNNING they
        would skew samplers that account for running trials (TPE's constant liar).
        """
        super().restore(checkpoint_path)
        known = {trial.number for trial in self._ot_trials.values()}
        for orphan in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if orphan.number not in known:
                self._ot_study.tell(orphan.number, state=optuna.trial.TrialState.FAIL)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get("trial_error") or result.get("replayed"):
            return
        with warnings.catch_warnings():  # a retried trial re-reports steps Optuna already has
            warnings.simplefilter("ignore")
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        failed = error or bool(result and result.get("trial_error"))
        partial = not result or not finished_all(result)
        if not failed and not partial:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        if not failed and result and not result.get("replayed") and not isinstance(self.metric, list) and self.metric in result:
            # A trial stopped on this very result never got on_trial_result: keep its last value.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ot_trial.report(result[self.metric], int(result.get("fidelity") or 0))
        state = optuna.trial.TrialState.FAIL if failed else optuna.trial.TrialState.PRUNED
        try:
            self._ot_study.tell(ot_trial, None, state=state)
        except (RuntimeError, ValueError) as exc:  # already told before a driver crash (replayed trial)
            logger.debug("not telling trial %s again: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


class RunRecorder(tune.Callback):
    """Driver-side: keeps trials/<id>.json and trials.parquet current and prints one line per finished trial."""

    def __init__(self, run_path: str, budget: int, metric: str, mode: str) -> None:
        self.run = RunDir(Path(run_path))
        self.budget, self.metric, self.mode = budget, metric, mode

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self.run.read_record(trial.trial_id)
        if record and record.get("status") in FINISHED:  # finished before a crash: replayed, results kept
            self.run.update_record(trial.trial_id, replays=record.get("replays", 0) + 1)
        else:
            self.run.update_record(trial.trial_id, status=RUNNING, params=dict(trial.config))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not result.get("replayed"):
            self.run.record_result(trial.trial_id, trial.config, result)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        record = self.run.read_record(trial.trial_id) or {}
        self.run.update_record(trial.trial_id, status=RUNNING, retries=record.get("retries", 0) + 1,
                               last_retry_error=_error_text(trial))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.run.checkpoint_path(trial.trial_id).unlink(missing_ok=True)
        record = self.run.read_record(trial.trial_id) or {}
        if record.get("status") not in FINISHED:
            step, total = int(record.get("step") or 0), int(record.get("fidelity_total") or 0)
            unit = record.get("fidelity_unit") or "categories"
            if record.get("duplicate_of"):
                self.run.update_record(trial.trial_id, status=COMPLETED, ended=time.time(),
                                       stop_reason=f"duplicate of {record['duplicate_of']}: the same effective "
                                                   "configuration, answered from its record")
            elif total and step >= total:
                reason = "evaluated every category" if unit == "categories" else f"trained {total} epochs"
                self.run.update_record(trial.trial_id, status=COMPLETED, stop_reason=reason, ended=time.time())
            else:
                self.run.update_record(trial.trial_id, status=STOPPED, ended=time.time(),
                                       stop_reason=f"stopped early after {step}/{total or '?'} {unit}")
        self._finished(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.run.checkpoint_path(trial.trial_id).unlink(missing_ok=True)
        self.run.update_record(trial.trial_id, status=ERROR, error=_error_text(trial), ended=time.time(),
                               stop_reason=f"crashed after {MAX_RETRIES} retries")
        self._finished(trial.trial_id)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Records of trials Tune does not know (begun after its last saved state before a crash) are lost."""
        known = {trial.trial_id for trial in trials}
        for record in self.run.records():
            if record["status"] == RUNNING and record["trial_id"] not in known:
                self.run.update_record(record["trial_id"], status=LOST, ended=time.time(),
                                       stop_reason="started just before the driver died, after Tune last saved its state; "
                                                   "re-sampled on resume")
        self.run.write_table()

    def _finished(self, trial_id: str) -> None:
        df = self.run.write_table()
        done = int(df["status"].isin(FINISHED).sum())
        rec = self.run.read_record(trial_id) or {}
        value = rec.get("metrics", {}).get(self.metric)
        what = f"{self.metric} {value:.4f}" if isinstance(value, float) and rec.get("status") == COMPLETED else rec.get("stop_reason", "")
        if rec.get("status") in (FAILED, ERROR):
            what = f"failed: {str(rec.get('error'))[:120]}"
        elif rec.get("duplicate_of"):
            what += f" (duplicate of {rec['duplicate_of']})"
        best = best_trial(df, self.metric, self.mode)
        best_text = f" | best {best[self.metric]:.4f} ({best['trial_id']})" if best is not None else ""
        print(f"[{done}/{self.budget}] {trial_id} {rec.get('status')}: {what} | {describe(rec.get('params', {}))}{best_text}",
              flush=True)


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.isfile(path):
        return Path(path).read_text()[-ERROR_TEXT_LIMIT:]
    return str(getattr(trial, "error_msg", "") or "unknown error")



def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to a cluster (`address`, e.g. "auto" or "ray://host:10001") or start an embedded Ray."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Save the experiment state on every controller step (default: every >= 10 s), so a
    # driver killed right after a trial finished does not re-run that trial on resume.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False, "include_dashboard": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


def node_label(node: Mapping[str, Any]) -> str:
    """``node <ip> <id prefix>`` (+ `` head``) for an entry of ``ray.nodes()``."""
    head = any(key.startswith("node:__internal_head__") for key in node.get("Resources", {}))
    return f"node {node.get('NodeManagerAddress', '?')} {str(node.get('NodeID', ''))[:8]}" + (" head" if head else "")


def run_on_every_node(fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0) -> dict[str, Any]:
    """Run ``fn(*args)`` once on every alive node of the cluster Ray is connected to: one task per node, pinned
    to it, reserving no CPU (so it runs beside busy trials). Returns ``{node label: fn's result, or the
    exception it raised, or a TimeoutError}`` (:func:`node_label`), the head first, then the others by label
    (``ray.nodes()`` has no fixed order). ``fn`` must be importable on the nodes."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {}
    labels = {node_label(node): node["NodeID"] for node in ray.nodes() if node.get("Alive")}
    for label in sorted(labels, key=lambda label: (not label.endswith(" head"), label)):
        strategy = NodeAffinitySchedulingStrategy(node_id=labels[label], soft=False)
        refs[label] = task.options(scheduling_strategy=strategy).remote(*args)
    done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    results: dict[str, Any] = {}
    for label, ref in refs.items():
        if ref not in done:
            ray.cancel(ref, force=True)
            results[label] = TimeoutError(f"no answer within {timeout_s:.0f} s")
            continue
        try:
            results[label] = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - reported per node by the caller
            results[label] = exc
    return results


def _trainable(space: SearchSpace, meta: Mapping[str, Any]) -> Any:
    resources = {"cpu": space.resources["cpu"], "gpu": space.resources["gpu"]}
    fn = tune.with_parameters(run_trainable, space=space, data_root=meta["data_root"],
                              categories=list(meta["categories"]), run_path=meta["run_path"],
                              cache_dir=meta.get("cache_dir"))
    return tune.with_resources(fn, resources)


def build_tuner(space: SearchSpace, run: RunDir, meta: Mapping[str, Any]) -> tune.Tuner:
    metrics, modes = space.metric_names(), space.modes()
    storage = run_storage(meta).open()  # sqlite, journal or a database server, as run.json records it
    searcher = HonestOptunaSearch(
        space=define_by_run(space),
        metric=metrics if space.multi_objective else metrics[0],
        mode=modes if space.multi_objective else modes[0],
        sampler=make_sampler(space),
        study_name=meta["study_name"],
        storage=storage,
    )
    if space.scheduler["name"] == "asha":
        opts = space.scheduler
        scheduler = ASHAScheduler(
            time_attr="fidelity", metric=metrics[0], mode=modes[0],
            max_t=space.max_fidelity(len(meta["categories"])), grace_period=opts["grace_period"],
            reduction_factor=opts["reduction_factor"], brackets=opts.get("brackets", 1),
        )
    else:
        scheduler = FIFOScheduler()
    budget = space.budget
    tune_config = tune.TuneConfig(
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=budget["trials"],
        max_concurrent_trials=budget["max_concurrent"],
        time_budget_s=budget.get("time_limit_s"),
        reuse_actors=True,
        trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
    )
    run_config = tune.RunConfig(
        name=run.tune_dir.name,
        storage_path=str(run.path.resolve()),
        failure_config=tune.FailureConfig(max_failures=MAX_RETRIES),
        # Tune stages its state under /tmp/ray and copies it to the run folder every sync_period
        # (default 300 s); copy on every save so `resume` sees every finished trial.
        sync_config=tune.SyncConfig(sync_period=0),
        callbacks=[RunRecorder(str(run.path.resolve()), budget["trials"], metrics[0], modes[0])],
        verbose=0,
    )
    return tune.Tuner(_trainable(space, meta), tune_config=tune_config, run_config=run_config)


def fit(space: SearchSpace, run: RunDir, meta: Mapping[str, Any], address: str | None, resume: bool) -> None:
    """Start or resume the Tune experiment of `run` and block until it ends."""
    init_ray(address)
    if resume and tune.Tuner.can_restore(str(run.tune_dir)):
        tuner = tune.Tuner.restore(str(run.tune_dir), trainable=_trainable(space, meta),
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = build_tuner(space, run, meta)
    tuner.fit()
