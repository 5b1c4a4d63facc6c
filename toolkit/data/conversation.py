"""One sample -> input_ids and labels, the way nanoVLM builds them.

The image string (global tile token, then a position token per tile, each followed by the tile's image tokens)
is prepended to the first user turn. Loss falls on assistant turns only: each turn is rendered alone to find
its token span, the span's chat prefix (`<|im_start|>assistant\\n`) is excluded, and labels are shifted left by
one so that `labels[t]` is the target of position t, as the batch contract wants.
"""

from __future__ import annotations

from toolkit.data.tokenizer import VLMTokenizer

IGNORE = -100


def image_string(tok: VLMTokenizer, grids: list[tuple[int, int]], tokens_per_tile: int) -> str:
    image = tok.token("image_token") * tokens_per_tile
    parts = []
    for idx, (rows, cols) in enumerate(grids):
        if len(grids) > 1:
            parts.append(f"<image: {idx}>")
        parts.append(tok.token("global_image_token") + image)
        if (rows, cols) == (1, 1):
            continue
        for r in range(rows):
            for c in range(cols):
                parts.append(tok.token(f"r{r + 1}c{c + 1}") + image)
    return "".join(parts)


def to_messages(texts: list[dict], prefix: str = "") -> list[dict[str, str]]:
    """[{user, assistant}, ...] -> chat messages, the image string in front of the first user turn."""
    messages = []
    for turn in texts:
        messages.append({"role": "user", "content": turn["user"]})
        messages.append({"role": "assistant", "content": turn["assistant"]})
    if messages and prefix:
        messages[0]["content"] = prefix + messages[0]["content"]
    return messages


def encode_messages(tok: VLMTokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Chat messages -> (input_ids, labels) with labels already aligned to next-token targets."""
    turns = tok.encode_many([tok.render([msg]) for msg in messages])
    # Where the conversation's tokens are its turns' tokens, no second pass over the whole text is needed.
    ids = [t for turn in turns for t in turn] if tok.turns_concatenate else tok.encode(tok.render(messages))
    mask = [False] * len(ids)
    cursor = 0
    prefix = tok.assistant_prefix_len
    for msg, turn in zip(messages, turns):
        seg = len(turn)
        if msg["role"] == "assistant":
            for i in range(cursor + prefix, min(cursor + seg, len(ids))):
                mask[i] = True
        cursor += seg
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    return ids, [*labels[1:], IGNORE]


def encode_sample(
    tok: VLMTokenizer, texts: list[dict], grids: list[tuple[int, int]], tokens_per_tile: int
) -> tuple[list[int], list[int]]:
    return encode_messages(tok, to_messages(texts, image_string(tok, grids, tokens_per_tile)))


def encode_prompt(tok: VLMTokenizer, question: str, grids: list[tuple[int, int]], tokens_per_tile: int) -> list[int]:
    """A user question (with its images) rendered up to the assistant's turn, for generation. nanoVLM's markers in
    the question (`<|image|>` ...) are removed, as training removes them: left in, each was an image token without
    an image, and the model's forward failed on the count."""
    question = tok.markers.sub("", question)
    messages = [{"role": "user", "content": image_string(tok, grids, tokens_per_tile) + question}]
    return tok.encode(tok.render(messages, add_generation_prompt=True))
