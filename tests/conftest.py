"""Shared test fixtures: tiny configs, the nanoVLM reference fixture (skipped when ../shared is absent)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
REFERENCE = Path(os.environ.get("NANOVLM_REFERENCE", REPO.parent / "shared" / "reference" / "nanovlm-tiny"))
REFERENCE_HINT = "CI keeps ../shared beside the clone; elsewhere set NANOVLM_REFERENCE to the fixture folder"


# What every multi-process test runs with: CPU DeepSpeed, no GPU (two ranks must not share one over NCCL),
# one thread per rank, this checkout importable.
# PYTHONPATH keeps what the caller had (packages installed with --target, say) after this checkout.
PYTHONPATH = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
CPU_ENV = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *target: str) -> list[str]:
    """`python -m torch.distributed.run` on a free local port, then the target (a script, or -m module ...)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", *target]  # fmt: skip


def run_ranks(nproc: int, *target: str, timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """torchrun `target` on `nproc` CPU ranks; a hang or a crash fails the test with the ranks' output."""
    env = env if env is not None else {**os.environ, **CPU_ENV}
    try:
        proc = subprocess.run(torchrun(nproc, *target), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{nproc}-rank worker hung (killed after {exc.timeout}s):\n{(exc.stderr or b'')[-6000:]!r}")
    if proc.returncode != 0:
        pytest.fail(f"{nproc}-rank worker failed with exit code {proc.returncode}:\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture
def reference_dir() -> Path:
    if not (REFERENCE / "checkpoint" / "model.safetensors").exists():
        pytest.skip(f"nanoVLM reference fixture not found at {REFERENCE}: {REFERENCE_HINT}")
    return REFERENCE


def tiny_model_config(**overrides) -> ModelConfig:
    """2 ViT + 2 decoder blocks, 32 px tiles of 4 image tokens, 450-token vocabulary."""
    cfg = ModelConfig(
        vit_hidden_dim=32,
        vit_inter_dim=64,
        vit_patch_size=8,
        vit_img_size=32,
        vit_n_heads=2,
        vit_n_blocks=2,
        lm_hidden_dim=48,
        lm_inter_dim=96,
        lm_n_heads=4,
        lm_n_kv_heads=2,
        lm_n_blocks=2,
        lm_base_vocab_size=384,
        lm_vocab_size=450,
        lm_max_position_embeddings=1024,
        lm_max_length=256,
        mp_pixel_shuffle_factor=2,
        mp_image_token_length=4,
        max_img_size=64,
        resize_to_max_side_len=True,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_unless_gpu(request, monkeypatch) -> None:
    """On a GPU machine, tests not marked `gpu` still run on the CPU, as they do in CI.

    Their expectations (fp32 parity with a single-process run, two gloo ranks on one host) are CPU ones: with
    CUDA visible, `backend.device=auto` would put two ranks on one GPU over NCCL, which NCCL refuses. The GPU
    paths are what the `gpu`-marked tests are for.
    """
    if "gpu" in request.node.keywords or not torch.cuda.is_available():
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # subprocesses: torchrun workers, README commands
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this process: device=auto resolves to cpu


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu`-marked tests run only where CUDA is present (make test on a GPU machine runs them too)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
