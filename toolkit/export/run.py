"""`python -m toolkit export SRC OUT [--format nanovlm|hf]`: where the weights come from and which writer runs."""

from __future__ import annotations

from pathlib import Path

import torch

from toolkit.config import ModelConfig
from toolkit.errors import UserError

FORMATS = ("nanovlm", "hf")


def read_source(src: str | Path) -> tuple[str, ModelConfig, dict[str, torch.Tensor], str | None]:
    """SRC -> (what it was, model config, fp32 weights, tokenizer folder or None).

    A folder with config.json + model.safetensors is a nanoVLM-format model (the toolkit's export or nanoVLM's
    own); anything else is a run folder, its checkpoints/ folder or one step_N checkpoint.
    """
    path = Path(src)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        from toolkit.model.hub import read_nanovlm_config

        cfg = read_nanovlm_config(path)
        state = {
            k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path / "model.safetensors")).items()
        }
        tok = cfg.tokenizer_path if Path(cfg.tokenizer_path).is_dir() else None
        return f"nanoVLM folder {path}", cfg, state, tok
    from toolkit.train.checkpoint import checkpoint_weights

    ckpt, cfg, state, tok = checkpoint_weights(path)
    return f"checkpoint {ckpt}", cfg, state, tok


def export(src: str | Path, out: str | Path, *, fmt: str = "nanovlm", tokenizer: str | None = None) -> str:
    """Write SRC to OUT atomically in `fmt`; returns a description of what was read."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    from toolkit.train.checkpoint import write_atomically

    what, cfg, state, tok = read_source(src)
    tok = tokenizer or tok
    if fmt == "hf":
        from toolkit.export.hf import write_hf

        write_atomically(Path(out), lambda tmp: write_hf(cfg, state, tmp, tokenizer_dir=tok))
    else:
        from toolkit.model.hub import write_nanovlm

        write_atomically(Path(out), lambda tmp: write_nanovlm(cfg, state, tmp, tokenizer_dir=tok))
    return what
