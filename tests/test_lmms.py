"""The lmms-eval adapter: its answers and scores equal the toolkit's own generation and loss on the same inputs.

lmms-eval is not installed here (it is optional), so its requests are stand-ins with the same `.args` layout, and
the registration and `eval --lmms-tasks` paths run against a stand-in `lmms_eval` package in sys.modules.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from tests.conftest import tiny_model_config
from tests.shardgen import make_tokenizer
from toolkit.data.conversation import encode_prompt
from toolkit.evaluate import answer, tiles_for
from toolkit.model import VisionLanguageModel


@dataclass
class Request:  # lmms_eval.api.instance.Instance, as far as a model sees it
    args: tuple


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("lmms")
    tok_dir, base = make_tokenizer(root / "tok")
    cfg = tiny_model_config(lm_base_vocab_size=base, lm_vocab_size=base + 66)
    torch.manual_seed(3)
    model = VisionLanguageModel(cfg)
    hf = AutoTokenizer.from_pretrained(tok_dir)
    blank = [i for i in range(base) if not hf.decode([i], skip_special_tokens=True).strip()]
    with torch.no_grad():  # random weights that never say a special or blank token: answers are not blank
        model.decoder.head.weight[base:] = 0
        model.decoder.head.weight[blank] = 0
    model.save_pretrained(str(root / "ckpt"), tokenizer_dir=tok_dir)
    return str(root / "ckpt")


@pytest.fixture(scope="module")
def adapter(checkpoint):
    from toolkit.lmms import NanoVLMScale

    model = NanoVLMScale(checkpoint, device="cpu", max_new_tokens=8)
    images = [Image.new("RGB", (40, 28), (200, 30, 30)), Image.new("RGB", (24, 24), (10, 200, 10))]
    model.task_dict = {"shapes": {"test": [{"image": images[0]}, {"image": images[1]}, {"image": None}]}}
    return model


def visuals(doc: dict) -> list | None:
    return [doc["image"]] if doc["image"] is not None else None


def test_generate_until_equals_the_toolkit_answer_cut_at_the_stop_string(adapter):
    model, tok = adapter.model, adapter.tok
    for doc_id in range(3):
        doc = adapter.task_dict["shapes"]["test"][doc_id]
        expected = answer(model, tok, visuals(doc) or [], "what is in picture s001x002?", max_new_tokens=8)
        gen = {"max_new_tokens": 8, "until": []}
        said = adapter.generate_until([Request(("<image>\nwhat is in picture s001x002?", gen, visuals, doc_id,
                                                "shapes", "test"))])  # fmt: skip
        assert said == [expected]
        assert expected, "a random tiny model still says something: the comparison above is not between two blanks"
        stop = expected[len(expected) // 2 :]
        cut = adapter.generate_until([Request(("what is in picture s001x002?", {"max_new_tokens": 8, "until": [stop]},
                                               visuals, doc_id, "shapes", "test"))])  # fmt: skip
        assert cut == [expected[: expected.index(stop)].strip()]


def test_loglikelihood_is_minus_the_models_own_loss_and_greedy_flag_is_right(adapter):
    model, tok = adapter.model, adapter.tok
    doc = adapter.task_dict["shapes"]["test"][0]
    question = "what is in picture s003x004?"
    pixels, grids = tiles_for(model, [doc["image"]])
    prompt = encode_prompt(tok, question, grids, model.cfg.mp_image_token_length)

    def greedy_tokens(n: int) -> list[int]:
        return model.generate(torch.tensor([prompt]), pixels, max_new_tokens=n)[0].tolist()

    flags = []
    for continuation in (tok.decode(greedy_tokens(3)), " it is a shape"):
        ((logprob, is_greedy),) = adapter.loglikelihood(
            [Request((f"<image> {question}", continuation, visuals, 0, "shapes", "test"))]
        )
        cont = tok.encode(continuation)
        ids = torch.tensor([prompt + cont])
        labels = torch.full_like(ids, -100)
        labels[0, len(prompt) - 1 : -1] = torch.tensor(cont)  # labels are next-token aligned
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels, labels=labels)
        assert logprob == pytest.approx(-out.loss_sum.item(), rel=1e-5, abs=1e-5) and logprob < 0
        assert is_greedy == (greedy_tokens(len(cont)) == cont)
        flags.append(is_greedy)
    assert flags == [True, False]  # the model's own greedy answer, then a sentence it does not say


def test_video_visuals_are_refused_with_a_clear_error(adapter):
    from toolkit.errors import UserError

    with pytest.raises(UserError, match="images only"):
        adapter.generate_until([Request(("q", {}, lambda doc: ["clip.mp4"], 0, "shapes", "test"))])


@pytest.fixture
def fake_lmms_eval():
    """A stand-in lmms_eval: the base class, the v2 manifest and a simple_evaluate that runs one generate task."""
    calls: list[dict[str, Any]] = []

    class lmms:  # lmms-eval's own name for the base class
        is_simple = True

        def __init__(self) -> None:
            self.task_dict: dict = {}

    @dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str | None = None

    def simple_evaluate(model, tasks, limit=None, batch_size=None, log_samples=True, task_manager=None):
        calls.append({"model": model, "tasks": tasks, "limit": limit})
        model.task_dict["shapes"] = {"test": [{"image": Image.new("RGB", (30, 30), (0, 0, 250))}]}
        said = model.generate_until([Request(("what is in picture s000x001?", {"max_new_tokens": 4}, visuals, 0,
                                              "shapes", "test"))])  # fmt: skip
        return {"results": {task: {"answered,none": float(bool(said[0])), "alias": task} for task in tasks}}

    modules = {name: types.ModuleType(name) for name in
               ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.evaluator", "lmms_eval.models",
                "lmms_eval.models.registry_v2", "lmms_eval.tasks")}  # fmt: skip
    modules["lmms_eval.tasks"].TaskManager = lambda include_path=None: ("tasks from", include_path)
    modules["lmms_eval.api.model"].lmms = lmms
    modules["lmms_eval.evaluator"].simple_evaluate = simple_evaluate
    modules["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    if importlib.util.find_spec("lmms_eval") is not None:
        pytest.skip("lmms-eval is installed: test_real_lmms_eval_* run against it instead of this stand-in")
    import toolkit.lmms

    sys.modules.update(modules)
    try:
        importlib.reload(toolkit.lmms)  # now NanoVLMScale subclasses the stand-in lmms
        yield lmms, calls
    finally:
        for name in modules:
            del sys.modules[name]
        importlib.reload(toolkit.lmms)  # back to the plain class for later tests


def test_entry_point_manifest_names_an_lmms_subclass(fake_lmms_eval):
    lmms, _ = fake_lmms_eval
    manifest = sys.modules["toolkit.lmms"].model_manifest()
    module_name, cls_name = manifest.simple_class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    assert manifest.model_id == "nanovlm_scale" and issubclass(cls, lmms) and cls.is_simple


def test_eval_lmms_tasks_runs_simple_evaluate_on_the_checkpoint(fake_lmms_eval, checkpoint, capsys):
    from toolkit.__main__ import main

    _, calls = fake_lmms_eval
    assert main(["eval", "--checkpoint", checkpoint, "--lmms-tasks", "mme, ai2d", "--lmms-limit", "3"]) == 0
    assert [c["tasks"] for c in calls] == [["mme", "ai2d"]] and calls[0]["limit"] == 3
    assert type(calls[0]["model"]).__name__ == "NanoVLMScale"
    out = capsys.readouterr().out
    assert "lmms-eval mme: answered,none=1" in out and "lmms-eval ai2d: answered,none=1" in out


def test_eval_without_lmms_eval_or_shards_says_what_to_do(checkpoint, capsys):
    from toolkit.__main__ import main

    assert main(["eval", "--checkpoint", checkpoint]) == 2
    assert "--shards" in capsys.readouterr().err
    if importlib.util.find_spec("lmms_eval") is None:
        assert main(["eval", "--checkpoint", checkpoint, "--lmms-tasks", "mme"]) == 2
        assert "pip install lmms-eval" in capsys.readouterr().err


# -- against the real lmms-eval, where it is installed (it is not in CI: it pulls torchvision for another torch) --

TASK_YAML = """
task: toy_generate
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function toy_utils.doc_to_visual
doc_to_text: !function toy_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TOY_UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "<image>" + doc["question"]
"""


def test_real_lmms_eval_scores_a_checkpoint_as_computed_from_the_model(adapter, checkpoint, tmp_path):
    """An offline lmms-eval task of 4 images whose reference answers are the model's own answer for 2 of them.

    Exact match must then be 0.5: lmms-eval loaded the task, asked the adapter with the document's image and text,
    and scored what came back. (lmms-eval 0.7.3 turns `loglikelihood` results into strings in
    `unwrap_generation_output`, so its multiple-choice tasks fail for every model; the adapter's log-likelihoods
    are checked against the model's own loss above.)
    """
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional; CI does not have it)")
    import datasets

    from toolkit.lmms import run_tasks

    model, tok = adapter.model, adapter.tok
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    images = [Image.new("RGB", (32 + 8 * i, 32), c) for i, c in enumerate(colours)]
    question = "what is in picture s002x005?"
    said = [answer(model, tok, [img], question, max_new_tokens=8) for img in images]
    rows = {"image": images, "question": [question] * 4, "answer": [said[0], said[1] + " not", said[2], "no"]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "toy_utils.py").write_text(TOY_UTILS)
    (tmp_path / "toy_generate.yaml").write_text(TASK_YAML.format(data=tmp_path / "data"))
    results = run_tasks(checkpoint, ["toy_generate"], include_path=str(tmp_path), device="cpu")
    assert results["toy_generate"]["exact_match,none"] == pytest.approx(0.5)


def test_real_lmms_eval_registry_resolves_the_entry_point():
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional; CI does not have it)")
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from toolkit.lmms import NanoVLMScale, model_manifest

    registry = ModelRegistryV2()
    registry.register_manifest(model_manifest())
    assert registry.get_model_class("nanovlm_scale") is NanoVLMScale  # an lmms subclass, declared simple
