"""Data for training: shards -> samples -> packs -> batches (shards, loader, packing, collate).

This package reads; toolkit.data.prepare writes shards. The shard format both follow is format.py, and
tokenizer.py, images.py and conversation.py are shared, so that a sample is tokenized and tiled the same way when
shard-data counts its tokens as when the stream trains on it. Reading never imports toolkit.data.prepare.
"""
