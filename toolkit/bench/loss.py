"""`bench loss`: peak host memory that the training loss adds for one 4096-token row at nanovlm-450m's vocabulary.

The model is the 450m preset's decoder width and 49,218-token vocabulary with one decoder block (the loss does not
depend on depth), fp32 on the CPU. Each variant runs in a fresh process, so the peak resident memory the kernel
reports (ru_maxrss) is that variant's alone: one warm-up forward + backward on a short row (parameters, gradients
and allocator pools exist), then the peak is read, then one forward + backward on a full row, then the peak again.
The difference is what that row added. Variants: no loss at all (the decoder's output summed, the baseline of
activations), the dense head + fp32 cross-entropy, and the chunked one (train.chunked_loss, the default); the
loss's own share is each minus the baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

VARIANTS = ("no_loss", "dense", "chunked")


def measure(variant: str, seq: int) -> dict[str, float]:
    """In this process: the peak resident memory a full row's forward + backward adds (MB)."""
    import resource

    import torch

    from toolkit.config import load_config
    from toolkit.model import VisionLanguageModel

    torch.set_num_threads(1)
    cfg = load_config("nanovlm-450m", ["model.lm_n_blocks=1", "model.vit_n_blocks=1", "backend.device=cpu"]).model
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).train()
    model.decoder.head.chunked = variant == "chunked"

    def step(length: int) -> None:
        ids = torch.randint(0, cfg.lm_base_vocab_size, (1, length))
        pos = (torch.arange(length) % 512)[None]  # packed 512-token samples: the attention stays small
        if variant == "no_loss":
            _no_loss(model, ids, pos)
        else:
            model(input_ids=ids, labels=torch.roll(ids, -1, 1), position_ids=pos).loss_sum.backward()

    step(512)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step(seq)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"added_MB": after - before}


def _no_loss(model: Any, ids: Any, pos: Any) -> None:
    """The decoder's activations without any head or loss: the baseline the loss is measured against."""
    x = model.embed(ids, None)
    hidden, _ = model.decoder(x, position_ids=pos)
    hidden.sum().backward()


def run(seq: int = 4096) -> dict[str, Any]:
    added = {}
    for variant in VARIANTS:
        code = f"import json; from toolkit.bench.loss import measure; print(json.dumps(measure({variant!r}, {seq})))"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=900)
        added[variant] = json.loads(done.stdout.strip().splitlines()[-1])["added_MB"]
    base = added["no_loss"]
    rows = [
        {"variant": v, "row_adds_MB": added[v], "loss_adds_MB": added[v] - base if v != "no_loss" else 0.0}
        for v in VARIANTS
    ]
    headline = {
        "dense_loss_MB": added["dense"] - base,
        "chunked_loss_MB": added["chunked"] - base,
        "chunked_vs_dense": (added["chunked"] - base) / max(added["dense"] - base, 1e-9),
    }
    return {"name": "loss", "rows": rows, "headline": headline, "config": {"seq": seq, "preset": "nanovlm-450m"}}
