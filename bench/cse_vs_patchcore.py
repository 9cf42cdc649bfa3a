"""CSE's few k-means centres against PatchCore's memory bank on the same features; and what caching CSE's
defect bank saves per training epoch.

Usage: python bench/cse_vs_patchcore.py [--category brick --image-size 256 --n-train 20 --threads 1
        --repeats 3 --coreset-ratio 0.1 --seed 0]

Setting: the synthetic dataset (``anoseg.data.synthetic.generate``, one category, `--n-train` training
images, 10 good + 8 per defect kind test images) in a temporary folder; ImageNet EfficientNet-Lite0
(offline weights), layers blocks.1 + blocks.2; both heads at their default settings (PatchCore: coreset
`--coreset-ratio`, k 1, 3x3 patches, re-weighting; CSE: 64-dim embedding, k 32, 10 epochs), fitted on
the same training maps (fp16, as the feature cache keeps them).

Scoring: the head's own cost per test image from the layer maps (PatchCore: combine + 3x3 average +
k-NN against the bank; CSE: embed + distances to the centres), median over `--repeats` passes in
batches of 16, with the backbone's forward per image beside it (the same for both); and each head's
image AUROC, pixel AUROC and AUPRO on the test images (maps upsampled and smoothed as in the pipeline).

Bank caching: CSE makes its defect bank once (defect images + one backbone pass) and trains every epoch
from the cached maps. After training, `--repeats` more epochs are timed each way (alternating): from the
cached maps, with a backbone pass over the bank's defect images first (what training without the cache
would cost), and with the defects generated anew too (a bank drawn every epoch). Speed-up = that time /
the cached epoch's. An epoch includes the k-means fit at its end.

Prints one JSON object and writes it to bench/results/cse_vs_patchcore.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anoseg.backbones import create_backbone  # noqa: E402
from anoseg.data import load_test, load_train  # noqa: E402
from anoseg.data.synthetic import generate  # noqa: E402
from anoseg.features import extract_layers, layer_map_batches  # noqa: E402
from anoseg.heads import create_head  # noqa: E402
from anoseg.metrics import evaluate  # noqa: E402
from anoseg.pipeline import anomaly_maps, head_features, to_uint8  # noqa: E402
from machine_info import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "cse_vs_patchcore.json"
BACKBONE, LAYERS, BATCH = "tf_efficientnet_lite0", ["blocks.1", "blocks.2"], 16


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def score_all(score, maps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Patch maps of every test image, scored a batch at a time."""
    return torch.cat([score(batch) for batch in layer_map_batches(maps, BATCH)])


def quality(patch_maps: torch.Tensor, size: int, masks: torch.Tensor, labels) -> dict[str, float]:
    maps = anomaly_maps(patch_maps, size)
    metrics = evaluate(maps, maps.amax(dim=(1, 2)), masks, labels)
    return {k: round(metrics[k], 4) for k in ("image_auroc", "pixel_auroc", "aupro")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--category", default="brick")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--n-train", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = args.image_size

    with tempfile.TemporaryDirectory(prefix="anoseg-cse-bench-") as folder:
        generate(folder, seed=args.seed, categories=[args.category], image_size=size, n_train=args.n_train)
        train = load_train(folder, args.category, size)
        test = load_test(folder, args.category, size)
    backbone = create_backbone(BACKBONE, LAYERS, "offline")
    train_maps = {k: v.half() for k, v in extract_layers(backbone, train, BATCH).items()}
    test_maps, forward_s = timed(extract_layers, backbone, test.images, BATCH)

    patchcore = create_head("patchcore", coreset_ratio=args.coreset_ratio, seed=args.seed)
    _, patchcore_fit_s = timed(patchcore.fit, head_features(patchcore, train_maps, LAYERS))
    cse = create_head("cse", seed=args.seed).setup(backbone, "cpu")
    train_u8 = to_uint8(train)
    epochs = [timed(cse.train_epoch, train_u8, train_maps)[1] for _ in range(cse.epochs)]

    heads = {"patchcore": lambda maps: patchcore.score(head_features(patchcore, maps, LAYERS))[0],
             "cse": lambda maps: cse.score_images(None, maps)[0]}
    scoring, metrics = {}, {}
    with torch.inference_mode():
        for name, score in heads.items():
            patch_maps = score_all(score, test_maps)  # warm-up, and the maps the metrics are of
            times = [timed(score_all, score, test_maps)[1] for _ in range(args.repeats)]
            scoring[name] = round(statistics.median(times) * 1000 / len(test.images), 3)
            metrics[name] = quality(patch_maps, size, test.masks, test.labels)

    # bank caching: epochs from the cached bank maps against a backbone pass (and new defects) every epoch
    labels = cse.bank_["labels"]
    (defective, _), generate_s = timed(cse.defect_images, train_u8)

    def epoch_with_forward(images: torch.Tensor) -> None:
        maps = extract_layers(backbone, images, BATCH)
        cse.bank_ = {"maps": {k: v.half() for k, v in maps.items()}, "labels": labels}
        cse.train_epoch(train_u8, train_maps)

    def epoch_with_new_defects() -> None:
        epoch_with_forward(cse.defect_images(train_u8)[0])

    runs: dict[str, list[float]] = {"cached": [], "forward": [], "regenerate": []}
    for _ in range(args.repeats):
        runs["cached"].append(timed(cse.train_epoch, train_u8, train_maps)[1])
        runs["forward"].append(timed(epoch_with_forward, defective)[1])
        runs["regenerate"].append(timed(epoch_with_new_defects)[1])
    epoch = {name: statistics.median(times) for name, times in runs.items()}

    bank_rows, channels = patchcore.memory_bank_.shape
    result = {
        "setting": {
            "category": args.category, "image_size": size, "n_train": len(train), "n_test": len(test.images),
            "backbone": f"{BACKBONE} (offline ImageNet weights)", "layers": LAYERS, "threads": args.threads,
            "repeats": args.repeats, "seed": args.seed, "patchcore": patchcore.get_params(), "cse": cse.get_params(),
            "machine": machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "scoring_ms_per_image": {
            "backbone_forward": round(forward_s * 1000 / len(test.images), 3), **scoring,
            "patchcore_over_cse": round(scoring["patchcore"] / scoring["cse"], 1),
        },
        "model": {
            "patchcore_bank": [bank_rows, channels], "patchcore_floats": bank_rows * channels,
            "cse_centres": list(cse.centres_.shape),
            "cse_floats": cse.centres_.numel() + sum(p.numel() for p in cse.embedder_.parameters()),
            "patchcore_fit_s": round(patchcore_fit_s, 3), "cse_train_s": round(sum(epochs), 3),
        },
        "quality": metrics,
        "cse_bank_caching": {
            "bank_images": len(labels), "first_epoch_s_making_the_bank": round(epochs[0], 3),
            "generate_defects_s": round(generate_s, 3),
            "epoch_s": {name: round(seconds, 4) for name, seconds in epoch.items()},
            "speedup_vs_forward_every_epoch": round(epoch["forward"] / epoch["cached"], 2),
            "speedup_vs_new_defects_every_epoch": round(epoch["regenerate"] / epoch["cached"], 2),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
