"""Shared fixtures: a tiny hand-made MVTec-layout dataset and the synthetic dataset."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def tiny_mvtec(tmp_path: Path) -> Path:
    """One category 'widget': 3 train, 2 good test, 2 'crack' test images with masks, 40x40."""
    rng = np.random.default_rng(0)
    cat = tmp_path / "widget"
    for i in range(3):
        write_png(cat / "train" / "good" / f"{i:03d}.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    for i in range(2):
        write_png(cat / "test" / "good" / f"{i:03d}.png", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        write_png(cat / "test" / "crack" / f"{i:03d}.png", rng.integers(0, 255, (40, 40), dtype=np.uint8))  # grayscale
        mask = np.zeros((40, 40), np.uint8)
        mask[10:20, 10 + i:20 + i] = 255
        write_png(cat / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    return tmp_path


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic dataset at 128 px, small enough for fast tests."""
    from anoseg.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, seed=0, image_size=128, n_train=12, n_test_good=4, n_test_per_defect=2)
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a host or open a connection fails at once, as on an offline machine."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def empty_hub_caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case someone called torch.hub.set_dir
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def seed_hf_cache(hub_root: Path, pretrained_tag: str, state_dict: dict) -> str:
    """Write `state_dict` into an (empty_hub_caches) Hugging Face cache as timm's `pretrained_tag`; returns the repo id."""
    import safetensors.torch
    import timm

    repo_id = timm.get_pretrained_cfg(pretrained_tag).hf_hub_id
    repo = hub_root / "hf" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in state_dict.items()}, str(repo / "snapshots" / ("0" * 40) / "model.safetensors")
    )
    return repo_id


def assert_features_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Feature maps equal up to float32 summation order (extractors run NHWC, references NCHW):
    absolute tolerance 1e-5 of the largest magnitude."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(expected.abs().max())))


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: small training steps (the trainable heads' tests) spend more on
    hand-offs between threads than they gain on a busy machine (measured: a quality test 100 s with 2 threads
    on a shared 2-core machine, 12 s with 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
