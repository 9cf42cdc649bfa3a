"""anoseg's PaDiM and PatchCore heads against anomalib's: same data, weights and layers; time, memory, metrics.

    .venv/bin/python bench/heads_vs_anomalib.py [--repeats 3] [--heads padim patchcore]
        [--backbone-padim resnet18] [--backbone-patchcore resnet18 [wide_resnet50_2]]
        [--categories brick grass gravel washer] [--threads 2 [1]] [--batch-size 16]
        [--anoseg-source HEAD|<git revision>|worktree] [--data DIR] [--anomalib-venv DIR]
        [--no-diagnose] [--fresh] [--out bench/results/heads_vs_anomalib.json]

Prints one JSON object (also written to --out); progress goes to stderr.

Setting. Data: the project's synthetic set at 256 px (``anoseg.data.synthetic.generate(seed=0)``, generated
into ``~/.cache/anoseg/bench/data`` unless --data names one), read once with anoseg's loaders and saved
as uint8 tensors that both sides load; each worker turns a category into the loader's exact float
[0, 1] tensors (``u8 / 255``) outside the timed region. Weights: a timm classifier built with random
init under ``torch.manual_seed(0)`` (no ImageNet weights are reachable here), saved as a state dict;
anoseg loads it through ``create_backbone(name, layers, weights=<file>)``, anomalib builds its torch
model with ``pre_trained=False`` and ``load_state_dict(strict=False)``s the same file into its timm
feature extractor (no key of the used layers may be missing). Before timing, the layer maps of both
sides on 8 images must agree (else the run stops). PaDiM: resnet18 layer1-3, n_features 100, and
anomalib's random channel subset (``idx``) is overwritten with anoseg's, so both model the same 100
channels. PatchCore: layer2-3, coreset ratio 0.1, k 1, re-weighting over 9 neighbours, 3x3 patches.
The anoseg package is copied once at the start (``git archive HEAD`` by default, or the working tree)
and every process imports that copy, so edits made while the benchmark runs change nothing.

Sides. anoseg uses its public pieces as ``anoseg.model.fit_model`` and ``FittedModel.predict`` do
(create_backbone, create_head; fit: ``fit_feature_head`` over ``iter_layer_maps``, so layer maps go into the head
a batch at a time; test: ``extract_layers`` + ``score_batch`` a batch at a time, all from anoseg.pipeline). anomalib (``pip install anomalib`` into a
venv this script creates, which sees anoseg's torch / timm through a .pth file, so both run the same
torch) uses its torch models (``PadimModel`` / ``PatchcoreModel``) the way its Lightning modules do:
train-mode forward per batch to collect embeddings, then ``fit()`` / ``subsample_embedding(0.1)``,
then eval-mode forward under ``torch.inference_mode()`` (Lightning's validation default) giving
256x256 anomaly maps (upsampled and blurred with sigma 4 by anomalib's AnomalyMapGenerator) and
image scores. Calling the torch models directly skips Lightning, its data loaders and its pre-/post-
processors (ImageNet normalisation is done by hand, timed, as anoseg's extract_layers does it):
this favours anomalib. tqdm's progress bar in anomalib's coreset sampler is switched off
(TQDM_DISABLE=1). Both sides use the same batch size (--batch-size, anoseg's default 16) and threads.
What still differs is each library's own algorithm (see NOTES, also in the JSON).

Timing. fit = feature extraction of the train set + head fit (coreset included); test = feature
extraction + scoring + map post-processing of the test set, reported per image. Model construction,
imports and data loading are not timed (reported apart). Every (side, head, threads) run is a fresh
subprocess; runs alternate (anoseg first in even repeats, anomalib first in odd ones) and medians
over the repeats are reported; speedup = anomalib time / anoseg time.

Memory (ratio = anoseg / anomalib). ``peak_rss_mib``: the child's peak RSS from ``os.wait4``
(ru_maxrss); ``net_rss_mib`` subtracts the median peak RSS of a baseline child that only imports torch
and loads / converts the tensors. RSS includes the resident pages of torch's shared libraries, which
vary by 100-300 MiB with the page cache and with which kernels run, so two more numbers come from
RssAnon (anonymous memory: tensors, heap), read from /proc by the parent every POLL_S:
``net_anon_mib`` = peak RssAnon - RssAnon after importing torch and loading the tensors (includes the
library import and model build), ``work_anon_mib`` = peak RssAnon - RssAnon after the import and the
model build (what fit + test add). Metrics are computed here, uniformly, with
``anoseg.metrics.evaluate`` from the maps and scores each worker saved.

Diagnostic (--no-diagnose skips it): one more anomalib PaDiM run whose layer2/3 are resized onto
layer1's grid bilinearly, as anoseg does, instead of anomalib's nearest neighbour; the JSON's
"diagnostics" compares its metrics with anoseg's, to tell the implementations' metric gap from the
resize choice. Not timed against anything.

Every finished run is kept under ``~/.cache/anoseg/bench/runs/<setting hash>``: started again with the
same setting (same anoseg package content, anomalib version, data, weights, jobs), the benchmark
continues where an interrupted start stopped (--fresh starts over); the JSON says how many runs were
kept and the time since the first start.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from machine_info import machine, proc_status_mib  # bench/ is on sys.path when a benchmark runs as a script

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ANOSEG_BENCH_CACHE", Path.home() / ".cache" / "anoseg" / "bench"))
IMAGE_SIZE = 256
SEED = 0
CATEGORIES = ("brick", "grass", "gravel", "washer")
HEAD_LAYERS = {"padim": ("layer1", "layer2", "layer3"), "patchcore": ("layer2", "layer3")}
PADIM_N_FEATURES = {"resnet18": 100, "wide_resnet50_2": 550}  # the PaDiM paper's (and anomalib's) defaults
PATCHCORE = {"coreset_ratio": 0.1, "k": 1, "reweight_neighbours": 9, "patch_size": 3}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "image_f1_max")
VERIFY_IMAGES = 8
VERIFY_TOL = 1e-4  # max |difference| of the layer maps relative to their max |value|
POLL_S = 0.01  # how often the parent reads a worker's RssAnon
STATE_VERSION = 1  # bump when what a saved run holds changes
NOTES = (
    "PaDiM layers: anomalib resizes layer2/3 onto layer1's grid with nearest neighbour, anoseg "
    "(combine_layers) bilinearly; anoseg (head_features, since commit bcd9cf3) builds only the n_features "
    "channels PaDiM reads, anomalib concatenates all layers and picks them per batch",
    "PaDiM covariance: both add 0.01 I (anomalib also 1e-5 I); anomalib keeps every training embedding, then "
    "inverts the covariances (torch.linalg.inv) and scores with matmuls; anoseg (fit_batches) holds batches only "
    "until they outgrow the per-position sums, builds the Cholesky factors in the sums' buffer and scores with "
    "triangular solves",
    "PatchCore coreset: anomalib projects with a sparse random projection (eps 0.9: ~260 dims here) and "
    "computes full norms per step, anoseg projects to 128 dims with a dense Gaussian matrix; different "
    "random start and projection, so the coresets differ; anomalib keeps int(0.1 n), anoseg round(0.1 n)",
    "PatchCore maps: anomalib upsamples patch scores with nearest neighbour before the sigma-4 blur, "
    "anoseg bilinearly; image scores use the same re-weighting over 9 bank neighbours",
    "Blur: both sigma 4, kernel 33, reflect padding (anomalib GaussianBlur2d, anoseg gaussian_smooth: two 1-D passes, "
    "equal to torchvision's gaussian_blur within 2e-5)",
    "Determinism: anomalib's PatchCore coreset varies between processes (its SparseRandomProjection draws "
    "column indices with sklearn's sample_without_replacement(random_state=None), i.e. numpy's unseeded "
    "global RNG; torch is seeded here, numpy is not, as without Lightning's seed_everything), so its "
    "metrics are medians over the repeats; anoseg's are identical in every repeat",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- preparation (parent)

def prepare_data(data: Path | None, categories: list[str]) -> tuple[Path, Path]:
    """The dataset folder (generated unless given) and the .pt file of uint8 images + ground truth."""
    import numpy as np
    import torch

    from anoseg.data import load_test, load_train

    if data is None:
        data = CACHE / "data" / f"synthetic-{IMAGE_SIZE}-seed{SEED}"
        if not all((data / c / "train" / "good").is_dir() for c in categories):
            from anoseg.data.synthetic import generate

            log(f"generating the synthetic data set into {data}")
            generate(data, image_size=IMAGE_SIZE, seed=SEED, overwrite=True)
    key = hashlib.sha256(f"{data.resolve()}|{','.join(categories)}|{IMAGE_SIZE}".encode()).hexdigest()[:12]
    tensors = CACHE / f"tensors-{key}.pt"
    if tensors.is_file():
        return data, tensors
    log(f"reading {data} with anoseg's loaders into {tensors}")
    out = {}
    for cat in categories:
        train = load_train(data, cat, IMAGE_SIZE)
        test = load_test(data, cat, IMAGE_SIZE)
        u8 = {}
        for split, x in (("train", train), ("test", test.images)):
            u8[split] = (x * 255).round().to(torch.uint8)
            if not torch.equal(u8[split].float().div_(255.0), x):  # the workers' conversion is exact
                raise SystemExit(f"uint8 round trip of {cat}/{split} is not exact")
        out[cat] = {**u8, "masks": test.masks.clone(), "labels": torch.from_numpy(np.asarray(test.labels)),
                    "defect_types": list(test.defect_types)}
    tensors.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, tensors)
    return data, tensors


def prepare_weights(backbone: str) -> Path:
    """A full-model state dict of timm ``backbone`` with random init under torch.manual_seed(0)."""
    import timm
    import torch

    path = CACHE / "weights" / f"{backbone}-random-seed{SEED}.pth"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(SEED)
        model = timm.create_model(backbone, pretrained=False)
        torch.save(model.state_dict(), path)
    return path


def ensure_anomalib_venv(venv: Path, spec: str) -> tuple[Path, str]:
    """Create ``venv`` (once) seeing this interpreter's site-packages, with anomalib installed; its python
    and anomalib's version."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('anomalib'))"]
    if python.is_file():
        done = subprocess.run(probe, capture_output=True, text=True)
        if done.returncode == 0:
            return python, done.stdout.strip()
    log(f"creating the anomalib venv {venv} (pip install {spec})")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = sysconfig.get_paths()["purelib"]  # anoseg's venv: torch, timm, torchvision, numpy, ... reused
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "_anoseg_parent_site.pth").write_text(purelib + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", spec],
                   stdout=sys.stderr, check=True)
    done = subprocess.run(probe, capture_output=True, text=True, check=True)
    log(f"anomalib {done.stdout.strip()} installed in {time.perf_counter() - start:.0f} s")
    return python, done.stdout.strip()


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def snapshot_anoseg(source: str, dest: Path) -> dict:
    """Copy the anoseg package (of a git revision or the working tree) to ``dest``; every process of the run
    imports that copy, so edits to the working tree during the run change nothing."""
    dest.mkdir(parents=True)
    if source == "worktree":
        shutil.copytree(ROOT / "anoseg", dest / "anoseg", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "archive", source, "anoseg"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    digest = hashlib.sha256()
    for path in sorted((dest / "anoseg").rglob("*.py")):
        digest.update(path.relative_to(dest).as_posix().encode() + b"\0" + path.read_bytes())
    revision = "HEAD" if source == "worktree" else source
    return {"source": source, "commit": _git("rev-parse", "--short", revision).strip(),
            "package_sha256_16": digest.hexdigest()[:16],
            "worktree_changes_in_anoseg": _git("status", "--porcelain", "--", "anoseg").splitlines()}


# --------------------------------------------------------------------------- child processes

def run_child(python: str, job: dict, workdir: Path, name: str, threads: int) -> tuple[dict, dict]:
    """Run a worker in a fresh process; its memory ({"peak_rss_mib"} from wait4's ru_maxrss,
    {"peak_anon_mib"} = the largest RssAnon seen polling /proc every POLL_S) and the info it wrote."""
    job = {**job, "info": str(workdir / f"{name}.json"), "out": str(workdir / f"{name}.npz")}
    job_file = workdir / f"{name}.job.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, **thread_env(threads), "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", str(job_file)],
                            stdout=sys.stderr, env=env, cwd=ROOT)
    peak_anon = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak_anon = max(peak_anon, proc_status_mib(proc.pid).get("RssAnon", 0.0))
        time.sleep(POLL_S)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"worker {name} failed with exit code {proc.returncode} (job {job_file})")
    memory = {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "peak_anon_mib": round(peak_anon, 1)}
    return memory, json.loads(Path(job["info"]).read_text())


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _load_tensors(path: str, categories: list[str]):
    import torch

    data = torch.load(path, weights_only=False)
    return {c: data[c] for c in categories}


def _as_float(u8):
    return u8.float().div_(255.0)  # exactly what anoseg's loader returns


def worker(job_file: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    job = json.loads(Path(job_file).read_text())
    start = time.perf_counter()
    import numpy as np
    import torch

    _set_threads(job["threads"])
    torch.manual_seed(SEED)
    info: dict = {"memory_trace_mib": {"import_torch": proc_status_mib()}}
    kind = job["kind"]
    data = _load_tensors(job["tensors"], job["categories"])
    info["memory_trace_mib"]["tensors"] = proc_status_mib()
    if kind == "baseline":
        if job.get("with_library"):
            _import_library(job["side"], job.get("anoseg_path"))
            info["memory_trace_mib"]["import_library"] = proc_status_mib()
        for cat in job["categories"]:
            images = [_as_float(data[cat]["train"]), _as_float(data[cat]["test"])]
            del images
        Path(job["info"]).write_text(json.dumps(info))
        return
    lib_start = time.perf_counter()
    _import_library(job["side"], job.get("anoseg_path"))
    info["import_library_s"] = round(time.perf_counter() - lib_start, 2)
    info["memory_trace_mib"]["import_library"] = proc_status_mib()
    build_start = time.perf_counter()
    side = AnosegSide(job) if job["side"] == "anoseg" else AnomalibSide(job)
    info["build_s"] = round(time.perf_counter() - build_start, 2)
    info.update(side.info)
    info["memory_trace_mib"]["model"] = proc_status_mib()
    arrays: dict = {}
    if kind == "verify":
        images = _as_float(data[job["categories"][0]]["train"][:VERIFY_IMAGES])
        for layer, fmap in side.layer_maps(images).items():
            arrays[layer] = fmap.numpy()
    else:
        info["categories"] = {}
        for cat in job["categories"]:
            train, test = _as_float(data[cat]["train"]), _as_float(data[cat]["test"])
            t0 = time.perf_counter()
            side.fit(train)
            fit_s = time.perf_counter() - t0
            after_fit = proc_status_mib()
            t0 = time.perf_counter()
            maps, scores = side.test(test)
            test_s = time.perf_counter() - t0
            arrays[f"{cat}/maps"] = maps.numpy().astype(np.float32)
            arrays[f"{cat}/scores"] = scores.numpy().astype(np.float64)
            info["categories"][cat] = {
                "fit_s": round(fit_s, 4), "test_s": round(test_s, 4), "n_train": len(train), "n_test": len(test),
                "test_ms_per_image": round(test_s / len(test) * 1000, 3), "map_shape": list(maps.shape),
                "vmhwm_after_fit_mib": after_fit["VmHWM"], "vmhwm_after_test_mib": proc_status_mib()["VmHWM"],
                **side.category_info(),
            }
            del train, test, maps, scores
    np.savez(job["out"], **arrays)
    info["worker_wall_s"] = round(time.perf_counter() - start, 2)
    Path(job["info"]).write_text(json.dumps(info))


def _import_library(side: str, anoseg_path: str | None = None) -> None:
    if side == "anoseg":
        sys.path.insert(0, anoseg_path or str(ROOT))
        import anoseg.backbones  # noqa: F401
        import anoseg.features  # noqa: F401
        import anoseg.heads  # noqa: F401
    else:
        from anomalib.models.image.padim.torch_model import PadimModel  # noqa: F401
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: F401


class AnosegSide:
    """anoseg through its one pipeline (anoseg.pipeline), as `fit` and `predict` run it (images already in memory)."""

    def __init__(self, job: dict) -> None:
        import anoseg
        from anoseg.backbones import create_backbone

        self.job = job
        self.layers = job["layers"]
        self.device = "cpu"
        self.backbone = create_backbone(job["backbone"], self.layers, job["weights"])
        self.info = {"weights": self.backbone.weights, "anoseg_path": str(Path(anoseg.__file__).parent)}
        self.head = None

    def layer_maps(self, images):
        from anoseg.features import extract_layers

        return extract_layers(self.backbone, images, self.job["batch_size"], self.device)

    def _new_head(self):
        from anoseg.heads import create_head

        if self.job["head"] == "padim":
            return create_head("padim", n_features=self.job["n_features"])
        return create_head("patchcore", **PATCHCORE)

    def fit(self, images) -> None:
        """Layer maps a batch at a time into the head, as anoseg.model.fit_model fits."""
        from anoseg.features import iter_layer_maps
        from anoseg.pipeline import fit_feature_head

        self.head = self._new_head()
        fit_feature_head(self.head, iter_layer_maps(self.backbone, images, self.job["batch_size"], self.device),
                         self.layers)

    def test(self, images):
        """As anoseg.model.FittedModel.predict: extract, score and post-process a batch at a time."""
        import torch

        from anoseg.pipeline import score_batch

        bs = self.job["batch_size"]
        maps_list, scores_list = [], []
        for first in range(0, len(images), bs):
            maps, scores = score_batch(self.head, self.layer_maps(images[first:first + bs]), self.layers, IMAGE_SIZE)
            maps_list.append(maps)
            scores_list.append(scores)
        return torch.cat(maps_list), torch.cat(scores_list)

    def category_info(self) -> dict:
        if self.job["head"] == "padim":
            channels = self.head.channels_.tolist()
            if channels != self.job["padim_channels"]:
                raise SystemExit("anoseg's PaDiM channel subset differs from the one given to anomalib")
            return {"padim_channels": len(channels)}
        return {"memory_bank": list(self.head.memory_bank_.shape)}


class AnomalibSide:
    """anomalib's torch model used as its Lightning module uses it (training_step / fit / validation_step)."""

    def __init__(self, job: dict) -> None:
        import torch

        self.job = job
        torch.manual_seed(SEED)
        if job["head"] == "padim":
            from anomalib.models.image.padim.torch_model import PadimModel

            self.model = PadimModel(backbone=job["backbone"], layers=list(job["layers"]), pre_trained=False,
                                    n_features=job["n_features"])
        else:
            from anomalib.models.image.patchcore.torch_model import PatchcoreModel

            self.model = PatchcoreModel(layers=list(job["layers"]), backbone=job["backbone"], pre_trained=False,
                                        num_neighbors=PATCHCORE["reweight_neighbours"])
        state = torch.load(job["weights"], map_location="cpu", weights_only=True)
        extractor = self.model.feature_extractor.feature_extractor
        result = extractor.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        print(f"anomalib {job['backbone']}: load_state_dict(strict=False): {len(result.missing_keys)} missing, "
              f"{len(result.unexpected_keys)} unexpected keys (unused layers / classifier)", file=sys.stderr)
        if missing:
            raise SystemExit(f"anomalib's feature extractor lacks {len(missing)} keys of the weights file: "
                             f"{missing[:5]}")
        self.info = {"load_state_dict": {"missing_keys": len(result.missing_keys),
                                         "unexpected_keys": len(result.unexpected_keys),
                                         "unexpected_examples": sorted({k.split(".")[0]
                                                                        for k in result.unexpected_keys})},
                     "used_keys": len(extractor.state_dict())}
        if job["head"] == "padim":
            self.model.idx.copy_(torch.tensor(job["padim_channels"]))  # anoseg's channel subset
            if job.get("layer_resize", "nearest") != "nearest":  # diagnostic variant, see --no-diagnose
                self.model.generate_embedding = self._embedding_resized_with(job["layer_resize"])
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def _embedding_resized_with(self, mode: str):
        """PadimModel.generate_embedding with another resize mode for layer2/3 (anomalib: nearest)."""
        import torch
        import torch.nn.functional as F

        model = self.model

        def generate_embedding(features):
            embeddings = features[model.layers[0]]
            for layer in model.layers[1:]:
                resized = F.interpolate(features[layer], size=embeddings.shape[-2:], mode=mode, align_corners=False)
                embeddings = torch.cat((embeddings, resized), 1)
            return torch.index_select(embeddings, 1, model.idx.to(embeddings.device))

        return generate_embedding

    def _batches(self, images):
        bs = self.job["batch_size"]
        for first in range(0, len(images), bs):
            yield (images[first:first + bs] - self.mean) / self.std  # the pre-processor's Normalize

    def layer_maps(self, images):
        import torch

        parts: dict = {}
        for batch in self._batches(images):
            for layer, fmap in self.model.feature_extractor(batch).items():
                parts.setdefault(layer, []).append(fmap)
        return {layer: torch.cat(p) for layer, p in parts.items()}

    def fit(self, images) -> None:
        self.model.train()  # training_step: collect embeddings
        for batch in self._batches(images):
            self.model(batch)
        if self.job["head"] == "padim":
            self.model.fit()
        else:
            self.model.subsample_embedding(PATCHCORE["coreset_ratio"])

    def test(self, images):
        import torch

        self.model.eval()
        maps, scores = [], []
        with torch.inference_mode():  # Lightning's validation / test default
            for batch in self._batches(images):
                out = self.model(batch)
                maps.append(out.anomaly_map[:, 0])
                scores.append(out.pred_score.reshape(-1))
        return torch.cat(maps), torch.cat(scores)

    def category_info(self) -> dict:
        if self.job["head"] == "padim":
            return {"padim_channels": int(self.model.idx.numel())}
        return {"memory_bank": list(self.model.memory_bank.shape)}


# --------------------------------------------------------------------------- the benchmark (parent)

def verify_layer_maps(anomalib_python: str, job: dict, tensors: dict, workdir: Path, threads: int) -> dict:
    """Both sides' layer maps on the same images must match; stops the benchmark otherwise."""
    import numpy as np
    import torch

    from anoseg.backbones import create_backbone
    from anoseg.features import extract_layers

    name = f"verify-{job['head']}-{job['backbone']}"
    _, info = run_child(anomalib_python, {**job, "kind": "verify", "side": "anomalib"}, workdir, name, threads)
    theirs = np.load(workdir / f"{name}.npz")
    backbone = create_backbone(job["backbone"], job["layers"], job["weights"])
    images = _as_float(tensors[job["categories"][0]]["train"][:VERIFY_IMAGES])
    ours = extract_layers(backbone, images, job["batch_size"])
    out = {"images": VERIFY_IMAGES, "layers": {}, "anomalib_load_state_dict": info["load_state_dict"]}
    for layer in job["layers"]:
        a, b = ours[layer], torch.from_numpy(theirs[layer])
        if a.shape != b.shape:
            raise SystemExit(f"{name}: layer {layer} shapes differ: anoseg {tuple(a.shape)}, anomalib {tuple(b.shape)}")
        rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
        out["layers"][layer] = {"shape": list(a.shape), "max_abs_diff_rel": rel}
        if not rel <= VERIFY_TOL:
            raise SystemExit(f"{name}: layer {layer} maps differ between anoseg and anomalib (rel {rel:.2e})")
    log(f"{name}: layer maps equal (max rel diff "
        f"{max(v['max_abs_diff_rel'] for v in out['layers'].values()):.1e})")
    return out


def median(values):
    return round(statistics.median(values), 4)


def summarise(runs: list[dict], categories: list[str]) -> dict:
    fit = [sum(r["categories"][c]["fit_s"] for c in categories) for r in runs]
    test = [sum(r["categories"][c]["test_s"] for c in categories) for r in runs]
    n_test = sum(runs[0]["categories"][c]["n_test"] for c in categories)
    return {
        "fit_s": median(fit),
        "test_s": median(test),
        "total_s": median([f + t for f, t in zip(fit, test)]),
        "test_ms_per_image": round(statistics.median(test) / n_test * 1000, 2),
        "fit_s_per_category": {c: median([r["categories"][c]["fit_s"] for r in runs]) for c in categories},
        "test_ms_per_image_per_category": {c: median([r["categories"][c]["test_ms_per_image"] for r in runs])
                                           for c in categories},
        **{k: round(statistics.median(r["memory"][k] for r in runs), 1)
           for k in ("peak_rss_mib", "net_rss_mib", "peak_anon_mib", "net_anon_mib", "work_anon_mib")},
        "rss_after_import_mib": round(statistics.median(r["memory_trace_mib"]["import_library"]["VmRSS"]
                                                        for r in runs), 1),
        "build_s": median([r["build_s"] for r in runs]),
        "import_library_s": median([r["import_library_s"] for r in runs]),
        "worker_wall_s": median([r["worker_wall_s"] for r in runs]),
    }


def compute_metrics(npz: Path, tensors: dict, categories: list[str]) -> dict:
    import numpy as np

    from anoseg.metrics import evaluate

    saved = np.load(npz)
    out = {}
    for cat in categories:
        maps, scores = saved[f"{cat}/maps"], saved[f"{cat}/scores"]
        if maps.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise SystemExit(f"{npz.name}: {cat} maps are {maps.shape[1:]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        out[cat] = evaluate(maps, scores, tensors[cat]["masks"], tensors[cat]["labels"])
    out["mean"] = {k: float(np.mean([out[c][k] for c in categories])) for k in METRICS}
    return out


def median_metrics(per_run: list[dict]) -> dict:
    """{category or "mean": {metric: median over the repeats}}."""
    return {c: {k: statistics.median(m[c][k] for m in per_run) for k in METRICS} for c in per_run[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", nargs="+", choices=sorted(HEAD_LAYERS), default=["padim", "patchcore"])
    parser.add_argument("--backbone-padim", nargs="+", default=["resnet18"], choices=sorted(PADIM_N_FEATURES))
    parser.add_argument("--backbone-patchcore", nargs="+", default=["resnet18"],
                        choices=["resnet18", "wide_resnet50_2"])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--threads", type=int, nargs="+", default=[2],
                        help="torch / OpenMP / MKL threads of both sides; several values run each setting")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data", help="an existing data set in the MVTec AD layout (default: generate)")
    parser.add_argument("--anomalib-venv", default=str(CACHE / "anomalib-venv"))
    parser.add_argument("--anomalib-spec", default="anomalib", help="pip requirement for the anomalib venv")
    parser.add_argument("--anoseg-source", default="HEAD",
                        help="the anoseg package to benchmark: a git revision (default HEAD) or 'worktree'; "
                             "copied once at the start")
    parser.add_argument("--no-diagnose", dest="diagnose", action="store_false",
                        help="skip the extra anomalib PaDiM run with anoseg's (bilinear) layer resize")
    parser.add_argument("--fresh", action="store_true", help="ignore runs kept from an earlier, interrupted start")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "heads_vs_anomalib.json"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return

    import torch

    wall_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="anoseg-vs-anomalib-")
    workdir = Path(tmp.name)
    anoseg_src = snapshot_anoseg(args.anoseg_source, workdir / "src")
    anoseg_path = str(workdir / "src")
    sys.path.insert(0, anoseg_path)
    import anoseg

    if Path(anoseg.__file__).parent != workdir / "src" / "anoseg":
        raise SystemExit(f"imported anoseg from {anoseg.__file__}, not from the snapshot")
    log(f"anoseg snapshot ({args.anoseg_source}, commit {anoseg_src['commit']}) in {anoseg_path}")
    torch.set_num_threads(args.threads[0])
    data_dir, tensors_file = prepare_data(Path(args.data) if args.data else None, args.categories)
    tensors = _load_tensors(str(tensors_file), args.categories)
    python, anomalib_version = ensure_anomalib_venv(Path(args.anomalib_venv).expanduser(), args.anomalib_spec)
    setup_s = time.perf_counter() - wall_start

    from anoseg.backbones import backbone_layers

    pairs = [(h, b) for h in args.heads for b in (args.backbone_padim if h == "padim" else args.backbone_patchcore)]
    jobs: dict[str, dict] = {}
    weights: dict[str, dict] = {}
    for head, backbone in pairs:
        path = prepare_weights(backbone)
        weights[backbone] = {"file": str(path), "sha256_16": sha256(path),
                             "init": f"timm random init, torch.manual_seed({SEED})"}
        job = {"head": head, "backbone": backbone, "layers": list(HEAD_LAYERS[head]), "weights": str(path),
               "anoseg_path": anoseg_path, "tensors": str(tensors_file), "categories": args.categories,
               "batch_size": args.batch_size}
        if head == "padim":
            n_features = PADIM_N_FEATURES[backbone]
            channels = sum(i.channels for i in backbone_layers(backbone) if i.name in job["layers"])
            subset = torch.randperm(channels, generator=torch.Generator().manual_seed(0))[:n_features].sort().values
            job.update(n_features=n_features, padim_channels=subset.tolist())
        for threads in args.threads:
            jobs[f"{head}/{backbone}/threads={threads}"] = {**job, "threads": threads}

    with tmp:
        verification = {key.rsplit("/", 1)[0]: verify_layer_maps(str(python), job, tensors, workdir, job["threads"])
                        for key, job in jobs.items() if job["threads"] == args.threads[0]}
        pythons = {"anoseg": sys.executable, "anomalib": str(python)}
        sides = ("anoseg", "anomalib")

        # Every finished run is kept under state_dir, so a benchmark that was killed (a shared machine)
        # continues where it stopped when started again with the same setting; --fresh starts over.
        state_key = hashlib.sha256(json.dumps({
            "version": STATE_VERSION, "anoseg": anoseg_src["package_sha256_16"], "anomalib": anomalib_version,
            "benchmark": sha256(Path(__file__)),  # the workers' code is part of the setting
            "tensors": tensors_file.name, "weights": {b: w["sha256_16"] for b, w in weights.items()},
            "jobs": {k: {kk: vv for kk, vv in j.items() if kk != "anoseg_path"} for k, j in jobs.items()},
        }, sort_keys=True).encode()).hexdigest()[:16]
        state_dir = CACHE / "runs" / state_key
        if args.fresh and state_dir.is_dir():
            shutil.rmtree(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        if not (state_dir / "started_at").is_file():
            (state_dir / "started_at").write_text(str(time.time()))
        first_start = float((state_dir / "started_at").read_text())
        log(f"finished runs are kept in {state_dir}")
        resumed: list[str] = []

        def once(name: str, compute) -> dict:
            path = state_dir / f"{name}.json"
            if path.is_file():
                resumed.append(name)
                return json.loads(path.read_text())
            result = {**compute(), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            path.with_suffix(".tmp").write_text(json.dumps(result))
            path.with_suffix(".tmp").replace(path)
            return result

        baseline: dict[str, dict[str, list[dict]]] = {s: {"torch_tensors": [], "with_library": []} for s in sides}
        for rep in range(args.repeats):
            for side in sides if rep % 2 == 0 else sides[::-1]:
                for with_library in (False, True):
                    job = {"kind": "baseline", "side": side, "with_library": with_library, "anoseg_path": anoseg_path,
                           "tensors": str(tensors_file), "categories": args.categories, "threads": args.threads[0]}
                    name = f"baseline-{side}-{int(with_library)}-{rep}"
                    done = once(name, lambda: dict(zip(("memory", "info"), run_child(
                        pythons[side], job, workdir, name, args.threads[0]))))
                    baseline[side]["with_library" if with_library else "torch_tensors"].append(done["memory"])
        base = {s: {variant: {k: round(statistics.median(m[k] for m in ms), 1) for k in ms[0]}
                    for variant, ms in baseline[s].items()} for s in sides}
        log(f"baseline peak memory (MiB): {base}")

        def measured_run(python: str, job: dict, name: str) -> dict:
            memory, info = run_child(python, job, workdir, name, job["threads"])
            metrics = compute_metrics(workdir / f"{name}.npz", tensors, args.categories)
            (workdir / f"{name}.npz").unlink()
            return {"memory": memory, "info": info, "metrics": metrics}

        runs: dict[str, dict[str, list[dict]]] = {key: {s: [] for s in sides} for key in jobs}
        metrics: dict[str, dict[str, list[dict]]] = {key: {s: [] for s in sides} for key in jobs}
        for rep in range(args.repeats):
            for key, job in jobs.items():
                for side in sides if rep % 2 == 0 else sides[::-1]:
                    name = f"{side}-{key.replace('/', '-').replace('=', '')}-{rep}"
                    log(f"repeat {rep + 1}/{args.repeats}: {side} {key}")
                    done = once(name, lambda: measured_run(pythons[side], {**job, "kind": "run", "side": side}, name))
                    info, memory = done["info"], dict(done["memory"])
                    memory["net_rss_mib"] = round(memory["peak_rss_mib"]
                                                  - base[side]["torch_tensors"]["peak_rss_mib"], 1)
                    memory["net_anon_mib"] = round(memory["peak_anon_mib"]
                                                   - info["memory_trace_mib"]["tensors"]["RssAnon"], 1)
                    memory["work_anon_mib"] = round(memory["peak_anon_mib"]
                                                    - info["memory_trace_mib"]["model"]["RssAnon"], 1)
                    info["memory"] = memory
                    info["finished_at"] = done["finished_at"]
                    runs[key][side].append(info)
                    metrics[key][side].append(done["metrics"])
                    total = sum(c["fit_s"] + c["test_s"] for c in info["categories"].values())
                    log(f"  fit+test {total:.2f} s, peak RSS {memory['peak_rss_mib']:.0f} MiB "
                        f"(net {memory['net_rss_mib']:.0f}, anon net {memory['net_anon_mib']:.0f}), "
                        f"image AUROC {metrics[key][side][-1]['mean']['image_auroc']:.4f}, "
                        f"pixel AUROC {metrics[key][side][-1]['mean']['pixel_auroc']:.4f}"
                        + (" (kept from an earlier start)" if name in resumed else ""))

        diagnostics = {}
        if args.diagnose:
            for key, job in jobs.items():
                if job["head"] != "padim" or job["threads"] != args.threads[0]:
                    continue
                # Is the PaDiM metric gap the layer resize? anomalib once more, resizing like anoseg.
                name = f"diagnose-anomalib-{key.replace('/', '-').replace('=', '')}-bilinear"
                log(f"diagnostic: anomalib {key} with bilinear layer resize")
                done = once(name, lambda: measured_run(
                    pythons["anomalib"], {**job, "kind": "run", "side": "anomalib", "layer_resize": "bilinear"}, name))
                ours = median_metrics(metrics[key]["anoseg"])
                diagnostics[key.rsplit("/", 1)[0] + ": anomalib PaDiM resizing layer2/3 bilinearly like anoseg"] = {
                    "anomalib_bilinear": {c: {k: round(v, 4) for k, v in m.items()}
                                          for c, m in done["metrics"].items()},
                    "diff_anoseg_minus_anomalib_bilinear": {
                        c: {k: round(ours[c][k] - done["metrics"][c][k], 4)
                            for k in ("image_auroc", "pixel_auroc", "aupro")}
                        for c in (*args.categories, "mean")},
                    "fit_s": round(sum(c["fit_s"] for c in done["info"]["categories"].values()), 2),
                    "test_s": round(sum(c["test_s"] for c in done["info"]["categories"].values()), 2),
                }

    finished = [time.mktime(time.strptime(r["finished_at"], "%Y-%m-%d %H:%M:%S %Z"))
                for per_key in runs.values() for rs in per_key.values() for r in rs]
    results = {}
    summary = {}
    for key in jobs:
        med = {s: summarise(runs[key][s], args.categories) for s in sides}
        met = {s: median_metrics(metrics[key][s]) for s in sides}
        stable = {s: all(m == metrics[key][s][0] for m in metrics[key][s]) for s in sides}
        spread = {s: {f"{c}/{k}": [round(min(m[c][k] for m in metrics[key][s]), 4),
                                   round(max(m[c][k] for m in metrics[key][s]), 4)]
                      for c in (*args.categories, "mean") for k in METRICS
                      if len({m[c][k] for m in metrics[key][s]}) > 1} for s in sides}
        a, b = med["anoseg"], med["anomalib"]
        ratios = {
            "fit_speedup": round(b["fit_s"] / a["fit_s"], 2),
            "test_speedup": round(b["test_s"] / a["test_s"], 2),
            "total_speedup": round(b["total_s"] / a["total_s"], 2),
            "peak_rss_ratio": round(a["peak_rss_mib"] / b["peak_rss_mib"], 3),
            "net_rss_ratio": round(a["net_rss_mib"] / b["net_rss_mib"], 3),
            "net_anon_ratio": round(a["net_anon_mib"] / b["net_anon_mib"], 3),
            "work_anon_ratio": round(a["work_anon_mib"] / b["work_anon_mib"], 3),
        }
        diffs = {m: round(met["anoseg"]["mean"][m] - met["anomalib"]["mean"][m], 4) for m in METRICS}
        per_cat_diffs = {c: {m: round(met["anoseg"][c][m] - met["anomalib"][c][m], 4)
                             for m in ("image_auroc", "pixel_auroc", "aupro")} for c in args.categories}
        results[key] = {
            "setting": {k: v for k, v in jobs[key].items()
                        if k not in ("tensors", "categories", "padim_channels", "anoseg_path")},
            "median": med,
            "ratios_anomalib_over_anoseg_time_and_anoseg_over_anomalib_memory": ratios,
            "metrics_median_over_repeats": {s: {c: {k: round(v, 4) for k, v in m.items()} for c, m in met[s].items()}
                                            for s in sides},
            "metrics_identical_across_repeats": stable,
            "metrics_min_max_where_repeats_differ": spread,
            "metric_diff_anoseg_minus_anomalib": {"mean": diffs, "per_category": per_cat_diffs},
            "targets": {
                "speedup_ge_2": ratios["total_speedup"] >= 2,
                "net_rss_le_0.5": ratios["net_rss_ratio"] <= 0.5,
                "net_anon_le_0.5": ratios["net_anon_ratio"] <= 0.5,
                "work_anon_le_0.5": ratios["work_anon_ratio"] <= 0.5,
                "peak_rss_le_0.5": ratios["peak_rss_ratio"] <= 0.5,
                "image_auroc_within_0.01": abs(diffs["image_auroc"]) <= 0.01,
                "pixel_auroc_within_0.01": abs(diffs["pixel_auroc"]) <= 0.01,
            },
            "runs": {s: runs[key][s] for s in sides},
        }
        summary[key] = {
            "total_s": {s: med[s]["total_s"] for s in sides},
            "speedup_fit_test_total": [ratios["fit_speedup"], ratios["test_speedup"], ratios["total_speedup"]],
            "memory_ratio_peak_rss_net_rss_net_anon_work_anon": [ratios["peak_rss_ratio"], ratios["net_rss_ratio"],
                                                                  ratios["net_anon_ratio"], ratios["work_anon_ratio"]],
            "image_auroc": {s: round(met[s]["mean"]["image_auroc"], 4) for s in sides},
            "pixel_auroc": {s: round(met[s]["mean"]["pixel_auroc"], 4) for s in sides},
            "aupro": {s: round(met[s]["mean"]["aupro"], 4) for s in sides},
            "targets_met": [t for t, ok in results[key]["targets"].items() if ok],
            "targets_missed": [t for t, ok in results[key]["targets"].items() if not ok],
        }

    report = {
        "benchmark": "heads_vs_anomalib",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "setting": {"command": " ".join(["python", "bench/heads_vs_anomalib.py", *sys.argv[1:]]),
                    "repeats": args.repeats, "categories": args.categories, "image_size": IMAGE_SIZE,
                    "threads": args.threads, "batch_size": args.batch_size, "data": str(data_dir),
                    "n_train": {c: len(tensors[c]["train"]) for c in args.categories},
                    "n_test": {c: len(tensors[c]["test"]) for c in args.categories},
                    "weights": weights, "patchcore": PATCHCORE,
                    "order": "alternating: anoseg first in even repeats, anomalib first in odd ones",
                    "thread_env": "OMP_NUM_THREADS = MKL_NUM_THREADS = OPENBLAS_NUM_THREADS = threads, "
                                  "torch.set_num_threads(threads)"},
        "machine": {**machine(), "anomalib": anomalib_version, "anomalib_venv": str(args.anomalib_venv),
                    "timm": __import__("timm").__version__, "anoseg": anoseg_src},
        "baseline_memory_mib": base,
        "verification": verification,
        "notes": list(NOTES),
        "summary": summary,
        "diagnostics": diagnostics,
        "results": results,
        "setup_s": round(setup_s, 1),
        "wall_s": round(time.perf_counter() - wall_start, 1),
        "runs_kept_from_earlier_starts": len(resumed),
        "span_s_first_start_to_last_run": round(max(finished) - first_start, 1),
        "state_dir": str(state_dir),
    }
    text = json.dumps(report, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
