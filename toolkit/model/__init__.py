"""The nanoVLM-family model: pure torch.nn, no distributed code, no data code."""

from toolkit.model.vlm import VisionLanguageModel, VLMOutput

__all__ = ["VLMOutput", "VisionLanguageModel"]
