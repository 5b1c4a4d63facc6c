"""Errors a user can fix: the CLI prints their message and one line of what to do, never a traceback."""


class UserError(RuntimeError):
    """Something about the machine, files or launch that the message says how to fix."""


OOM_HINT = (
    "out of memory on {device}: lower train.batch_size (packs per rank per micro-step) and raise "
    "train.gradient_accumulation_steps to keep the global batch, or set train.activation_checkpointing=language "
    "(or all); with DeepSpeed, ds_configs/zero3.json shards parameters too"
)
