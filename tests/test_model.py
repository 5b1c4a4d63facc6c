"""Model behaviour beyond the fixture: packed samples stay apart, the KV cache is exact, sampling filters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_model_config
from toolkit.model import VisionLanguageModel
from toolkit.model.attention import plan_attention
from toolkit.model.vlm import sample_next


def _sample(cfg, n_text: int, n_tiles: int, gen: torch.Generator):
    """A sample with n_tiles tiles of image tokens at its start, then n_text text tokens."""
    image_id = cfg.lm_base_vocab_size
    text = torch.randint(0, cfg.lm_base_vocab_size, (n_text,), generator=gen)
    ids = torch.cat([torch.full((n_tiles * cfg.mp_image_token_length,), image_id), text])
    tiles = torch.rand(n_tiles, 3, cfg.vit_img_size, cfg.vit_img_size, generator=gen)
    return ids, tiles


@pytest.fixture
def model():
    cfg = tiny_model_config()
    return VisionLanguageModel(cfg).eval()


def _packed_row(samples):
    ids = torch.cat([s[0] for s in samples])[None]
    pos = torch.cat([torch.arange(len(s[0])) for s in samples])[None]
    tiles = torch.cat([s[1] for s in samples])
    return ids, pos, tiles


def test_three_packed_samples_equal_each_alone(model):
    gen = torch.Generator().manual_seed(1)
    samples = [_sample(model.cfg, 11, 2, gen), _sample(model.cfg, 23, 0, gen), _sample(model.cfg, 7, 1, gen)]
    ids, pos, tiles = _packed_row(samples)
    with torch.no_grad():
        packed = model(input_ids=ids, pixel_values=tiles, position_ids=pos).logits[0]
        start = 0
        for s_ids, s_tiles in samples:
            alone = model(input_ids=s_ids[None], pixel_values=s_tiles if len(s_tiles) else None).logits[0]
            assert (packed[start : start + len(s_ids)] - alone).abs().max().item() <= 1e-4
            start += len(s_ids)


def test_no_attention_across_samples(model):
    """Changing every token of the first sample must leave the second sample's logits bit-identical."""
    gen = torch.Generator().manual_seed(2)
    a, b = _sample(model.cfg, 15, 1, gen), _sample(model.cfg, 12, 1, gen)
    a2 = (torch.where(a[0] == model.image_token_id, a[0], (a[0] + 7) % model.cfg.lm_base_vocab_size), a[1] * 0.5)
    outs = []
    for first in (a, a2):
        ids, pos, tiles = _packed_row([first, b])
        with torch.no_grad():
            outs.append(model(input_ids=ids, pixel_values=tiles, position_ids=pos).logits[0, len(a[0]) :])
    assert torch.equal(outs[0], outs[1])
    # And without the position restart the same edit does leak: the check above can fail.
    ids, _, tiles = _packed_row([a, b])
    ids2, _, tiles2 = _packed_row([a2, b])
    with torch.no_grad():
        leak = model(input_ids=ids, pixel_values=tiles).logits[0, len(a[0]) :]
        leak2 = model(input_ids=ids2, pixel_values=tiles2).logits[0, len(a[0]) :]
    assert not torch.allclose(leak, leak2)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_document_mask_equals_dense(model):
    """The kernel CUDA picks (FlexAttention, run eagerly here) against the SDPA dense-mask reference."""
    gen = torch.Generator().manual_seed(3)
    ids, pos, tiles = _packed_row([_sample(model.cfg, 40, 1, gen), _sample(model.cfg, 60, 2, gen)])
    pad = 128 - ids.shape[1]
    ids = torch.cat([ids, torch.zeros(1, pad, dtype=torch.long)], 1)
    pos = torch.cat([pos, torch.arange(pad)[None]], 1)
    with torch.no_grad():
        model.decoder.attention_kernel = "dense"
        dense = model(input_ids=ids, pixel_values=tiles, position_ids=pos).logits
        model.decoder.attention_kernel = "flex"
        flex = model(input_ids=ids, pixel_values=tiles, position_ids=pos).logits
    plan = plan_attention(
        q_len=128,
        kv_len=128,
        position_ids=pos,
        attention_mask=None,
        device=pos.device,
        dtype=torch.float32,
        kernel="flex",
    )
    assert plan.kind == "flex" and plan.mask is None  # no dense S x S mask built
    assert (dense - flex).abs().max().item() <= 1e-4


def _segment_attention(q, k, v, cu, longest, causal: bool):
    """A varlen kernel's meaning, spelled out: each [cu[i], cu[i+1]) span of the flat batch attends alone."""
    assert causal and cu.dtype == torch.int32 and int(cu[-1]) == q.shape[0]
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert 0 < b - a <= longest
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (heads, len, hd)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True).transpose(0, 1)
    return out


def _torch_210(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    assert k.shape[1] == q.shape[1], "torch 2.10's varlen_attn has no GQA: key/value heads must be repeated"
    return _segment_attention(q, k, v, cu_q, max_q, is_causal)


def _torch_211(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    assert k.shape[1] == q.shape[1], "no enable_gqa: key/value heads must be repeated"
    return _segment_attention(q, k, v, cu_q, max_q, window_size == (-1, 0))


def _torch_212(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    assert enable_gqa and k.shape[1] < q.shape[1], "GQA's heads go in unrepeated"
    return _segment_attention(q, k, v, cu_q, max_q, window_size == (-1, 0))


@pytest.mark.parametrize("stand_in", [_torch_210, _torch_211, _torch_212])
def test_torch_varlen_path_equals_dense_under_each_signature(model, monkeypatch, stand_in):
    """torch's varlen_attn only runs on CUDA; a stand-in with each release's signature checks what we pass it
    (flattened layout, sample boundaries, causality, GQA heads). The GPU test runs the real kernel."""
    from toolkit.model import attention

    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)
    monkeypatch.setattr(attention, "torch_varlen_attn", stand_in)
    monkeypatch.setattr(attention, "TORCH_VARLEN_OPTIONS", attention.varlen_options(stand_in))
    gen = torch.Generator().manual_seed(5)
    rows = [[_sample(model.cfg, 30, 1, gen), _sample(model.cfg, 9, 0, gen)], [_sample(model.cfg, 50, 2, gen)]]
    width = 96
    ids, pos, tiles = [], [], []
    for row in rows:  # two rows, each padded to `width` with a tail segment of its own
        r_ids, r_pos, r_tiles = _packed_row(row)
        pad = width - r_ids.shape[1]
        ids.append(torch.cat([r_ids, torch.zeros(1, pad, dtype=torch.long)], 1))
        pos.append(torch.cat([r_pos, torch.arange(pad)[None]], 1))
        tiles.append(r_tiles)
    ids, pos, tiles = torch.cat(ids), torch.cat(pos), torch.cat(tiles)
    with torch.no_grad():
        model.decoder.attention_kernel = "dense"
        dense = model(input_ids=ids, pixel_values=tiles, position_ids=pos).logits
        model.decoder.attention_kernel = "varlen"
        varlen = model(input_ids=ids, pixel_values=tiles, position_ids=pos).logits
    assert (dense - varlen).abs().max().item() <= 1e-4


def test_forced_varlen_is_refused_where_it_cannot_run(monkeypatch):
    from toolkit.errors import UserError
    from toolkit.model import attention

    with pytest.raises(UserError, match="CUDA only"):
        attention.check_kernel("varlen", torch.device("cpu"), 64)
    monkeypatch.setattr(attention, "flash_attn_varlen_func", None)
    monkeypatch.setattr(attention, "torch_varlen_attn", _torch_212)
    attention.check_kernel("varlen", torch.device("cuda"), 64)
    with pytest.raises(UserError, match="lm_dropout=0"):  # torch's kernel has no dropout
        attention.check_kernel("varlen", torch.device("cuda"), 64, dropout=0.1)
    with pytest.raises(UserError, match="multiple of 8"):
        attention.check_kernel("varlen", torch.device("cuda"), 12)
    # auto: torch's varlen in bf16 without dropout, FlexAttention with dropout or in fp32
    assert attention.choose_kernel(torch.device("cuda"), torch.bfloat16, packed=True, cached=False) == "varlen"
    assert attention.choose_kernel(torch.device("cuda"), torch.bfloat16, True, False, dropout=0.1) == "flex"
    assert attention.choose_kernel(torch.device("cuda"), torch.float32, packed=True, cached=False) == "flex"
    assert attention.choose_kernel(torch.device("cpu"), torch.float32, packed=True, cached=False) == "dense"
    # FlexAttention's Triton template refuses heads under 16 wide (the tiny preset's are 12): the dense mask then
    assert attention.choose_kernel(torch.device("cuda"), torch.float32, True, False, head_dim=12) == "dense"


@pytest.mark.parametrize("extra_text", [0, 6])
def test_generation_with_kv_cache_equals_without(model, extra_text):
    gen = torch.Generator().manual_seed(4)
    ids, tiles = _sample(model.cfg, 9, 2, gen)
    ids2, tiles2 = _sample(model.cfg, 9 + extra_text, 1, gen)
    # Two prompts of different length, left-padded to one batch.
    n = max(len(ids), len(ids2))
    rows, masks = [], []
    for x in (ids, ids2):
        rows.append(torch.cat([torch.zeros(n - len(x), dtype=torch.long), x]))
        masks.append(torch.cat([torch.zeros(n - len(x), dtype=torch.long), torch.ones(len(x), dtype=torch.long)]))
    input_ids, mask, pixels = torch.stack(rows), torch.stack(masks), torch.cat([tiles, tiles2])
    cached = model.generate(input_ids, pixels, mask, max_new_tokens=8)
    uncached = model.generate(input_ids, pixels, mask, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, uncached)
    # A left-padded prompt decodes exactly as the same prompt alone.
    alone = model.generate(ids2[None], tiles2, max_new_tokens=8)
    assert torch.equal(cached[1], alone[0])


def test_generation_stops_at_eos(model):
    gen = torch.Generator().manual_seed(5)
    ids, tiles = _sample(model.cfg, 9, 1, gen)
    free = model.generate(ids[None], tiles, max_new_tokens=6)
    eos = int(free[0, 2])
    stopped = model.generate(ids[None], tiles, max_new_tokens=6, eos_token_id=eos)
    first = free[0].tolist().index(eos)
    assert stopped[0].tolist() == free[0, : first + 1].tolist()


def test_top_k_top_p_sampling_keeps_only_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {
        int(sample_next(logits, greedy=False, top_k=3, top_p=0.7, temperature=1.0, generator=gen)) for _ in range(300)
    }
    assert draws == {0, 1}  # top_p 0.7 keeps 0.5 + 0.3; top_k would also allow token 2
    draws = {
        int(sample_next(logits, greedy=False, top_k=3, top_p=1.0, temperature=1.0, generator=gen)) for _ in range(300)
    }
    assert draws == {0, 1, 2}


def test_image_token_count_mismatch_is_a_clear_error(model):
    ids = torch.full((1, 8), model.image_token_id)
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=ids, pixel_values=torch.rand(1, 3, 32, 32))


def test_text_only_training_step_still_reaches_the_vision_encoder():
    """ZeRO-3 / FSDP need every rank to run every module: the dummy tile gives ViT params a (zero) gradient."""
    model = VisionLanguageModel(tiny_model_config()).train()
    ids = torch.randint(0, 300, (2, 16))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in model.vision_encoder.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("side", [32, 36])  # a whole number of patches, and a ragged edge the conv drops too
def test_patch_matmul_equals_the_convolution_it_replaces(side):
    from toolkit.model.vision import PatchConv

    torch.manual_seed(0)
    conv = PatchConv(3, 48, kernel_size=8, stride=8)
    pixels = torch.randn(5, 3, side, side)
    reference = F.conv2d(pixels, conv.weight, conv.bias, stride=8)
    ours = conv(pixels)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-5
    assert list(conv.state_dict()) == ["weight", "bias"]  # nanoVLM's patch_embedding.conv.* keys
