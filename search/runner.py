"""Start, resume and inspect searches. Ray is imported only when a search actually runs."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from anoseg.metrics import QUALITY_METRICS
from search.finalize import reported_on, run_selection, selected_on
from search.preflight import PreflightError, run_preflight
from search.run_dir import COMPLETED, ERROR, FAILED, LOST, RUNNING, SPACE_FILE, STOPPED, RunDir, RunError, best_trial
from search.space_optuna import trial_config
from search.space_schema import SearchSpace, load_space
from search.storage import StorageError, expand, mask, on_cluster, resolve_storage, run_storage, storage_meta


def start_search(space_path: str | Path, *, data: str | None = None, name: str | None = None,
                 results: str | Path = "results", address: str | None = None,
                 skip_missing_backbones: bool = False) -> RunDir:
    """Validate everything, run the preflight (:mod:`search.preflight`: PreflightError, with nothing created,
    when a check fails), create results/<name>/, run the search to the end; returns the run folder.
    `skip_missing_backbones`: drop the backbones whose weights are missing instead of failing."""
    from anoseg.data import resolve_categories

    space = load_space(space_path)
    data_root = Path(data or space.data_root).resolve()
    categories = resolve_categories(data_root, space.categories)  # fixed fidelity order for this search
    selection = split_meta(space, data_root, categories)
    run = RunDir(Path(results) / (name or space.name))
    storage = resolve_storage(space.storage, run.path, cluster=on_cluster(address))
    expand(storage.url)  # an unset password variable fails before anything is created
    if (run.path / "run.json").exists():
        raise RunError(f"{run.path} already holds a search; continue it with `anoseg search resume {run.path}` "
                       f"or pick another --name")
    cache_dir = str(Path(space.cache["path"] or run.path / "feature_cache").resolve()) if space.cache["enabled"] else None
    check = run_preflight(space, data_root=str(data_root), categories=categories, run_path=run.path,
                          cache_dir=cache_dir, storage=storage, address=address, cluster=on_cluster(address))
    try:
        space = check.admit(space, skip_missing_backbones=skip_missing_backbones)
    except PreflightError:
        if run.path.is_dir():  # a folder left by an earlier attempt: keep the table there too
            check.write(run.path)
        raise
    print(check.text(), flush=True)
    run.path.mkdir(parents=True, exist_ok=True)
    check.write(run.path)
    shutil.copyfile(space_path, run.path / SPACE_FILE)
    run.write_space(space)  # without the dropped backbones: what the search and a resume use
    meta = {
        "name": run.path.name,
        "run_path": str(run.path.resolve()),
        "cache_dir": cache_dir,
        "space_source": str(space_path),
        "data_root": str(data_root),
        "categories": categories,
        "objectives": [{"metric": o.metric, "mode": o.mode} for o in space.objectives],
        "selection": selection,
        "study_name": f"{run.path.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        **storage_meta(storage),  # the password masked / as its ${VARIABLE}: never the password itself
        "address": address,
        "created": time.time(),
        "status": "running",
        "preflight": {"seconds": round(check.seconds, 3), "nodes": check.nodes, "dropped_backbones": check.dropped},
    }
    run.write_meta(meta)
    _fit(space, run, meta, address, resume=False)
    return run


def split_meta(space: SearchSpace, data_root: str | Path, categories: list[str]) -> dict[str, Any]:
    """What run.json records of the selection protocol: its settings and every category's split (the real
    test images of each part by file name; for a synthetic set, the training images held out of fitting); a
    category the protocol cannot split is a DataError before anything starts."""
    from anoseg.data import IMAGE_SUFFIXES, list_test
    from anoseg.holdout import file_names

    meta: dict[str, Any] = dict(space.selection)
    protocol = space.protocol
    if protocol is None:
        return meta
    meta["split"] = {}
    for category in categories:
        paths, types = list_test(data_root, category, required=not protocol.synthetic)
        names = file_names(paths)
        entry: dict[str, Any] = {part: [names[i] for i in index]
                                 for part, index in protocol.real_parts(paths, types, category).items()}
        if protocol.synthetic and protocol.good_source == "train":
            train = sorted(p.name for p in (Path(data_root) / category / "train" / "good").iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES)
            entry["train_held_out"] = [train[i] for i in protocol.train_held_out(len(train), category)]
        elif protocol.synthetic:
            entry["synthetic_bases"] = [names[i] for i in protocol.test_good_bases(paths, types, category)]
        meta["split"][category] = entry
    return meta


def resume_search(run_path: str | Path, *, address: str | None = None) -> RunDir:
    """Continue a killed or interrupted search: finished trials are kept, unfinished ones re-run."""
    run = RunDir.open(run_path)
    meta = run.read_meta()
    space = run.space()
    storage = run_storage(meta)
    expand(storage.url)  # an unset password variable fails now, not inside Ray Tune's restore
    address = address if address is not None else meta.get("address")
    check = run_preflight(space, data_root=meta["data_root"], categories=meta["categories"], run_path=run.path,
                          cache_dir=meta.get("cache_dir"), storage=storage, address=address,
                          cluster=on_cluster(address), study_name=meta.get("study_name"))
    check.write(run.path)
    check.admit(space, resume=True)
    print(check.text(), flush=True)
    _fit(space, run, meta, address, resume=True)
    return run


def _fit(space: SearchSpace, run: RunDir, meta: dict[str, Any], address: str | None, resume: bool) -> None:
    from search import tune_adapter  # Ray is heavy: only when a search runs

    started = time.time()
    run.update_meta(status="running", last_start=started)
    try:
        tune_adapter.fit(space, run, meta, address, resume)
    except KeyboardInterrupt:
        run.update_meta(status="interrupted")
        raise
    run.write_table()
    counts = status_counts(run)
    status = "finished" if counts.get(RUNNING, 0) == 0 else "interrupted"
    run.update_meta(status=status, wall_seconds=run.read_meta().get("wall_seconds", 0) + time.time() - started)
    if status == "finished" and counts.get(COMPLETED):
        from search.finalize import finalize_run

        finalize_run(run)


def status_counts(run: RunDir) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in run.records():
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    return counts


def summary(run: RunDir) -> str:
    """A few lines: trials by status, wall time, failures, the best configuration so far."""
    meta = run.read_meta()
    df = run.table()
    counts = status_counts(run)
    space = run.space()
    objective = meta["objectives"][0]
    trials = len(df) - counts.get(LOST, 0)
    lost = f" ({counts[LOST]} lost to a driver crash and re-sampled)" if counts.get(LOST) else ""
    duplicates = int(df["duplicate_of"].notna().sum()) if "duplicate_of" in df else 0
    lines = [
        f"run {run.path} ({meta.get('status')}): {trials} trials of {space.budget['trials']}, "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in (COMPLETED, STOPPED, RUNNING, FAILED, ERROR)) + lost
        + f"; {duplicates} of the completed were duplicates (an effective configuration already run, answered "
          f"from its record), {counts.get(STOPPED, 0)} stopped early by ASHA",
        f"data {meta['data_root']} categories {', '.join(meta['categories'])}",
    ]
    if meta.get("wall_seconds"):
        lines.append(f"wall time {meta['wall_seconds']:.0f} s")
    for _, row in df[df["status"].isin([FAILED, ERROR])].iterrows():
        lines.append(f"  {row['trial_id']} {row['status']}: {str(row['error']).strip().splitlines()[-1][:160]}")
    protocol = run_selection(meta, space)["protocol"]
    best = best_trial(df, objective["metric"], objective["mode"])
    if best is None:
        lines.append("no trial has finished every category yet")
    else:
        lines.append(spread_line(df, objective["metric"], objective["mode"]) + f", on {selected_on(protocol)}")
        final = meta.get("final")
        chosen = final["chosen"] if final else best["trial_id"]
        row = df[df["trial_id"] == chosen].iloc[0]
        cfg = trial_config(space, run.read_record(chosen)["params"])
        metric_text = ", ".join(f"{k} {row[k]:.4f}" for k in QUALITY_METRICS if row.get(k) is not None)
        how = f"chosen ({final['prefer']})" if final else "best so far"
        lines.append(f"{how}: trial {chosen} by {objective['metric']} ({objective['mode']}) on "
                     f"{selected_on(protocol)}: {metric_text}, fit {row['fit_seconds']:.2f} s, "
                     f"{row['ms_per_image']:.1f} ms/image")
        lines.append("  " + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=True).strip())
        lines += final_lines(final) if final else [
            f"not finalised yet: `anoseg search finalize {run.path}` evaluates the chosen trials on "
            f"{reported_on(protocol)}"]
    lines.append(f"table: {run.path / 'trials.parquet'} (+ trials.csv); study: {mask(meta['storage'])} ({meta['study_name']})")
    try:
        lines.append(f"optuna-dashboard {run_storage(meta).dashboard_argument()}")
    except StorageError:
        pass
    return "\n".join(lines)


def final_lines(final: dict[str, Any]) -> list[str]:
    """The finalised trials: the objective on each part with its interval, and the ties with the best."""
    metric, level = final["objective"]["metric"], final["level"]

    def figure(entry: dict[str, Any], part: str) -> str:
        value = (entry.get(part) or {}).get(metric)
        if value is None:
            return "-"
        interval = (entry.get(f"{part}_interval") or {}).get(metric)
        return f"{value:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")

    parts = final["parts"]
    head = (f"finalised {len(final['trials'])} trials ({final['bootstrap']} bootstrap resamples, "
            f"{level:.0%} intervals, {final['seconds']:.0f} s of which bootstrap {final['bootstrap_seconds']:.1f} s); "
            f"{metric} on " + " | ".join(parts) + ("; * = tied with the best (paired difference interval holds 0)"
                                                  if final["bootstrap"] else ""))
    lines = [head]
    for entry in final["trials"]:
        mark = "*" if entry.get("tied") else " "
        chosen = "  <- chosen" if entry["trial_id"] == final["chosen"] else ""
        lines.append(f"  {mark} {entry['trial_id']} (search rank {entry['search_rank']}): "
                     + " | ".join(figure(entry, part) for part in parts) + chosen)
    lines += [f"  note: {note}" for note in final.get("notes") or []]
    if final["protocol"] == "test":
        lines.append("  selected on the test set: these figures are optimistic (selection.protocol: holdout "
                     "reports on images that chose nothing)")
    return lines


def spread_line(df: Any, metric: str, mode: str) -> str:
    """Best, median and worst `metric` of the completed trials (duplicates counted once)."""
    done = df[(df["status"] == COMPLETED) & df[metric].notna()]
    if "duplicate_of" in done:
        done = done[done["duplicate_of"].isna()]
    values = done[metric].sort_values(ascending=mode == "min")
    return (f"{metric} over {len(values)} distinct completed trials: best {values.iloc[0]:.4f}, "
            f"median {values.median():.4f}, worst {values.iloc[-1]:.4f}")
