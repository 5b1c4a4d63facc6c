"""Token lengths of shard samples, for the manifest's token_histogram.

One job: counting. resolve_token_spec turns --tokenizer into the model config to count with (exact counts with
image tokens when a nanoVLM config.json is found, text tokens only otherwise); TokenCounter counts a Sample's tokens
exactly as the training stream encodes it; token_histogram summarises the counts, with the quantiles that help
choose data.max_sample_length. Kept apart from writing because it is the only part that needs a model config and
a tokenizer (both imported lazily, so a run without --tokenizer never loads one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.config import ModelConfig
from toolkit.data.prepare.samples import Sample
from toolkit.data.prepare.sources import ShardDataError


@dataclass
class TokenSpec:
    """How to count a sample's tokens: the model config whose tokenizer and image tiling to use."""

    model: ModelConfig
    include_images: bool
    origin: str  # where the model config came from, for the manifest


class TokenCounter:
    """Tokens of the encoded conversation, image string included, exactly as the training stream builds it."""

    def __init__(self, spec: TokenSpec) -> None:
        from toolkit.data.tokenizer import TokenizerError, load_tokenizer

        self.spec = spec
        try:
            self.tok = load_tokenizer(spec.model)
        except TokenizerError as exc:
            raise ShardDataError(f"--tokenizer: {exc} (model config from {spec.origin})") from exc

    def __call__(self, sample: Sample) -> int:
        from toolkit.data.conversation import encode_sample
        from toolkit.data.images import target_size

        cfg = self.spec.model
        grids = []
        if self.spec.include_images:
            for w, h in sample.sizes:
                th, tw = target_size(
                    h, w, tile=cfg.vit_img_size, max_side=cfg.max_img_size, resize_to_max=cfg.resize_to_max_side_len
                )
                grids.append((th // cfg.vit_img_size, tw // cfg.vit_img_size))
        ids, _ = encode_sample(self.tok, sample.meta["texts"], grids, cfg.mp_image_token_length)
        return len(ids)


def resolve_token_spec(tokenizer: str) -> TokenSpec:
    """--tokenizer DIR -> the model config to count with.

    A nanoVLM config.json in DIR (a checkpoint folder; its lm_tokenizer is resolved against DIR and its parent,
    unless DIR holds the tokenizer itself) or in DIR's parent (a tokenizer inside a checkpoint) gives exact counts
    with image tokens. Otherwise only the conversation's text tokens are counted, and the manifest says so."""
    from toolkit.config import config_from_dict

    path = Path(tokenizer).resolve() if Path(tokenizer).exists() else Path(tokenizer)  # same OUT from any cwd
    for candidate in (path / "config.json", path.parent / "config.json"):
        fields = _nanovlm_fields(candidate)
        if fields is not None:
            if candidate.parent == path and not (path / "tokenizer_config.json").exists():
                name = fields.get("lm_tokenizer", "")
                found = [d / name for d in (path, path.parent) if name and (d / name).is_dir()]
                fields["tokenizer"] = str(found[0]) if found else name
            else:
                fields["tokenizer"] = str(path)
            return TokenSpec(config_from_dict({"model": fields}).model, True, str(candidate))
    from transformers import AutoTokenizer

    try:
        base = len(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    except (OSError, ValueError) as exc:
        raise ShardDataError(f"--tokenizer {tokenizer}: not a tokenizer folder or cached tokenizer ({exc})") from exc
    model = ModelConfig(lm_base_vocab_size=base, lm_vocab_size=base + ModelConfig().extra_token_amount)
    model.tokenizer = str(path)
    return TokenSpec(model, False, "text only: no nanoVLM config.json beside the tokenizer")


def _nanovlm_fields(path: Path) -> dict | None:
    import dataclasses

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not {"vit_img_size", "lm_base_vocab_size"} <= set(data):
        return None
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return {k: v for k, v in data.items() if k in names}


def token_histogram(lengths: list[int], *, include_images: bool, origin: str, bins: int = 32) -> dict:
    """Power-of-two-wide bins covering the shortest to the longest sample, plus the quantiles that help choose
    data.max_sample_length. Bin i counts lengths in [bin_edges[i], bin_edges[i + 1])."""
    arr = np.asarray(lengths, dtype=np.int64)
    low, top = (int(arr.min()), int(arr.max())) if len(arr) else (0, 0)
    width = 1
    while width * bins <= top - low:
        width *= 2
    edges = list(range(low // width * width, (top // width + 2) * width, width))
    counts, _ = np.histogram(arr, bins=edges)
    q = {f"p{p}": int(np.percentile(arr, p, method="higher")) if len(arr) else 0 for p in (50, 90, 99)}
    return {
        "bin_edges": edges,
        "counts": [int(c) for c in counts],
        "min": low,
        "max": top,
        "mean": round(float(arr.mean()), 2) if len(arr) else 0.0,
        **q,
        "includes_image_tokens": include_images,
        "model_config": origin,
    }
