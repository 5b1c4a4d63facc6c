"""Training backends: `single`, `ddp`, `deepspeed` (ZeRO 0-3), `fsdp` (FSDP2). See base.py for the interface.

`build_backend` only reads and checks the config (including the DeepSpeed JSON), so a wrong backend name or a
conflicting ds_configs value fails before any process group, model or data loader exists. Each engine's
module is imported on demand: DeepSpeed's import alone takes seconds.
"""

from __future__ import annotations

import importlib

import torch

from toolkit.config import Config, ConfigError
from toolkit.dist import DistEnv, dist_env, resolve_device
from toolkit.train.backends.base import Backend, Capabilities, StepResult

BACKENDS = {
    "single": ("toolkit.train.backends.single", "SingleBackend"),
    "ddp": ("toolkit.train.backends.single", "DDPBackend"),
    "deepspeed": ("toolkit.train.backends.deepspeed", "DeepSpeedBackend"),
    "fsdp": ("toolkit.train.backends.fsdp", "FSDPBackend"),
}


def backend_class(name: str, *, field: str = "backend.name") -> type[Backend]:
    """The class of backend `name` (its engine's module imported now); `field` names where the name came from."""
    if name not in BACKENDS:
        raise ConfigError(f"{field}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)


def build_backend(cfg: Config, *, env: DistEnv | None = None, device: torch.device | None = None) -> Backend:
    """The backend cfg.backend.name names, configured but not set up (no process group is started)."""
    cls = backend_class(cfg.backend.name)
    env = env or dist_env()
    device = device or resolve_device(cfg.backend.device, env)
    backend = cls(cfg, env=env, device=device)
    if cfg.train.async_checkpoint and not backend.capabilities.async_save:
        raise ConfigError(
            f"train.async_checkpoint=true is not supported by backend {cfg.backend.name}: {backend.no_async_reason} "
            "Set train.async_checkpoint=false, or use backend.name=fsdp (or single/ddp) for background checkpoints"
        )
    return backend


__all__ = ["BACKENDS", "Backend", "Capabilities", "StepResult", "backend_class", "build_backend"]
