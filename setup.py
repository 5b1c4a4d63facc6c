"""Package definition for nanoVLM-scale.

torch is deliberately left to the Makefile's pinned install (`torch==2.13.0`, the CPU wheel on disk): a bare
`torch` requirement resolved by pip would pull a multi-GB CUDA build on a machine that has no GPU.
The range below admits that pin and the GPU machines' torch 2.11 alike.
"""

from setuptools import find_packages, setup

# What lmms-eval 0.7.3 imports to load its tasks and score image tasks, installed beside
# `pip install --no-deps lmms-eval==0.7.3` (the Makefile does both). lmms-eval's own requirements are not taken:
# they pull torchvision with another torch, the nvidia-* CUDA wheels (about 5 GB) and video, audio and API-client
# packages that image benchmarks never import. filelock<4: lmms-eval's evaluator patches `filelock._api`, which
# filelock 4 removed; pytablewriter: the results table of `python -m lmms_eval`. Found by importing
# lmms_eval.evaluator, running an offline generate_until task and lmms-eval's command line in a venv holding only
# the toolkit (tests/test_lmms.py::test_real_lmms_eval_*).
LMMS_DEPS = ["accelerate>=0.29.1", "evaluate>=0.4.0", "loguru", "sacrebleu>=1.5.0", "pytz", "tenacity>=8.3.0",
             "filelock<4", "pytablewriter"]  # fmt: skip

setup(
    name="nanovlm-scale",
    version="0.1.0",
    description="Scale-out training of nanoVLM-family vision-language models (DeepSpeed ZeRO / FSDP2).",
    python_requires=">=3.10",
    packages=find_packages(include=["toolkit", "toolkit.*"]),
    package_data={"toolkit": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.5",
        "deepspeed>=0.16",
        "transformers>=4.50",
        "datasets>=3.0",
        "webdataset>=0.2.100",
        "tensorboard>=2.15",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "pillow>=10.0",
        "torchdata>=0.11",
        "tqdm>=4.66",
        "matplotlib>=3.7",
    ],
    extras_require={
        "dev": ["pytest>=8.0", "ruff>=0.6", "pytest-timeout>=2.3", "wandb>=0.17", *LMMS_DEPS],
        # data.*_shards as s3://, gs://, hf:// ... URLs; the remote backend itself (s3fs, gcsfs ...) is the user's
        "remote": ["fsspec>=2023.1"],
        # train.wandb_project: Weights & Biases logging from rank 0
        "wandb": ["wandb>=0.17"],
        # lmms-eval (train.lmms_tasks, eval --lmms-tasks): what it needs besides itself; see LMMS_DEPS
        "lmms": LMMS_DEPS,
    },
    entry_points={
        "console_scripts": ["nanovlm-scale=toolkit.__main__:main"],
        # lmms-eval 0.7+ finds `--model nanovlm_scale` here (lmms-eval itself stays optional)
        "lmms_eval.models": ["nanovlm_scale=toolkit.lmms:model_manifest"],
    },
)
