"""`python -m toolkit export SRC OUT [--format nanovlm|hf]`: where the weights come from and which writer runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from toolkit.config import ModelConfig
from toolkit.errors import DISK_FULL_ERRNOS, UserError

FORMATS = ("nanovlm", "hf")


def read_source(src: str | Path) -> tuple[str, ModelConfig, dict[str, torch.Tensor], str | None]:
    """SRC -> (what it was, model config, weights, tokenizer folder or None). A run's checkpoint gives fp32 (its
    master weights); a nanoVLM folder's weights keep the dtype they were stored in, so a bf16 model is not exported
    at twice its size.

    A folder with config.json + model.safetensors is a nanoVLM-format model (the toolkit's export or nanoVLM's
    own); anything else is a run folder, its checkpoints/ folder or one step_N checkpoint.
    """
    path = Path(src)
    refuse_hf_export(path, "export")
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        from toolkit.model.hub import read_nanovlm_config

        cfg = read_nanovlm_config(path)
        state = load_file(str(path / "model.safetensors"))
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

    out = Path(out).resolve()  # `.` has no name to build OUT.tmp from
    check_out(out)
    what, cfg, state, tok = read_source(src)
    if fmt == "hf":
        from toolkit.export.hf import check_exportable, write_hf

        check_exportable(cfg)  # what the format cannot hold first: no tokenizer would fix it
    tokenizer = (cached_hub_folder(tokenizer) or tokenizer) if tokenizer else None  # a Hub id in the local cache
    if fmt == "hf" and tok is None and not tokenizer:  # the source's own Hub tokenizer, when it is cached here
        tokenizer = cached_hub_folder(cfg.tokenizer_path)
    tok = checked_tokenizer(cfg, tokenizer) if tokenizer else tok
    if fmt == "nanovlm" and tok is None:
        check_named_tokenizer(cfg.tokenizer_path)
    if fmt == "hf":
        write = lambda tmp: write_hf(cfg, state, tmp, tokenizer_dir=tok)  # noqa: E731
    else:
        from toolkit.model.hub import write_nanovlm

        write = lambda tmp: write_nanovlm(cfg, state, tmp, tokenizer_dir=tok)  # noqa: E731
    try:
        write_atomically(out, write)
    except OSError as exc:  # a read-only or missing place: was a 10-frame traceback (a full disk: main says so)
        if exc.errno in DISK_FULL_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise UserError(f"cannot write the export to {out}: {exc.strerror or exc}{where}; give a folder you can "
                        "write to") from None  # fmt: skip
    return what


def checked_tokenizer(cfg: ModelConfig, path: str) -> str:
    """--tokenizer is copied into OUT whole: any folder was taken (a home folder, a model folder) and an export
    with no usable tokenizer, or the wrong one, came out with exit 0. It must load and fit the model's vocabulary."""
    from toolkit.data.tokenizer import load_tokenizer

    if not Path(path).is_dir():
        raise UserError(
            f"--tokenizer {path} is not a folder (nor a Hub id in the local Hugging Face cache); give the folder "
            "training read as model.tokenizer"
        )
    try:
        load_tokenizer(cfg, path)
    except UserError as exc:  # TokenizerError: the vocabulary does not fit the model
        raise UserError(f"--tokenizer {path} does not fit this model: {exc}") from None
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"--tokenizer {path} holds no tokenizer transformers can load ({first}); give the folder training read "
            "as model.tokenizer (tokenizer.json and tokenizer_config.json)"
        ) from None
    return path


def is_hub_id(name: str) -> bool:
    """`org/name` and not a path that exists here."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not Path(name).exists()


def cached_hub_folder(name: str) -> str | None:
    """The local Hugging Face cache's snapshot folder of Hub id `name`, or None (not an id, or not cached).
    --tokenizer took a folder only, so a nanoVLM checkpoint naming SmolLM2's Hub tokenizer, cached by training,
    needed its snapshot folder dug out by hand for `--format hf`."""
    if not is_hub_id(name):
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        return None


def check_named_tokenizer(name: str) -> None:
    """A source without a tokenizer folder beside it leaves its config's name in the export. A Hugging Face Hub
    id (org/name) is kept: the machine that loads the export fetches it. Anything else is a folder that is not
    here: the export exited 0 naming it, and generate then failed on the export."""
    if is_hub_id(name):
        return
    raise UserError(
        f"the source's tokenizer {name!r} is not a folder here, so the export would name a tokenizer nobody can "
        "load: pass --tokenizer DIR (the folder training read as model.tokenizer)"
    )


# What an earlier export holds: OUT may be replaced only when it is one (or absent, or empty).
EXPORT_FILES = {"config.json", "model.safetensors", "model.safetensors.index.json", "generation_config.json"}
EXPORT_DIRS = {"tokenizer"}


def check_out(out: Path) -> None:
    """OUT is replaced whole, so it must be absent, empty, or an earlier export: `export RUN RUN` deleted the run's
    checkpoints and `export RUN notes/` the notes, each with exit 0."""
    if not out.exists():
        parent = next((p for p in out.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():  # found before the source is read, not after
            raise UserError(f"export OUT {out} lies under {parent}, which is a file; give a folder's path")
        return
    if not out.is_dir():
        raise UserError(f"export OUT {out} is a file; give a folder that does not exist yet (or an earlier export)")
    entries = list(out.iterdir())
    looks_exported = (out / "config.json").is_file() and any(
        (out / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    )
    foreign = [
        e.name
        for e in entries
        if not (e.name in EXPORT_DIRS and e.is_dir())
        and e.name not in EXPORT_FILES
        and not (e.is_file() and e.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template",
                                                    "processor", "preprocessor", "added_tokens")))
    ]  # fmt: skip
    if entries and (not looks_exported or foreign):
        shown = ", ".join(sorted(foreign or [e.name for e in entries])[:5])
        raise UserError(
            f"export OUT {out} holds other files ({shown}) that an export would replace; give a new folder (an "
            "earlier export there is replaced, nothing else is)"
        )


def refuse_hf_export(path: Path, command: str) -> None:
    """A `--format hf` export has config.json and model.safetensors too, with transformers' names and config:
    read as a nanoVLM folder it gave a default-shaped config beside weights it cannot hold."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(config, dict) and ("architectures" in config or "model_type" in config):
        raise UserError(
            f"{path} is a transformers export (`export --format hf`); {command} reads nanoVLM-format folders, runs "
            "and checkpoints: give the run or checkpoint it was exported from (transformers loads this folder itself)"
        )
