from __future__ import annotations

import threading
import time

import numpy as np
import torch
from PIL import Image

from anoseg.cache import CacheKey, FeatureCache, cached_layer_maps
from anoseg.metrics import QUALITY_METRICS as METRIC_KEYS
from anoseg.trial import run_trial

CFG = {
    "backbone": {"name": "resnet18", "weights": "none"},
    "layers": ["layer1", "layer2"],
    "image_size": 64,
    "head": {"name": "padim", "n_features": 16},
}
KEY = CacheKey("resnet18", "none seed=0", "layer1", 64, "brick", "train", "abc")


def quality(result):
    return {c: {k: m[k] for k in METRIC_KEYS} for c, m in result.per_category.items()}


def test_cache_on_and_off_give_the_same_metrics_and_hits_the_second_time(synthetic_root, tmp_path):
    off = run_trial(CFG, synthetic_root, ["brick", "washer"])
    cache = FeatureCache(tmp_path / "cache")
    first = run_trial(CFG, synthetic_root, ["brick", "washer"], cache=cache)
    assert cache.misses == 8 and cache.hits == 0  # 2 layers x 2 splits x 2 categories
    second = run_trial(CFG, synthetic_root, ["brick", "washer"], cache=cache)
    assert cache.hits == 8
    assert quality(off) == quality(first) == quality(second)
    # a hit still charges the stored extraction time: cost stays comparable
    for cat in ("brick", "washer"):
        assert second.per_category[cat]["ms_per_image"] > 0.5 * first.per_category[cat]["ms_per_image"]


def test_layers_are_shared_between_layer_subsets(synthetic_root, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    run_trial(CFG, synthetic_root, ["brick"], cache=cache)
    cache.hits = cache.misses = 0
    run_trial({**CFG, "layers": ["layer2", "layer3"]}, synthetic_root, ["brick"], cache=cache)
    assert cache.hits == 2 and cache.misses == 2  # layer2 (train, test) shared; layer3 new


def test_any_key_field_change_misses(synthetic_root, tmp_path):
    cache = FeatureCache(tmp_path / "cache")
    run_trial(CFG, synthetic_root, ["brick"], cache=cache)
    for change in ({"image_size": 96}, {"seed": 1}, {"backbone": {"name": "tf_efficientnet_lite0", "weights": "none"},
                                                    "layers": ["blocks.1", "blocks.2"]}):
        cache.hits = cache.misses = 0
        run_trial({**CFG, **change}, synthetic_root, ["brick"], cache=cache)
        assert cache.hits == 0 and cache.misses == 4, change


def test_changed_data_misses(synthetic_root, tmp_path_factory):
    import shutil

    data = tmp_path_factory.mktemp("data")
    shutil.copytree(synthetic_root / "brick", data / "brick")
    cache = FeatureCache(tmp_path_factory.mktemp("cache"))
    run_trial(CFG, data, ["brick"], cache=cache)
    image = sorted((data / "brick" / "train" / "good").glob("*.png"))[0]
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(image)
    cache.hits = cache.misses = 0
    run_trial(CFG, data, ["brick"], cache=cache)
    assert cache.hits == 0 and cache.misses == 4


def test_disabled_cache_stores_nothing(tmp_path):
    cache = FeatureCache(None)
    cache.put(KEY, torch.ones(1, 2, 3, 3), 0.1)
    assert cache.get(KEY) is None and not cache.enabled


def test_damaged_entry_is_a_miss(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.put(KEY, torch.ones(2, 3, 4, 4), 0.01)
    data, _ = cache._paths(KEY)
    data.write_bytes(b"garbage")
    assert cache.get(KEY) is None


def test_least_recently_used_entries_are_evicted(tmp_path):
    entry = torch.ones(4, 8, 16, 16)  # 16 KiB in fp16
    cache = FeatureCache(tmp_path, max_bytes=3 * 17_000)
    keys = [CacheKey("b", "w", f"l{i}", 64, "c", "train", "f") for i in range(4)]
    for i, key in enumerate(keys[:3]):
        cache.put(key, entry, 0.01)
        time.sleep(0.02)
    assert cache.get(keys[0]) is not None  # keys[0] becomes the most recently used
    time.sleep(0.02)
    cache.put(keys[3], entry, 0.01)
    assert cache.get(keys[1]) is None  # the least recently used went
    assert all(cache.get(k) is not None for k in (keys[0], keys[2], keys[3]))


def test_concurrent_requests_compute_an_entry_once(tmp_path):
    calls = []

    def compute(layers):
        calls.append(layers)
        time.sleep(0.3)
        return {layer: torch.full((2, 3, 4, 4), 7.0) for layer in layers}, 0.05

    results = []

    def worker():
        results.append(cached_layer_maps(FeatureCache(tmp_path), {"layer1": KEY}, compute))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert all(torch.equal(r[0]["layer1"], results[0][0]["layer1"]) for r in results)
    assert all(r[1] == 0.05 for r in results)
