"""`bench memory`: parameter + gradient + optimizer bytes per rank under ZeRO 0-3 and FSDP2, against the ZeRO paper.

The ZeRO paper's model of mixed-precision Adam on N data-parallel ranks, Psi parameters, K = 12 bytes of optimizer
state per parameter (fp32 master copy, momentum, variance):

    stage 0: 2Psi params + 2Psi grads + K Psi optimizer        stage 2: 2Psi + (2 + K) Psi / N
    stage 1: 2Psi + 2Psi + K Psi / N                           stage 3: (2 + 2 + K) Psi / N
FSDP2 full sharding is stage 3.

What is counted, per rank, in bf16 mode with 2 micro-steps per optimizer step: after one whole step (so AdamW's
state exists), at the end of the next step's first micro-step (gradients accumulating) and of its last (before
the update); the fuller of the two points is compared. The bytes of every distinct tensor storage the rank holds
are classed as

- params: the module's parameters as the rank keeps them: a ZeRO-3 parameter's partition (`ds_tensor`, plus the
  full tensor while it is gathered or persistent), an FSDP2 parameter's local shard, otherwise the tensor itself;
- grads: the module parameters' `.grad` (local shards for FSDP2), the gradient partitions DeepSpeed keeps in its
  optimizer wrapper (`averaged_gradients`, `grads_in_partition`, `grad_partitions_flat_buffer`, ...) and the
  unsharded gradients FSDP2 accumulates while its reduce-scatter is deferred;
- optimizer: AdamW's state tensors and the fp32 master copies (the tensors AdamW updates that are not module
  parameters; under FSDP2 the fp32 parameter shards are the master copy and count as params).

Storages are counted once however many views point into them, at their full size (flat buffers with their
padding). Everything else this rank allocated since before the model was built (a census of live tensors through
the garbage collector) is reported as `other`: communication buckets, model buffers, the batch. It is not part
of the comparison, since the formula has no term for it. With the shipped configs it is mostly DeepSpeed's
gradient bucket, allocated at its full reduce_bucket_size (5e7 elements in the shipped configs) however small the
model: about 95 MB under zero1.json and 190 MB under zero3.json, whose bucket reduces in fp32 (measured on CPU).

Ranks are launched by torchrun (2 processes, gloo); one launch runs every backend in turn.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor

from toolkit.data.batch import Batch, ModelInputs

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
K_ADAM = 12  # bytes of optimizer state per parameter in mixed-precision Adam: fp32 master + two fp32 moments
# Scenario -> the ZeRO stage it implements. `fsdp` (the default) reduce-scatters every micro-step; `fsdp_defer` is
# backend.fsdp_defer_grad_sync=true, which holds full fp32 gradients between micro-steps (outside the formula).
SCENARIOS = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3, "fsdp_defer": 3}
# Widened tiny preset: ~21M parameters, every weight matrix above ZeRO-3's persistence threshold (1e5 elements).
WIDE_MODEL = {
    "vit_hidden_dim": 384,
    "vit_inter_dim": 1536,
    "vit_n_heads": 6,
    "vit_n_blocks": 4,
    "lm_hidden_dim": 512,
    "lm_inter_dim": 1536,
    "lm_n_heads": 8,
    "lm_n_kv_heads": 4,
    "lm_n_blocks": 4,
    "lm_max_length": 64,
}
# Attributes of DeepSpeed's ZeRO optimizer wrappers that hold gradients (stage 1/2, then stage 3).
DS_GRAD_ATTRS = (
    "averaged_gradients",
    "grads_in_partition",
    "all_grad_tensors",
    "grad_partitions_flat_buffer",
    "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition",
)


def zero_formula(stage: int, psi: int, world: int, k: int = K_ADAM) -> dict[str, float]:
    """The ZeRO paper's bytes per rank for mixed-precision Adam: params, grads, optimizer and their total."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, not {stage}")
    params = 2 * psi / (world if stage == 3 else 1)
    grads = 2 * psi / (world if stage >= 2 else 1)
    optimizer = k * psi / (world if stage >= 1 else 1)
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank; any other tensor unchanged."""
    return t.to_local() if hasattr(t, "to_local") else t


def storage_of(t: torch.Tensor) -> tuple[int, int] | None:
    """(address, bytes) of the memory behind a tensor, None when it holds none (meta, freed or wrapper tensors)."""
    try:
        s = t.untyped_storage()
        key = (s.data_ptr(), s.nbytes())
    except (RuntimeError, NotImplementedError):  # e.g. a storage FSDP2 has released
        return None
    return key if key[0] and key[1] else None


def tensors_in(obj: Any, depth: int = 3) -> Iterator[torch.Tensor]:
    """Tensors inside nested lists, tuples and dicts (and objects with a `.buffer` list, DeepSpeed's buckets)."""
    if torch.is_tensor(obj):
        yield obj
    elif depth > 0 and isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value, depth - 1)
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for value in obj:
            yield from tensors_in(value, depth - 1)
    elif depth > 0 and isinstance(getattr(obj, "buffer", None), list):
        yield from tensors_in(obj.buffer, depth - 1)


def param_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The parameter memory this rank holds, engine by engine (see the module docstring's `params`)."""
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition, and the full tensor only while it is materialised
            yield p.ds_tensor
            if p.data.numel():
                yield p.data
        else:
            yield local(p)


def grad_tensors(module: torch.nn.Module, wrapper: Any, master: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Every gradient tensor this rank holds: on parameters and master copies, and inside DeepSpeed and FSDP2."""
    for p in [*module.parameters(), *master]:
        if p.grad is not None:
            yield local(p.grad)
    for name in DS_GRAD_ATTRS:
        yield from tensors_in(getattr(wrapper, name, None))
    yield from fsdp_unsharded_grads(module)


def fsdp_unsharded_grads(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Gradients FSDP2 keeps unsharded between micro-steps while their reduce-scatter is deferred (fp32 when the
    reduce dtype is fp32), found through its per-module state; nothing for any other engine."""
    for m in module.modules():
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        for fsdp_param in getattr(getattr(state, "_fsdp_param_group", None), "fsdp_params", ()):
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            for grad in (getattr(fsdp_param, "unsharded_accumulated_grad", None), getattr(unsharded, "grad", None)):
                if grad is not None:
                    yield grad


def classify(params: Iterable, grads: Iterable, optimizer: Iterable) -> dict[str, dict[tuple[int, int], None]]:
    """Distinct storages per class; a storage claimed by an earlier class (params, then optimizer) stays there."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, dict[tuple[int, int], None]] = {}
    for name, tensors in (("params", params), ("optimizer", optimizer), ("grads", grads)):
        out[name] = {}
        for t in tensors:
            key = storage_of(t)
            if key is not None and key not in seen:
                seen.add(key)
                out[name][key] = None
    return out


def live_storages() -> dict[tuple[int, int], torch.UntypedStorage]:
    """Every tensor storage reachable from Python objects now, by (address, bytes); holding the returned storages
    keeps them alive, so an address in an earlier census is never reused by a later allocation."""
    gc.collect()
    found = {}
    with warnings.catch_warnings():  # isinstance() on torch's deprecated aliases (torch.distributed.reduce_op) warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and not hasattr(obj, "to_local")]
    # FakeTensors left over from a torch.compile trace in this process hold no memory (and warn when asked).
    tensors = [t for t in tensors if not isinstance(t, FakeTensor)]
    for t in tensors:
        key = storage_of(t)
        if key is not None:
            found[key] = t.untyped_storage()
    return found


def held_bytes(backend: Any, before: dict[tuple[int, int], Any]) -> dict[str, int]:
    """params / grads / optimizer bytes this rank holds (see the module docstring), and `other` new storages."""
    module, optimizer = backend.module, backend.optimizer
    wrapper = getattr(getattr(backend, "engine", None), "optimizer", None)  # DeepSpeed's ZeRO optimizer, if any
    module_ids = {id(p) for p in module.parameters()}
    # The tensors AdamW updates: its groups' params, and its state's keys (ZeRO-3 empties the groups between steps).
    updated = {id(p): p for p in [*(p for g in optimizer.param_groups for p in g["params"]), *optimizer.state]}
    master = [local(p) for i, p in updated.items() if i not in module_ids]
    state = [local(t) for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    # Lists, not generators: the census below must find these tensors alive (a `.grad` read from C++ included).
    params, grads = list(param_tensors(module)), list(grad_tensors(module, wrapper, master))
    classes = classify(params, grads, [*master, *state])
    counted = {key for c in classes.values() for key in c}
    census = live_storages()
    held = {name: sum(n for _, n in c) for name, c in classes.items()}
    held["other"] = sum(key[1] for key in census if key not in before and key not in counted)
    missing = [key for key in counted if key not in census]
    if missing:
        raise RuntimeError(f"{len(missing)} counted storages are not in the live census; the census misses tensors")
    return held


def bench_config(name: str) -> Any:
    """The widened tiny preset under scenario `name`, bf16, CPU, one packed row of 64 tokens per micro-step."""
    from toolkit.config import load_config

    if name.startswith("fsdp"):
        backend = ["backend.name=fsdp", f"backend.fsdp_defer_grad_sync={name == 'fsdp_defer'}"]
    else:
        backend = ["backend.name=deepspeed", f"backend.ds_config=ds_configs/{name}.json"]
    overrides = [f"model.{k}={v}" for k, v in WIDE_MODEL.items()]
    overrides += [*backend, "backend.precision=bf16", "backend.device=cpu", "train.batch_size=1"]
    overrides += ["train.gradient_accumulation_steps=2"]
    return load_config("tiny", overrides)


def synthetic_batch(cfg: Any, seed: int) -> Batch:
    """One row: an image (one tile) spliced after the first token, then text with random targets."""
    gen = torch.Generator().manual_seed(seed)
    seq, n_image = cfg.lm_max_length, cfg.mp_image_token_length
    ids = torch.randint(0, cfg.lm_base_vocab_size, (1, seq), generator=gen)
    ids[0, 1 : 1 + n_image] = cfg.lm_base_vocab_size + list(cfg.vlm_extra_tokens).index("image_token")
    labels = torch.randint(0, cfg.lm_base_vocab_size, (1, seq), generator=gen)
    labels[0, : 1 + n_image] = -100
    side = cfg.vit_img_size
    return Batch.of(ModelInputs(ids, labels, torch.arange(seq)[None], torch.rand(1, 3, side, side, generator=gen)))


def measure(name: str, rank: int) -> dict[str, Any]:
    """Set up backend `name`, take one step, run the next step's forward/backward, count, finish the step."""
    from toolkit import dist
    from toolkit.model import VisionLanguageModel
    from toolkit.train.backends import build_backend
    from toolkit.train.optim import param_groups
    from toolkit.train.schedule import schedule_from_config
    from toolkit.train.trainer import Trainer

    before = live_storages()
    cfg = bench_config(name)
    dist.seed_everything(0)
    model = VisionLanguageModel(cfg.model)
    psi = sum(p.numel() for p in model.parameters() if p.requires_grad)
    backend = build_backend(cfg, device=torch.device("cpu"))
    backend.setup(model, param_groups(model, cfg.train), schedule_from_config(cfg.train))
    batch = synthetic_batch(cfg.model, seed=rank)
    Trainer(backend, cfg).train_step([batch, batch])  # step 1 creates AdamW's state
    scale = 1.0 / (2 * WORLD * batch.stats.targets)
    held = {}
    for point in ("accumulating", "boundary"):  # after micro-step 1 of 2, then after the last one (before the update)
        backend.forward_backward(batch, scale)
        held[point] = held_bytes(backend, before)
    state_numel = backend.optimizer_state_numel()
    backend.step()
    backend.close()
    return {"backend": name, "rank": rank, "psi": psi, "stage": SCENARIOS[name], "state_numel": state_numel, **held}


def worker(out: Path, scenarios: list[str]) -> None:
    """One rank of the launch: every scenario in turn, results to OUT/rankR.json."""
    from toolkit import dist

    env = dist.dist_env()
    dist.init_distributed(torch.device("cpu"), env)
    results = []
    for name in scenarios:
        results.append(measure(name, env.rank))
        gc.collect()
    (out / f"rank{env.rank}.json").write_text(json.dumps(results))
    dist.destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenarios: Iterable[str] = tuple(SCENARIOS), *, timeout_s: int = 300) -> list[dict[str, Any]]:
    """Run the scenarios on WORLD ranks (torchrun, gloo, one thread each); every rank's results, rank-major."""
    scenarios = list(scenarios)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown memory scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1"]
        cmd += [f"--master_port={_free_port()}", "-m", "toolkit.bench.memory", "--worker", tmp, *scenarios]
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"memory ranks failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        return [r for rank in range(WORLD) for r in json.loads((Path(tmp) / f"rank{rank}.json").read_text())]


def compare(result: dict[str, Any], world: int = WORLD) -> dict[str, Any]:
    """One rank's counts at its fuller point next to its stage's formula, in bytes per parameter and as a ratio."""
    psi = result["psi"]
    formula = zero_formula(result["stage"], psi, world)
    totals = {p: sum(result[p][c] for c in ("params", "grads", "optimizer")) for p in ("accumulating", "boundary")}
    point = max(totals, key=totals.__getitem__)
    held = result[point]
    return {
        "backend": result["backend"],
        "rank": result["rank"],
        "at": point,
        "params_B/psi": held["params"] / psi,
        "grads_B/psi": held["grads"] / psi,
        "optim_B/psi": held["optimizer"] / psi,
        "total_B/psi": totals[point] / psi,
        "formula_B/psi": formula["total"] / psi,
        "vs_formula": totals[point] / formula["total"],
        "other_MB": held["other"] / 2**20,
    }


def run(scenarios: Iterable[str] = tuple(SCENARIOS), timeout_s: int = 300) -> dict:
    """One 2-rank launch over the scenarios; a row per (scenario, rank), the worst ratio per scenario as headline."""
    results = launch(scenarios, timeout_s=timeout_s)
    rows = sorted((compare(r) for r in results), key=lambda r: (list(SCENARIOS).index(r["backend"]), r["rank"]))
    headline = {}
    for row in rows:
        worst = headline.get(f"{row['backend']}_vs_formula", 1.0)
        headline[f"{row['backend']}_vs_formula"] = max(worst, row["vs_formula"], key=lambda v: abs(v - 1))
    return {
        "name": "memory",
        "rows": rows,
        "headline": headline,
        "config": {"world": WORLD, "psi": results[0]["psi"], "k": K_ADAM, "precision": "bf16", "model": WIDE_MODEL},
    }


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "--worker":
        sys.exit(
            "usage: python -m toolkit.bench.memory --worker OUT SCENARIO... (started by launch(); use `bench memory`)"
        )
    worker(Path(sys.argv[2]), sys.argv[3:])
