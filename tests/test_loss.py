"""The chunked output head + cross-entropy (issue 15): the dense loss's value and gradients, no (B, S, V) logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_model_config
from toolkit.model import VisionLanguageModel
from toolkit.model.loss import dense_cross_entropy, linear_cross_entropy

V, D = 97, 16


def case(seed: int, rows: int = 3, seq: int = 40, ignore: float = 0.4) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq, D, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(V, D, generator=gen).mul_(0.3).requires_grad_()
    labels = torch.randint(0, V, (rows, seq), generator=gen)
    labels[torch.rand(rows, seq, generator=gen) < ignore] = -100
    return hidden, weight, labels


def dense(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Written out independently: full logits, fp32 log-softmax, sum over labels != -100."""
    logits = (hidden @ weight.T).float().reshape(-1, V)
    keep = labels.reshape(-1) != -100
    logp = torch.log_softmax(logits[keep], dim=-1)
    return -logp.gather(1, labels.reshape(-1)[keep][:, None]).sum()


@pytest.mark.parametrize(("chunk_rows", "ignore"), [(7, 0.4), (1, 0.0), (1000, 0.4), (5, 1.0)])
def test_chunked_loss_and_gradients_equal_the_dense_ones_in_fp32(chunk_rows: int, ignore: float) -> None:
    for seed in range(3):
        hidden, weight, labels = case(seed, ignore=ignore)
        want = dense(hidden, weight, labels)
        want_grads = torch.autograd.grad(want, (hidden, weight))
        got = linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
        got_grads = torch.autograd.grad(got, (hidden, weight))
        assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-6)
        for g, w in zip(got_grads, want_grads, strict=True):
            assert (g - w).abs().max().item() <= 1e-6 * max(w.abs().max().item(), 1.0)
    assert dense_cross_entropy(hidden @ weight.T, labels).item() == pytest.approx(want.item(), rel=1e-6, abs=1e-6)


def test_chunked_loss_in_bf16_is_within_its_stated_bound_of_the_dense_bf16_loss() -> None:
    """Under bf16 autocast both paths run the head's matmul in bf16 and the softmax in fp32; they differ only in
    how the matmul is blocked, so the loss agrees within 1e-3 relative (README) and gradients within 2e-2."""
    hidden, weight, labels = case(0, rows=4, seq=128, ignore=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = dense_cross_entropy(F.linear(hidden, weight), labels)
        got = linear_cross_entropy(hidden, weight, labels, chunk_rows=64)
    assert got.item() == pytest.approx(want.item(), rel=1e-3)
    for g, w in zip(
        torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight)), strict=True
    ):
        assert (g.float() - w.float()).abs().max().item() <= 2e-2 * w.float().abs().max().item()


def _model_and_batch() -> tuple[VisionLanguageModel, dict[str, torch.Tensor]]:
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.lm_base_vocab_size, (2, 48), generator=gen)
    ids[0, 1 : 1 + cfg.mp_image_token_length] = model.image_token_id
    labels = torch.roll(ids, -1, dims=1)
    labels[:, :5] = -100
    pixels = torch.rand(1, 3, cfg.vit_img_size, cfg.vit_img_size, generator=gen)
    return model, {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def test_the_model_trains_on_the_chunked_loss_exactly_as_on_the_dense_one() -> None:
    model, batch = _model_and_batch()
    model.decoder.head.chunked = False
    dense_out = model(**batch)
    dense_out.loss_sum.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.decoder.head.chunked = True
    out = model(**batch)
    out.loss_sum.backward()
    assert out.logits is None and out.loss_sum.item() == pytest.approx(dense_out.loss_sum.item(), rel=1e-6)
    for name, p in model.named_parameters():
        assert (p.grad - want[name]).abs().max().item() <= 1e-6 * max(want[name].abs().max().item(), 1e-3), name


def test_the_training_forward_saves_no_logits_for_backward() -> None:
    """Every tensor autograd keeps for the backward pass is recorded: with the chunked loss none has the vocabulary
    as its last dimension (the dense path keeps the (B, S, V) logits and their log-softmax); the head's own (V, D)
    weight is the one tensor with V in it."""
    model, batch = _model_and_batch()
    vocab = model.cfg.lm_vocab_size

    def saved_shapes(chunked: bool) -> list[tuple[int, ...]]:
        shapes = []
        model.decoder.head.chunked = chunked
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            model(**batch).loss_sum.backward()
        return shapes

    assert any(s[-1] == vocab and len(s) >= 2 and s[0] > 1 for s in saved_shapes(False) if s)  # the control
    assert [s for s in saved_shapes(True) if s and s[-1] == vocab] == []


def test_host_found_positions_give_the_same_loss_and_gradients_bit_for_bit() -> None:
    """`ModelInputs.with_indices` (what every backend feeds the model) splices image features by index and picks the
    loss's rows by index instead of counting them on the device; nothing else may change: the loss and every
    gradient are bit-identical to the masked path's."""
    from toolkit.data.batch import ModelInputs

    model, batch = _model_and_batch()
    inputs = ModelInputs(batch["input_ids"], batch["labels"], torch.arange(48).repeat(2, 1), batch["pixel_values"])
    results = []
    for kwargs in (inputs.as_kwargs(), inputs.with_indices(model.image_token_id).as_kwargs()):
        model.zero_grad()
        out = model(**kwargs)
        out.loss_sum.backward()
        results.append((out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (loss_ix, grads_ix) = results
    assert torch.equal(loss, loss_ix)
    assert all(torch.equal(grads[n], grads_ix[n]) for n in grads)
    indexed = inputs.with_indices(model.image_token_id)
    assert indexed.image_index.tolist() == list(range(1, 1 + model.cfg.mp_image_token_length))
    assert indexed.target_index.tolist() == (batch["labels"].flatten() != -100).nonzero().flatten().tolist()


def test_host_found_image_positions_that_disagree_with_the_tiles_are_refused() -> None:
    from toolkit.data.batch import ModelInputs

    model, batch = _model_and_batch()
    two_tiles = batch["pixel_values"].repeat(2, 1, 1, 1)
    inputs = ModelInputs(batch["input_ids"], batch["labels"], torch.arange(48).repeat(2, 1), two_tiles)
    with pytest.raises(ValueError, match="image tokens but pixel_values give 2 tiles"):
        model(**inputs.with_indices(model.image_token_id).as_kwargs())
