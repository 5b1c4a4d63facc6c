"""Preparing data: sources (Hugging Face datasets, JSONL + images, Python rows, shapes-VQA) -> tar shards.

Kept apart from the reading side in toolkit.data because the two run at different times and fail differently:
preparing runs once, offline, may need `datasets` and a whole source in view, and stops on a wrong SRC; reading
runs in every training step and must never stop for bad data. They share only toolkit.data.format (what a shard
holds) and the tokenizer, image and conversation code, so neither side imports the other.
"""
