"""Bytes on the wire and backend.grad_reduce_dtype=bf16: one 2-rank launch of `bench comm`'s worker (tiny preset).

Every scenario computes in fp32, so a bf16 run and its fp32 twin differ only in how gradients are reduced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from toolkit.bench import comm
from toolkit.config import ConfigError, load_config

pytestmark = pytest.mark.multiproc
REPO = Path(__file__).resolve().parent.parent

BACKENDS = {"ddp": ("ddp", ""), "zero2": ("deepspeed", "zero2"), "fsdp": ("fsdp", "")}
SCENARIOS = {
    f"{name}{'_bf16' if reduce == 'bf16' else ''}_fp32compute": (backend, ds, "fp32", reduce)
    for name, (backend, ds) in BACKENDS.items()
    for reduce in ("fp32", "bf16")
} | {"fsdp_keep_gathered_fp32compute": ("fsdp", "", "fp32", "fp32", comm.KEEP_GATHERED)}
STEPS = 3  # recorded steps, after one unrecorded
BF16_REL = 2.0**-8  # bf16 keeps 8 significant bits: each rank's addend and the sum round to 2^-9, together 2^-8


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return comm.launch(SCENARIOS, steps=STEPS, timeout_s=600)


def twin(name: str, reduce: str) -> str:
    base = name.removesuffix("_fp32compute").removesuffix("_bf16")
    return f"{base}{'_bf16' if reduce == 'bf16' else ''}_fp32compute"


@pytest.mark.slow  # one 2-rank launch of 7 scenarios, shared by these tests
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_measured_bytes_equal_the_backends_formula_within_5_percent(ranks, name):
    for rank in ranks:
        row = comm.compare(name, rank[name])
        assert row["vs_formula"] == pytest.approx(1.0, abs=0.05), json.dumps(rank[name], indent=1)
        # The gradient collectives alone are the formula's gradient term to the byte, but for scalar reductions
        # (norms, overflow flags) of a few dozen bytes.
        assert abs(row["grad_MB"] - row["grad_formula_MB"]) * 1e6 < 64


@pytest.mark.slow  # one 2-rank launch of 7 scenarios, shared by these tests
def test_fsdp_keeping_blocks_gathered_halves_their_gathers_and_changes_no_number(ranks):
    """backend.fsdp_reshard_after_forward=false: each block group is gathered once a micro-step instead of twice
    (the formula test above checks the bytes against g (P r + (Pb + Pr) q/N)); the arithmetic is the same, so
    losses and gradient norms equal the resharding run's bit for bit."""
    keep, base = (ranks[0][name] for name in ("fsdp_keep_gathered_fp32compute", "fsdp_fp32compute"))
    assert (keep["losses"], keep["grad_norms"]) == (base["losses"], base["grad_norms"])
    gathered = [sum(n for k, n in r["bytes"].items() if "gather" in k) for r in (keep, base)]
    assert gathered[0] < 0.75 * gathered[1]


@pytest.mark.slow  # one 2-rank launch of 7 scenarios, shared by these tests
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bf16_reduction_halves_the_gradient_bytes_and_nothing_else(ranks, backend):
    fp32, bf16 = (ranks[0][twin(backend, r)] for r in ("fp32", "bf16"))
    grads = {r: comm.compare(twin(backend, r), ranks[0][twin(backend, r)])["grad_MB"] for r in ("fp32", "bf16")}
    assert grads["bf16"] / grads["fp32"] == pytest.approx(0.5, abs=1e-4)
    assert any(k.endswith("bfloat16") for k in bf16["bytes"]) and not any(k.endswith("bfloat16") for k in fp32["bytes"])
    gathers = {r: sum(n for k, n in ranks[0][twin(backend, r)]["bytes"].items() if "gather" in k) for r in grads}
    assert gathers["bf16"] == gathers["fp32"]  # parameters are gathered in the compute dtype either way


@pytest.mark.slow  # one 2-rank launch of 7 scenarios, shared by these tests
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bf16_reduction_trains_within_the_rounding_bound_of_fp32(ranks, backend):
    """bf16 reduction against fp32 reduction, same weights, batches and fp32 compute, over 4 optimizer steps.

    The bound, to first order: a reduced gradient entry is off by at most 2^-8 relative. AdamW divides the
    momentum by the root of the second moment, each off by at most 2^-8 relative, so an update entry is off by at
    most 2 x 2^-8 x lr x |m/sqrt(v)|, and |m/sqrt(v)| <= 1 over the first steps (beta1^2 < beta2); clipping scales
    the whole gradient, which AdamW's ratio cancels. After k updates every weight is within 2^-7 x sum(lr) of its
    fp32 twin, and the loss within sqrt(P) x |grad L|_2 x 2^-7 x sum(lr) (|grad L|_1 <= sqrt(P) |grad L|_2).
    The first step's loss is computed before any reduction: equal bit for bit. Its gradient norm, after the
    reduction, moves by at most 2^-8 x (|g_0| + |g_1|) / |g_0 + g_1| <= 2^-7 relative while the two ranks'
    gradients do not point apart; it must move at all, or bf16 was not used.

    Measured on 2026-12-02 (tiny preset, 4 steps of 2 micro-steps x 64 tokens per rank, loss 6.13 -> 6.12): the
    largest loss difference over steps 2-4 was 3.6e-5 under DDP and 1.4e-5 under ZeRO-2 and FSDP2, against bounds
    of 8.8e-3 (step 2) to 2.4e-2 (step 4); the first step's gradient norm moved by 1.3e-5 to 1.7e-5 relative
    (bound 7.8e-3): the roundings are of both signs and mostly cancel.
    """
    fp32, bf16 = (ranks[0][twin(backend, r)] for r in ("fp32", "bf16"))
    assert bf16["losses"][0] == fp32["losses"][0]
    norm_change = abs(bf16["grad_norms"][0] - fp32["grad_norms"][0]) / fp32["grad_norms"][0]
    assert 0 < norm_change <= 2 * BF16_REL
    params = fp32["params"]
    for k in range(1, len(fp32["losses"])):
        bound = math.sqrt(params) * fp32["grad_norms"][k] * 2 * BF16_REL * sum(fp32["lrs"][:k])
        assert abs(bf16["losses"][k] - fp32["losses"][k]) <= bound, (k, bf16["losses"], fp32["losses"], bound)


def test_single_accepts_bf16_reduction_and_has_nothing_to_reduce():
    """One process reduces nothing: the setting is accepted and the step is bit-identical to fp32's."""
    from toolkit.bench.memory import synthetic_batch
    from toolkit.bench.overhead import toolkit_trainer

    results = {}
    for reduce in ("fp32", "bf16"):
        cfg = load_config(
            "tiny", ["backend.device=cpu", "backend.precision=fp32", f"backend.grad_reduce_dtype={reduce}"]
        )
        cfg.train.max_training_steps = 4
        trainer = toolkit_trainer(cfg, seed=0)
        batch = synthetic_batch(cfg.model, seed=3)
        results[reduce] = [(m["loss"], m["grad_norm"]) for m in (trainer.train_step([batch]) for _ in range(2))]
        trainer.backend.close()
    assert results["bf16"] == results["fp32"]


def test_deepspeed_reduction_dtype_comes_from_the_toolkit_config(tmp_path):
    from toolkit.train.backends.deepspeed import resolve_ds_config

    for reduce in ("fp32", "bf16"):
        cfg = load_config("tiny", ["backend.name=deepspeed", f"backend.grad_reduce_dtype={reduce}"])
        assert resolve_ds_config(cfg, 2)["communication_data_type"] == reduce
    hand_set = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    hand_set["communication_data_type"] = "bf16"
    (tmp_path / "z2.json").write_text(json.dumps(hand_set))
    cfg = load_config("tiny", ["backend.name=deepspeed", f"backend.ds_config={tmp_path / 'z2.json'}"])
    with pytest.raises(ConfigError, match=r"communication_data_type.*backend\.grad_reduce_dtype"):
        resolve_ds_config(cfg, 2)


def test_comm_log_counts_what_each_collective_hands_in_once():
    """Nested wrappers (an engine's around torch's) count once; a list argument counts every tensor in it."""
    log = comm.CommLog()
    calls = []
    inner = log.wrap("all_reduce", lambda tensor, group=None: calls.append(tensor.numel()), "tensor")
    outer = log.wrap("all_reduce", lambda tensor, group=None: inner(tensor), "tensor")
    gather = log.wrap("all_gather", lambda tensor_list, tensor: None, "tensor")
    scatter = log.wrap("reduce_scatter", lambda output, input_list: None, "input_list")
    outer(torch.zeros(10))  # not recording
    with log.record():
        outer(torch.zeros(10))
        gather([torch.zeros(6), torch.zeros(6)], torch.zeros(3, dtype=torch.bfloat16))
        scatter(torch.zeros(3), input_list=[torch.zeros(3), torch.zeros(3)])
    assert calls == [10, 10]
    assert dict(log.bytes) == {
        ("all_reduce", "float32"): 40,
        ("all_gather", "bfloat16"): 6,
        ("reduce_scatter", "float32"): 24,
    }
