"""Exports: nanoVLM's format (the default) and transformers' Idefics3 (`--format hf`), from a run, a checkpoint or
a nanoVLM folder; `hf_inputs` builds nanoVLM's prompt layout for the HF model."""

from __future__ import annotations

from toolkit.export.inputs import hf_inputs
from toolkit.export.run import FORMATS, export

__all__ = ["FORMATS", "export", "hf_inputs"]
