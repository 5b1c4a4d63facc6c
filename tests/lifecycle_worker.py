"""Launched by tests/test_lifecycle.py (torchrun or plain python). Modes:

live RUN OUT       restore RUN's latest checkpoint on this world size, run the first held-out batch through the
                   live (sharded) model, and save its logits and token-mean loss to OUT (rank 0)
kill-at RUN STEP   train with RUN's config and SIGKILL this process in the middle of writing checkpoint STEP
init OUT CONFIG...  for each run config (YAML with train.init_from) and each backend (single on 1 rank; fsdp and
                   zero3 on more): set the run up as `train` does and save the live model's logits on the
                   config's probe batch (CONFIG.probe.pt) before any step, to OUT (rank 0)
kill-async-at RUN STEP
                   the same with train.async_checkpoint (single backend): the background writer thread is
                   SIGKILLed half-way through writing checkpoint STEP's model file, while training goes on
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from toolkit import dist
from toolkit.config import load_config
from toolkit.data.tokenizer import load_tokenizer
from toolkit.train import checkpoint as ckpt
from toolkit.train import run as run_mod
from toolkit.train.backends import build_backend


def live(run_dir: str, out: str) -> None:
    cfg = load_config(str(Path(run_dir) / "config.yaml"), [f"train.run_dir={run_dir}"])
    backend = build_backend(cfg)
    tokenizer = load_tokenizer(cfg.model)
    run_mod._build(cfg, backend, tokenizer)
    ckpt.restore_checkpoint(ckpt.RunDir(run_dir).latest(), backend=backend, loader=None)
    from toolkit.data.loader import build_loader

    probe = next(iter(build_loader(cfg, rank=0, world=1, tokenizer=tokenizer, split="val")))
    module = backend.module
    module.eval()
    with torch.no_grad():
        out_ = module(**probe.inputs.to(backend.device).as_kwargs(), return_logits=True)
    if backend.env.is_main:
        torch.save({"logits": out_.logits.float().cpu(), "loss": out_.loss.double().cpu(), "probe": probe}, out)
    dist.barrier()
    backend.close()
    dist.destroy_distributed()


def kill_at(run_dir: str, step: str, overrides: list[str]) -> None:
    real = ckpt.write_rank_state

    def dying(path, rank, loader_state):
        real(path, rank, loader_state)  # backend shards and this rank's state are on disk, trainer.json is not
        if path.name == f"step_{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt.write_rank_state = dying
    run_mod.run_training(load_config("tiny", [*overrides, f"train.run_dir={run_dir}"]))


INIT_BACKENDS = {
    "single": ["backend.name=single"],
    "fsdp": ["backend.name=fsdp"],
    "zero3": ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json"],
}


def init(out: str, *configs: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    results = {}
    for config in configs:
        probe = torch.load(f"{config}.probe.pt", weights_only=False)
        for name in ("single",) if world == 1 else ("fsdp", "zero3"):
            cfg = load_config(config, INIT_BACKENDS[name])
            backend = build_backend(cfg)
            run_mod._build(cfg, backend, load_tokenizer(cfg.model))
            module = backend.module
            module.eval()
            with torch.no_grad():
                logits = module(**probe.inputs.to(backend.device).as_kwargs(), return_logits=True).logits
            results[f"{Path(config).stem}/{name}"] = logits.float().cpu()
            backend.close()
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_distributed()


def kill_async_at(run_dir: str, step: str, overrides: list[str]) -> None:
    from toolkit.train.backends import single

    real = single._write_state

    def dying(path, state):
        if path.parent.name != f"step_{step}":
            return real(path, state)
        path.mkdir(parents=True, exist_ok=True)
        with open(path / single.STATE_FILE, "wb") as fh:
            fh.write(b"half a state file")
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    single._write_state = dying
    cfg = load_config("tiny", [*overrides, f"train.run_dir={run_dir}", "train.async_checkpoint=true"])
    run_mod.run_training(cfg)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "live":
        live(*args)
    elif mode == "init":
        init(*args)
    elif mode == "kill-async-at":
        kill_async_at(args[0], args[1], args[2:])
    else:
        kill_at(args[0], args[1], args[2:])
