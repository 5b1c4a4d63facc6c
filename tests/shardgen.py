"""Test helper: small tar shards in the toolkit's format, deliberately broken ones, and a tiny tokenizer.

Every text names its sample's key, so a test can check that the tokens it got back belong to the key it was told.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from toolkit.config import Config

FORMAT = "nanovlm-scale-shards/1"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(out: Path, vocab_size: int = 320) -> tuple[str, int]:
    """A byte-level BPE tokenizer trained in milliseconds; returns (folder, base vocabulary size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [f"user what is in picture s{i:03d}x{j:03d}? assistant it is a shape" for i in range(9) for j in range(30)]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    fast.save_pretrained(str(out))
    return str(out), len(fast)


def image_bytes(w: int, h: int, *, fmt: str = "PNG", seed: int = 0) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    img.putpixel((rng.randrange(w), rng.randrange(h)), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def corrupt_jpeg() -> bytes:
    """Bytes named .jpg that no decoder accepts (fails on the header)."""
    return b"\xff\xd8\xff\xe0 this is not a jpeg at all" + bytes(range(200))


def truncated_jpeg(seed: int = 0) -> bytes:
    """A JPEG whose header is fine but whose scan data is cut: fails only on the full decode."""
    rng = random.Random(seed)
    img = Image.new("RGB", (48, 40))
    img.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(48 * 40)])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    return data[: len(data) // 2]


@dataclass
class Spec:
    """One sample to write: its key, the JSON object (or raw bytes) and its image members."""

    key: str
    meta: dict | bytes | None
    images: list[tuple[str, bytes]] = field(default_factory=list)


def good(key: str, *, images: int = 1, seed: int = 0, size: tuple[int, int] = (48, 40), turns: int = 1) -> Spec:
    texts = [{"user": f"what is in picture {key}?", "assistant": f"it is {key}"} for _ in range(turns)]
    imgs = [(f"img{i}.png", image_bytes(*size, seed=seed + i)) for i in range(images)]
    return Spec(key, {"texts": texts, "source": "shardgen"}, imgs)


def write_shard(
    path: Path, samples: list[Spec], *, truncate_in: str | None = None, cut_after: str | None = None
) -> None:
    """Write a tar. `truncate_in=KEY` cuts the file in the middle of that sample's last member; `cut_after=KEY`
    ends it right after that sample's last member, without the end-of-archive blocks."""
    cut = None
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for spec in samples:
            meta = spec.meta if isinstance(spec.meta, bytes) else json.dumps(spec.meta).encode()
            members = spec.images if spec.meta is None else [("json", meta), *spec.images]  # None: no KEY.json
            for ext, data in members:
                info = tarfile.TarInfo(f"{spec.key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                if spec.key == truncate_in:
                    start = tar.offset - len(data) - (-len(data) % 512)
                    cut = start + len(data) // 2
                if spec.key == cut_after:
                    cut = tar.offset
    if cut is not None:
        path.write_bytes(path.read_bytes()[:cut])


def write_manifest(folder: Path, shards: dict[str, int], *, complete: bool = True) -> None:
    entries = [{"name": n, "samples": c, "bytes": (folder / n).stat().st_size} for n, c in shards.items()]
    total = sum(shards.values())
    manifest = {"format": FORMAT, "shards": entries, "samples": total, "skipped": {}, "complete": complete}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def make_dataset(
    folder: Path, *, shards: int, per_shard: int, prefix: str = "s", images: int = 1, manifest: bool = True
) -> list[str]:
    """`shards` good shards of `per_shard` samples each; returns every key written."""
    folder.mkdir(parents=True, exist_ok=True)
    keys, counts = [], {}
    for s in range(shards):
        specs = [good(f"{prefix}{s:03d}x{i:03d}", images=images, seed=s * 1000 + i) for i in range(per_shard)]
        name = f"shard-{s:06d}.tar"
        write_shard(folder / name, specs)
        counts[name] = per_shard
        keys += [spec.key for spec in specs]
    if manifest:
        write_manifest(folder, counts)
    return keys


def tiny_config(tokenizer: tuple[str, int], train_shards: object, **sections: dict) -> Config:
    """The tiny test model over `train_shards`; `sections={'data': {...}, 'train': {...}}` override fields."""
    from conftest import tiny_model_config

    path, base = tokenizer
    cfg = Config()
    cfg.model = tiny_model_config(lm_base_vocab_size=base, lm_vocab_size=base + 66, tokenizer=path)
    cfg.data.train_shards = train_shards
    cfg.data.num_workers = 0
    cfg.data.shuffle_buffer = 8
    cfg.data.buffer_packs = 4
    cfg.train.batch_size = 2
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg.validate()


def batch_keys(batches: list[dict]) -> list[str]:
    """Sample keys ('shard:key' -> 'key') in the order the batches hold them."""
    return [k.rsplit(":", 1)[1] for b in batches for row in b.stats.keys for k in row]
