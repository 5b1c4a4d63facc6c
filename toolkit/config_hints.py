"""Did-you-mean hints for unknown config keys: pure functions of the known keys, kept out of config.py.

One difflib match was too few (max_steps found max_bad_steps, lr found nothing), and a field written under the
wrong section got no hint at all. So the same field in another section, and the names other trainers give a
setting (ALIASES), come first; then fields that extend what was typed, then close spellings.
"""

from __future__ import annotations

import difflib

LR_KEYS = ("train.lr_mp", "train.lr_vision_backbone", "train.lr_language_backbone")

# What users of nanoVLM, the Hugging Face Trainer and DeepSpeed call a setting -> this toolkit's keys. Read only
# to turn an unknown name into a "did you mean"; names that are fields of another section need no entry here.
ALIASES: dict[str, tuple[str, ...]] = {
    "max_steps": ("train.max_training_steps",),
    "num_steps": ("train.max_training_steps",),
    "train_steps": ("train.max_training_steps",),
    "lr": LR_KEYS,
    "learning_rate": LR_KEYS,
    "warmup_steps": ("train.warmup_ratio",),
    "per_device_train_batch_size": ("train.batch_size",),
    "train_micro_batch_size_per_gpu": ("train.batch_size",),
    "micro_batch_size": ("train.batch_size",),
    "train_batch_size": ("train.global_batch_size",),
    "gradient_clipping": ("train.max_grad_norm",),
    "grad_clip": ("train.max_grad_norm",),
    "logging_steps": ("train.log_interval",),
    "stats_log_interval": ("train.log_interval",),
    "eval_steps": ("train.eval_interval",),
    "save_steps": ("train.checkpoint_interval",),
    "save_total_limit": ("train.keep_checkpoints",),
    "output_dir": ("train.run_dir",),
    "resume_from_checkpoint": ("train.resume",),
    "resume_from_vlm_checkpoint": ("train.resume", "train.init_from"),
    "gradient_checkpointing": ("train.activation_checkpointing",),
    "torch_compile": ("train.compile",),
    "lmms_eval_tasks": ("train.lmms_tasks",),
    "dataloader_num_workers": ("data.num_workers",),
    "train_dataset_path": ("data.train_shards",),
    "max_length": ("model.lm_max_length",),
    "max_seq_length": ("model.lm_max_length",),
    "bf16": ("backend.precision",),
    "fp16": ("backend.precision",),
    "mixed_precision": ("backend.precision",),
    "dtype": ("backend.precision",),
    "strategy": ("backend.name",),
}


def suggest_keys(name: str, fields: dict[str, list[str]], section: str | None = None) -> list[str]:
    """Keys (section.field) a user who typed `name` (under `section`, when given) most likely meant, best first;
    `fields` maps each section to its field names.

    The same field under another section, or a name another trainer uses (ALIASES), is taken as what was meant
    and returned alone; otherwise fields that extend the name (lr_vision -> lr_vision_backbone) and close
    spellings, those of `section` if it has any."""
    name = name.strip().lower()
    known = [f"{s}.{name}" for s, names in fields.items() if s != section and name in names]
    known += [key for key in ALIASES.get(name, ()) if key != f"{section}.{name}"]
    if known:
        return list(dict.fromkeys(known))
    everywhere = [f"{s}.{f}" for s, names in fields.items() for f in names]
    by_field: dict[str, list[str]] = {}
    for key in everywhere:
        by_field.setdefault(key.split(".")[1], []).append(key)
    extends = [key for key in everywhere if key.split(".")[1].startswith(f"{name}_")]
    close = [key for f in difflib.get_close_matches(name, list(by_field), n=4) for key in by_field[f]]
    found = list(dict.fromkeys(extends + close))
    own = [key for key in found if key.split(".")[0] == section]
    return (own or found)[:4]  # another section's look-alike is noise next to a match in the section typed


def did_you_mean(keys: list[str]) -> str:
    """' Did you mean ...?' for a message, or nothing when there is no suggestion."""
    if not keys:
        return ""
    if len(keys) == 1:
        return f" Did you mean {keys[0]!r}?"
    return f" Did you mean one of {', '.join(repr(k) for k in keys)}?"
