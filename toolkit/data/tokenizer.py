"""Tokenizer: a Hugging Face tokenizer plus nanoVLM's extra image tokens and chat template.

nanoVLM appends its extra tokens after the base vocabulary in the order of `vlm_extra_tokens`, so `<|image|>` is
`lm_base_vocab_size`. The model derives that id from its config alone; this module checks the tokenizer agrees,
because a mismatch would splice image features over ordinary words without any error.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from toolkit.config import ModelConfig
from toolkit.errors import UserError


class TokenizerError(UserError):
    """The tokenizer cannot be found or does not fit the model config."""


@dataclass
class VLMTokenizer:
    hf: object  # transformers tokenizer
    extra: dict[str, str]  # attribute name -> token text ("image_token" -> "<|image|>")
    chat_template: str

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        self._template = env.from_string(self.chat_template)
        # What transformers' apply_chat_template gives a template besides the messages: a template that writes
        # eos_token failed on an undefined name, and one that writes bos_token rendered it as nothing.
        specials = getattr(self.hf, "special_tokens_map", {}) or {}
        self._variables = {k: v for k, v in specials.items() if isinstance(v, str)}
        self._variables["raise_exception"] = _template_error
        # nanoVLM's markers (image, global image, tile tokens) as text, found in one search per text when decoding
        self.markers = re.compile("|".join(re.escape(m) for m in self.extra.values()))
        self.image_token_id = self.hf.convert_tokens_to_ids(self.extra["image_token"])
        self.eos_token_id = self.hf.eos_token_id
        self.pad_token_id = self.hf.eos_token_id  # nanoVLM pads with EOS
        marker = "\x00content\x00"
        rendered = self.render([{"role": "assistant", "content": marker}])
        # Tokens of "<|im_start|>assistant\n": the part of an assistant turn that is not trained on.
        self.assistant_prefix_len = len(self.encode(rendered[: rendered.index(marker)]))
        self.turns_concatenate = self._turns_concatenate()

    def _turns_concatenate(self) -> bool:
        """Whether a conversation's tokens are its turns' tokens, each turn rendered and encoded alone.

        True for ChatML templates such as SmolLM2's (each turn ends in a newline and the next starts with a special
        token), and then a conversation costs one render and one encode per turn instead of two. Checked once on a
        probe conversation, so a template that adds a system prompt or merges across turns keeps the slow path.
        """
        probe = [
            {"role": "user", "content": f"{self.extra['image_token']}What is it?"},
            {"role": "assistant", "content": "A red circle. "},
            {"role": "user", "content": "\nAnd now?"},
            {"role": "assistant", "content": "Two."},
        ]
        turns = [self.render([m]) for m in probe]
        if self.render(probe) != "".join(turns):
            return False
        return self.encode("".join(turns)) == [t for ids in self.encode_many(turns) for t in ids]

    def __len__(self) -> int:
        return len(self.hf)

    def token(self, name: str) -> str:
        return self.extra[name]

    def two_pass(self) -> VLMTokenizer:
        """A copy that encodes conversations the way nanoVLM does: whole, then each turn again for its span."""
        copy = dataclasses.replace(self)
        copy.turns_concatenate = False
        return copy

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, in one call into the tokenizer."""
        return self.hf(texts, add_special_tokens=False)["input_ids"] if texts else []

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self._variables)


def _template_error(message: str) -> None:
    """`raise_exception(...)` in a chat template (as transformers offers): the template refuses a conversation."""
    raise TokenizerError(f"the chat template refused the conversation: {message}")


def _load_hf(path: str):
    from transformers import AutoTokenizer

    if Path(path).is_dir():
        return AutoTokenizer.from_pretrained(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except OSError as exc:
        raise TokenizerError(
            f"tokenizer {path!r} is neither a folder nor in the local Hugging Face cache. "
            "Set model.tokenizer=/path/to/tokenizer (for the demo: run `python -m toolkit synth OUT` first)."
        ) from exc


def load_tokenizer(cfg: ModelConfig, path: str | None = None) -> VLMTokenizer:
    """Load `path` (default: model.tokenizer, else model.lm_tokenizer) and add the extra tokens in nanoVLM's order."""
    path = path or cfg.tokenizer_path
    hf = _load_hf(path)
    base = len(hf)
    if base != cfg.lm_base_vocab_size:
        raise TokenizerError(
            f"tokenizer {path} has {base} tokens but model.lm_base_vocab_size={cfg.lm_base_vocab_size}; "
            f"set model.lm_base_vocab_size={base} (and lm_vocab_size >= {base + cfg.extra_token_amount})"
        )
    hf.add_special_tokens({"additional_special_tokens": list(cfg.vlm_extra_tokens.values())})
    tok = VLMTokenizer(hf=hf, extra=dict(cfg.vlm_extra_tokens), chat_template=cfg.lm_chat_template)
    if tok.image_token_id != cfg.lm_base_vocab_size + list(cfg.vlm_extra_tokens).index("image_token"):
        raise TokenizerError(f"tokenizer {path} already defines {cfg.vlm_extra_tokens['image_token']} elsewhere")
    if tok.eos_token_id is None:
        raise TokenizerError(f"tokenizer {path} has no eos_token; nanoVLM needs one to end turns and to pad")
    return tok
