"""Every command in README.md's "From your data to a cluster" section runs, as written, with tiny stand-ins.

The README's variables (CONFIG, SIGLIP, SMOLLM2, SRC, ...) are set here to a tiny config, tiny random SigLIP and
Llama folders, a small cauldron-style dataset and two ranks on this machine. `sbatch`, `srun` and `scontrol` are
stand-ins that run the batch script as one node of a SLURM job. `make demo` / `make test` (the first block) are
run by the demo and by CI themselves. The config reference block must match the dataclasses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import CPU_ENV, free_port
from toolkit.docs import config_block

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()

STUBS = {
    "sbatch": """#!/bin/sh
# stand-in for sbatch: run the batch script here as the only node of a SLURM job
while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
script=$1; shift
SLURM_JOB_NODELIST=localhost SLURM_NNODES=1 SLURM_JOB_ID=4242 SLURM_SUBMIT_DIR=$PWD exec bash "$script" "$@"
""",
    "srun": """#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in --*) shift ;; *) break ;; esac; done
exec "$@"
""",
    "scontrol": "#!/bin/sh\necho localhost\n",
}


def readme_commands() -> list[str]:
    """Command lines of the bash blocks after the variables block of the cluster section."""
    section = README.split("## From your data to a cluster", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [ln.strip() for block in blocks[1:] for ln in block.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def readme_variables() -> list[str]:
    section = README.split("## From your data to a cluster", 1)[1]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    return [ln.split("=", 1)[0] for ln in block.splitlines() if re.match(r"^[A-Z0-9_]+=", ln)]


def _tiny_backbones(root: Path, tokenizer: Path) -> tuple[Path, Path]:
    """SigLIP and Llama folders with the tiny preset's shapes; the Llama folder also holds the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from toolkit.config import load_config

    m = load_config("tiny").model
    vision = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=m.vit_hidden_dim, intermediate_size=m.vit_inter_dim, num_hidden_layers=m.vit_n_blocks,
        num_attention_heads=m.vit_n_heads, image_size=m.vit_img_size, patch_size=m.vit_patch_size,
        layer_norm_eps=m.vit_ln_eps))  # fmt: skip
    vision.save_pretrained(root / "siglip")
    language = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.lm_base_vocab_size, hidden_size=m.lm_hidden_dim, intermediate_size=m.lm_inter_dim,
        num_hidden_layers=m.lm_n_blocks, num_attention_heads=m.lm_n_heads, num_key_value_heads=m.lm_n_kv_heads,
        rms_norm_eps=m.lm_rms_eps, rope_theta=float(m.lm_re_base), tie_word_embeddings=m.lm_tie_weights))  # fmt: skip
    language.save_pretrained(root / "smollm2")
    for f in tokenizer.iterdir():
        shutil.copy(f, root / "smollm2" / f.name)
    return root / "siglip", root / "smollm2"


def _cauldron(root: Path) -> Path:
    """Two subsets in the_cauldron's schema, each with train and validation splits, saved with save_to_disk."""
    import datasets

    rng = np.random.RandomState(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    for subset in ("ai2d", "vqav2"):
        splits = {}
        for split, n in (("train", 48), ("validation", 8)):
            images, texts = [], []
            for _ in range(n):
                name = rng.choice(list(colours))
                arr = np.full((40 + rng.randint(30), 50, 3), colours[name], dtype=np.uint8)
                images.append([Image.fromarray(arr)])
                texts.append([{"user": "what colour is the shape", "assistant": name}])
            features = datasets.Features({
                "images": datasets.Sequence(datasets.Image()),
                "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string")}]})  # fmt: skip
            splits[split] = datasets.Dataset.from_dict({"images": images, "texts": texts}, features=features)
        datasets.DatasetDict(splits).save_to_disk(str(root / "cauldron" / subset))
    return root / "cauldron"


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory) -> dict[str, str]:
    from toolkit.data.prepare.synthetic import write_synth

    root = tmp_path_factory.mktemp("readme")
    write_synth(str(root / "synth"), samples=16, val_samples=4, seed=0)
    siglip, smollm2 = _tiny_backbones(root, root / "synth" / "tokenizer")
    image = root / "photo.png"
    Image.fromarray(np.full((48, 64, 3), (200, 40, 40), dtype=np.uint8)).save(image)
    (root / "hostfile").write_text("localhost slots=2\n")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    values = {
        "CONFIG": "tiny", "SIGLIP": str(siglip), "SMOLLM2": str(smollm2), "SRC": str(_cauldron(root)),
        "SUBSETS": "ai2d,vqav2", "DATA": str(root / "data"), "RUN": str(root / "run"),
        "HOSTFILE": str(root / "hostfile"), "STEPS": "3", "NODES": "1", "MASTER": "localhost", "IMAGE": str(image),
    }  # fmt: skip
    assert set(values) == set(readme_variables()), "README's variables changed: give this test stand-ins for them"
    env = {**os.environ, **values, **CPU_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NPROC_PER_NODE": "2",
           "GPUS_PER_NODE": "2", "NANOVLM_STOP_FILE": str(root / "slurm.stop")}  # fmt: skip
    return env


def test_readme_config_reference_is_generated_from_the_dataclasses():
    assert config_block() in README, "README's config reference is stale: run `make docs`"


@pytest.mark.multiproc
@pytest.mark.slow  # 75-90 s on 2 cores, the longest test: make test-slow (in .ci/run) runs it
def test_every_readme_command_runs(readme_env):
    commands = readme_commands()
    assert len(commands) >= 10
    for cmd in commands:
        env = {**readme_env, "MASTER_PORT": str(free_port())}
        done = subprocess.run(["bash", "-c", f"set -euo pipefail; {cmd}"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
    run = Path(readme_env["RUN"])
    for path in (run, Path(f"{run}-fsdp"), Path(f"{run}-slurm")):
        assert (path / "checkpoints" / "latest").read_text().strip() == "step_3", path
    assert (run / "export" / "final" / "model.safetensors").exists() and (run / "report.png").exists()
    manifest = Path(readme_env["DATA"]) / "train" / "manifest.json"
    assert '"samples": 96' in manifest.read_text().replace("\n", " ").replace("  ", " ")
    assert torch.load(run / "checkpoints" / "step_3" / "rank_1.pt", weights_only=False)["loader"] is not None
    histogram = json.loads(manifest.read_text())["token_histogram"]
    assert histogram["includes_image_tokens"] and sum(histogram["counts"]) == 96  # --config: exact image tokens
