"""Conversation encoding: the one-pass path (each turn rendered and encoded once) equals the two-pass definition.

The two-pass definition is the conversation rendered and encoded whole, with each turn rendered and encoded alone
only to find its span; it is what nanoVLM does and what the reference fixture's ids and labels were checked with.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import tiny_model_config
from tests.shardgen import make_tokenizer
from toolkit.data.conversation import encode_messages, encode_sample
from toolkit.data.tokenizer import VLMTokenizer, load_tokenizer
from toolkit.model.hub import read_nanovlm_config

CONVERSATIONS = [
    [{"user": "What is in picture s001x002?", "assistant": "It is a shape."}],
    [
        {"user": "what colour?", "assistant": "red "},
        {"user": "\nand the shape?  ", "assistant": " a circle\n"},
        {"user": "count: déjà vu — ☂", "assistant": ""},
    ],
    [{"user": "", "assistant": "it is a shape"}, {"user": "<|im_end|> tricky", "assistant": "s003x004?"}],
]
GRIDS = [[], [(1, 1)], [(2, 3)], [(1, 2), (2, 2)]]


def _two_pass(tok: VLMTokenizer, texts: list[dict], grids: list, tokens_per_tile: int) -> tuple[list, list]:
    return encode_sample(tok.two_pass(), texts, grids, tokens_per_tile)


@pytest.fixture(scope="module")
def synth_tok(tmp_path_factory) -> VLMTokenizer:
    path, base = make_tokenizer(tmp_path_factory.mktemp("tok") / "tok")
    return load_tokenizer(tiny_model_config(lm_base_vocab_size=base, lm_vocab_size=base + 66), path)


@pytest.fixture
def fixture_tok(reference_dir) -> tuple[VLMTokenizer, int]:
    cfg = read_nanovlm_config(reference_dir / "checkpoint")
    return load_tokenizer(cfg), cfg.mp_image_token_length


def _check_every_case(tok: VLMTokenizer, tokens_per_tile: int) -> None:
    assert tok.turns_concatenate  # a ChatML template: the one-pass path is the one being tested
    for texts in CONVERSATIONS:
        for grids in GRIDS:
            fast = encode_sample(tok, texts, grids, tokens_per_tile)
            assert fast == _two_pass(tok, texts, grids, tokens_per_tile), (texts, grids)


def test_one_pass_equals_two_pass_with_a_byte_level_bpe(synth_tok):
    _check_every_case(synth_tok, 4)


def test_one_pass_equals_two_pass_with_the_nanovlm_fixture_tokenizer(fixture_tok):
    _check_every_case(*fixture_tok)


def test_a_template_that_does_not_split_at_turns_keeps_the_two_pass_path(synth_tok):
    # a default system prompt when there is none: the whole conversation is not its turns laid end to end
    template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    tok = dataclasses.replace(synth_tok, chat_template=template)
    assert not tok.turns_concatenate
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "it is a shape"}]
    ids, _ = encode_messages(tok, messages)
    assert ids == tok.encode(tok.render(messages))  # the whole conversation, system prompt once


def test_a_chat_template_gets_the_variables_transformers_gives_it(synth_tok) -> None:
    """A template writing eos_token failed on an undefined name (a jinja traceback from load_tokenizer), and one
    writing bos_token rendered it as nothing; transformers' apply_chat_template gives both, and the same text."""
    template = (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('no system turns') }}{% endif %}"
        "{{ message['role'] + ': ' + message['content'] + eos_token }}{% endfor %}"
    )
    tok = dataclasses.replace(synth_tok, chat_template=template)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    hf_text = synth_tok.hf.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert tok.render(messages) == hf_text and synth_tok.hf.eos_token in hf_text
    with pytest.raises(Exception, match="no system turns"):
        tok.render([{"role": "system", "content": "x"}])


def test_nanovlms_markers_in_a_prompt_are_removed_as_in_training(synth_tok) -> None:
    """`generate --prompt "<|image|> what is it?"` and eval questions holding nanoVLM's markers failed in the
    model's forward (one image token more than the tiles give); training strips them. The prompt ids, from both
    prompt builders, are those of the question without them, and the forward takes them."""
    import torch
    from PIL import Image

    from toolkit.data.conversation import encode_prompt
    from toolkit.evaluate import prompt_inputs
    from toolkit.model import VisionLanguageModel

    marked = f"what is {synth_tok.token('image_token')} this {synth_tok.token('r1c1')}?"
    plain = "what is  this ?"
    for grids in ([], [(1, 2)]):
        assert encode_prompt(synth_tok, marked, grids, 4) == encode_prompt(synth_tok, plain, grids, 4)
    base = synth_tok.image_token_id - list(tiny_model_config().vlm_extra_tokens).index("image_token")
    model = VisionLanguageModel(tiny_model_config(lm_base_vocab_size=base, lm_vocab_size=base + 66)).eval()
    image = Image.new("RGB", (40, 30), "grey")
    ids, pixels = prompt_inputs(model, synth_tok, [image], marked)
    assert ids == prompt_inputs(model, synth_tok, [image], plain)[0]
    with torch.no_grad():
        model(torch.tensor([ids]), pixel_values=pixels)  # its image-token count check passes
