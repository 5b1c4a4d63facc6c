"""FineVision's rating filter, img2dataset's image-caption pairs, and webdataset reading our shards (issue 17)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import shardgen
from PIL import Image

from toolkit.data import format as fmt
from toolkit.data.conversation import encode_sample
from toolkit.data.loader import data_stats
from toolkit.data.shards import DecodeSpec, RawSample, ShardScan, decode_sample, image_grid, image_members
from toolkit.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tuple[str, int]:
    return shardgen.make_tokenizer(tmp_path_factory.mktemp("tok"))


def turns(n: int) -> list[dict]:
    return [{"user": f"question {i}?", "assistant": f"answer {i}"} for i in range(n)]


def rated(key: str, n: int, **ratings: list) -> shardgen.Spec:
    return shardgen.Spec(key, {"texts": turns(n), **ratings}, shardgen.good(key).images)


RATED = {  # key -> (sample, the turns nanoVLM keeps at relevance >= 2 and formatting >= 3)
    "keep-first": (rated("a", 3, relevance_ratings=[5, 1, 4], formatting_ratings=[None, 5, 2]), [0]),
    "image-to-first-kept": (rated("b", 2, relevance_ratings=[1, 5]), [1]),
    "short-list-passes": (rated("c", 2, formatting_ratings=[4]), [0, 1]),
    "no-ratings": (rated("d", 2), [0, 1]),
    "none-left": (rated("e", 2, relevance_ratings=[1, 0]), []),
}


def decoded(tok, cfg, spec: shardgen.Spec, tmp_path: Path) -> tuple[list[int], list[tuple[int, int]]]:
    """The sample written to a tar and read back through the reader's decode."""
    path = tmp_path / f"{spec.key}.tar"
    shardgen.write_shard(path, [spec])
    (_, key, files), *_ = list(ShardScan(str(path)))
    decode = DecodeSpec.from_config(cfg)
    sample = decode_sample(RawSample((0, 0, 0), key, str(path), files), load_tokenizer(cfg.model), decode)
    return sample.input_ids, [image_grid(b, decode) for b in image_members(files)]


@pytest.mark.parametrize("case", list(RATED))
def test_rating_filter_keeps_the_turns_nanovlm_keeps(case, tok, tmp_path):
    spec, kept = RATED[case]
    cfg = shardgen.tiny_config(tok, str(tmp_path), data={"relevance_min_rating": 2, "formatting_min_rating": 3})
    tokenizer = load_tokenizer(cfg.model)
    if not kept:
        with pytest.raises(Exception, match=fmt.NO_TURNS_LEFT):
            decoded(tok, cfg, spec, tmp_path)
        return
    ids, grids = decoded(tok, cfg, spec, tmp_path)
    want, _ = encode_sample(tokenizer, [spec.meta["texts"][i] for i in kept], grids, cfg.model.mp_image_token_length)
    assert ids == want  # the image string sits in front of the first kept turn


def test_rating_filter_skips_are_counted(tok, tmp_path):
    (tmp_path / "d").mkdir()
    shardgen.write_shard(tmp_path / "d" / "shard-000000.tar", [spec for spec, _ in RATED.values()])
    cfg = shardgen.tiny_config(tok, str(tmp_path / "d"), data={"relevance_min_rating": 2, "formatting_min_rating": 3})
    stats = data_stats(cfg)
    assert (stats["samples_read"], stats["samples_packed"], stats["skipped"]) == (5, 4, {fmt.NO_TURNS_LEFT: 1})
    assert data_stats(shardgen.tiny_config(tok, str(tmp_path / "d")))["skipped"] == {}  # default 1: nothing dropped


def image(ext: str, seed: int) -> bytes:
    buf = io.BytesIO()
    pil = Image.open(io.BytesIO(shardgen.image_bytes(48, 40, seed=seed))).convert("RGB")
    pil.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
    return buf.getvalue()


CAPTIONS = {  # img2dataset's layouts -> the caption that becomes the assistant turn
    "jpg+txt": (shardgen.Spec("p1", None, [("jpg", image("jpg", 1)), ("txt", b"a red square\n")]), "a red square"),
    "png+json": (shardgen.Spec("p2", {"caption": "two circles"}, [("png", image("png", 2))]), "two circles"),
    "webp+txt+json": (
        shardgen.Spec("p3", {"caption": "unused", "url": "x"}, [("webp", image("webp", 3)), ("txt", b"a star")]),
        "a star",
    ),
}


@pytest.mark.parametrize("case", list(CAPTIONS))
def test_an_image_caption_pair_is_one_turn_asking_the_caption_prompt(case, tok, tmp_path):
    spec, caption = CAPTIONS[case]
    cfg = shardgen.tiny_config(tok, str(tmp_path), data={"caption_prompt": "What is shown?"})
    ids, grids = decoded(tok, cfg, spec, tmp_path)
    assert len(grids) == 1
    turn = [{"user": "What is shown?", "assistant": caption}]
    assert ids == encode_sample(load_tokenizer(cfg.model), turn, grids, cfg.model.mp_image_token_length)[0]


def test_caption_pairs_train_and_our_layout_without_texts_is_still_skipped(tok, tmp_path):
    (tmp_path / "d").mkdir()
    ours = shardgen.Spec("q9", {"caption": "not a pair: img0 layout"}, shardgen.good("q9").images)
    shardgen.write_shard(tmp_path / "d" / "shard-000000.tar", [spec for spec, _ in CAPTIONS.values()] + [ours])
    stats = data_stats(shardgen.tiny_config(tok, str(tmp_path / "d")))
    assert (stats["samples_read"], stats["samples_packed"], stats["skipped"]) == (4, 3, {fmt.NO_TEXTS: 1})


def test_webdataset_reads_our_shards_sample_for_sample(tmp_path):
    import webdataset as wds

    from toolkit.data.prepare.synthetic import write_synth

    write_synth(str(tmp_path), samples=40, val_samples=4, seed=0)
    for shard in sorted((tmp_path / "train").glob("*.tar")):
        ours = [(key, files) for _, key, files in ShardScan(str(shard))]
        theirs = list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))
        assert [s["__key__"] for s in theirs] == [key for key, _ in ours]
        for sample, (_, files) in zip(theirs, ours, strict=True):
            assert {k: v for k, v in sample.items() if not k.startswith("__")} == files  # same members, same bytes


def nanovlm_kept_turns(item: dict, mins: dict[str, int]) -> list[dict]:
    """nanoVLM HEAD's loop in data/datasets.py `_get_messages`, rewritten here: the reference for the rule."""
    kept = []
    for index, text in enumerate(item["texts"]):
        try:
            dropped = False
            for field, minimum in mins.items():
                ratings = item.get(f"{field}_ratings")
                if ratings is not None and ratings[index] is not None and ratings[index] < minimum:
                    dropped = True
                    break
            if dropped:
                continue
        except Exception:  # nanoVLM logs the error and keeps the turn
            pass
        kept.append(text)
    return kept


def test_rating_rule_matches_nanovlm_on_random_samples():
    import random

    from toolkit.data.texts import rated_turns

    rng = random.Random(0)
    fields = ("relevance", "image_correspondence", "visual_dependency", "formatting")
    differs = 0
    for _ in range(2000):
        n = rng.randint(1, 4)
        item = {"texts": turns(n)}
        for field in fields:
            if rng.random() < 0.8:  # sometimes the list is missing, sometimes short
                length = n if rng.random() < 0.9 else rng.randint(0, n)
                item[f"{field}_ratings"] = [rng.choice([1, 2, 3, 4, 5, None, "n/a"]) for _ in range(length)]
        mins = {field: rng.randint(1, 5) for field in fields}
        ours = rated_turns(item, item["texts"], tuple((f"{f}_ratings", m) for f, m in mins.items()))
        assert ours == nanovlm_kept_turns(item, mins), (item, mins)
        differs += len(ours) != n
    assert differs > 500  # the filter really drops turns in this draw


# ---------------------------------------------------------------------------------------------- shards from anywhere


def inputs_of(batches) -> list[list]:
    return [[t.tolist() for t in b.inputs.as_kwargs().values()] for b in batches]


@pytest.mark.parametrize("scheme", ["pipe", "file", "memory"])
def test_pipe_and_fsspec_urls_train_and_resume_like_local_paths(scheme, tok, tmp_path):
    import fsspec

    from toolkit.data.loader import build_loader

    shardgen.make_dataset(tmp_path / "d", shards=3, per_shard=8, manifest=False)
    local = str(tmp_path / "d" / "shard-{000000..000002}.tar")
    if scheme == "memory":
        for p in sorted((tmp_path / "d").glob("*.tar")):
            with fsspec.open(f"memory://shards/{p.name}", "wb") as fh:
                fh.write(p.read_bytes())
    url = {
        "pipe": f"pipe:cat {local}",
        "file": f"file://{local}",
        "memory": "memory://shards/shard-{000000..000002}.tar",
    }[scheme]
    want = list(build_loader(shardgen.tiny_config(tok, local), rank=0, world=1, finite=True))
    loader = build_loader(shardgen.tiny_config(tok, url), rank=0, world=1, finite=True)
    got = list(loader)
    assert inputs_of(got) == inputs_of(want) and len(got) >= 3  # the same rows, in the same order
    assert loader.counts() == {"read": 24, "skipped": {}}
    head = build_loader(shardgen.tiny_config(tok, url), rank=0, world=1, finite=True)
    it = iter(head)
    first = [next(it)]
    resumed = build_loader(shardgen.tiny_config(tok, url), rank=0, world=1, finite=True)
    resumed.load_state_dict(head.state_dict())
    assert inputs_of(first + list(resumed)) == inputs_of(want)  # exact mid-pass resume over the URL


def _train_in_process(cfg_path: Path, *overrides: str) -> list[dict]:
    """`python -m toolkit train` in this process (single backend); its metrics.jsonl records with a loss."""
    import signal

    from toolkit import __main__ as cli

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}  # train installs handlers
    try:
        assert cli.main(["train", "--config", str(cfg_path), *overrides]) == 0
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    run = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.run_dir="))
    return [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def test_train_stops_and_resumes_over_a_pipe_url_like_an_uninterrupted_run(tok, tmp_path):
    """The whole `train` path over `pipe:cat ...` shards: a run stopped at step 3 and resumed from its checkpoint
    trains steps 4-6 on the same batches with the same losses as a run that never stopped."""
    from toolkit.config import save_config

    shardgen.make_dataset(tmp_path / "d", shards=3, per_shard=8, manifest=False)
    url = f"pipe:cat {tmp_path / 'd' / 'shard-{000000..000002}.tar'}"
    cfg = shardgen.tiny_config(tok, url, train={"max_training_steps": 6, "checkpoint_interval": 3, "log_interval": 1,
                                                "eval_interval": 0, "export_best": False})  # fmt: skip
    cfg.backend.name, cfg.backend.device, cfg.backend.precision = "single", "cpu", "fp32"
    save_config(cfg, tmp_path / "pipe.yaml")
    once = _train_in_process(tmp_path / "pipe.yaml", f"train.run_dir={tmp_path / 'once'}")
    _train_in_process(tmp_path / "pipe.yaml", f"train.run_dir={tmp_path / 'twice'}", "train.stop_at_step=3")
    log = tmp_path / "twice" / "metrics.jsonl"
    log.write_text(
        "".join(json.dumps({**json.loads(ln), "before_stop": True}) + "\n" for ln in log.read_text().splitlines())
    )
    twice = _train_in_process(tmp_path / "pipe.yaml", f"train.run_dir={tmp_path / 'twice'}")  # resume=auto
    assert [r["step"] for r in twice] == [r["step"] for r in once] == list(range(1, 7))
    assert [r["step"] for r in twice if r.get("before_stop")] == [1, 2, 3]  # resumed at step 4, not retrained
    assert [r["batch_digest"] for r in twice] == [r["batch_digest"] for r in once]
    assert [r["loss"] for r in twice] == [r["loss"] for r in once]


def test_a_failed_remote_read_is_retried_then_counted(tok, tmp_path, monkeypatch):
    from toolkit.data import shards

    monkeypatch.setattr(shards, "RETRY_DELAY_S", 0.0)
    specs = [shardgen.good(f"r{i:02d}", seed=i) for i in range(6)]
    shardgen.write_shard(tmp_path / "whole.tar", specs)
    half = (tmp_path / "whole.tar").stat().st_size // 2
    tries = tmp_path / "tries"
    # First try: the connection drops halfway; later tries: the whole shard.
    whole, first_try = f"cat {tmp_path}/whole.tar", f"head -c {half} {tmp_path}/whole.tar"
    flaky = f"pipe:echo x >> {tries}; if [ $(wc -l < {tries}) -gt 1 ]; then {whole}; else {first_try}; fi"
    stats = data_stats(shardgen.tiny_config(tok, flaky))
    assert tries.read_text().count("x") == 2
    assert (stats["samples_read"], stats["samples_packed"], stats["skipped"]) == (6, 6, {})  # none lost, none twice
    tries.unlink()
    broken = f"pipe:echo x >> {tries}; {first_try}"
    stats = data_stats(shardgen.tiny_config(tok, broken))
    assert tries.read_text().count("x") == 1 + shards.REMOTE_RETRIES
    assert stats["skipped"] == {fmt.TRUNCATED_TAR: 1} and stats["samples_packed"] == stats["samples_read"] < 6


def write_caption_shards(folder: Path, shards: int = 3, per_shard: int = 7) -> list[str]:
    """img2dataset-style shards written by webdataset's own TarWriter: KEY.jpg + KEY.json, and KEY.txt on odd keys."""
    import webdataset as wds

    folder.mkdir()
    keys = []
    for s in range(shards):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                key = f"{s}{i:03d}"
                sample = {"__key__": key, "jpg": image("jpg", s * 10 + i), "json": {"caption": f"picture {key}"}}
                if i % 2:
                    sample["txt"] = f"caption {key}"
                sink.write(sample)
                keys.append(key)
    return keys


def test_caption_shards_from_webdatasets_tarwriter_are_split_between_two_ranks(tok, tmp_path):
    """Two ranks' loaders share the caption shards: every pair read once, none skipped."""
    from toolkit.data.loader import build_loader

    want = write_caption_shards(tmp_path / "d")
    cfg = shardgen.tiny_config(tok, str(tmp_path / "d"))
    keys, read = [], 0
    for rank in range(2):
        loader = build_loader(cfg, rank=rank, world=2, finite=True)
        keys += [k.rsplit(":", 1)[1] for b in loader for row in b.stats.keys for k in row]
        counts = loader.counts()
        assert counts["skipped"] == {}
        read += counts["read"]
    assert read == 21 and sorted(keys) == sorted(want)


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_caption_shards_train_on_two_ranks_and_every_sample_is_counted(tok, tmp_path):
    """`train` on 2 FSDP2 ranks over TarWriter caption shards: the loss falls, and the run's sample counts (summed
    over ranks) hold every pair read and none skipped; a caption-less layout would show as no_texts skips."""
    from tests.conftest import run_ranks
    from toolkit.config import save_config

    write_caption_shards(tmp_path / "d")
    cfg = shardgen.tiny_config(tok, str(tmp_path / "d"), data={"num_workers": 1},
                               train={"batch_size": 1, "max_training_steps": 16, "log_interval": 4,
                                      "checkpoint_interval": 0, "eval_interval": 0, "export_best": False,
                                      "run_dir": str(tmp_path / "run")})  # fmt: skip
    cfg.backend.name, cfg.backend.device = "fsdp", "cpu"
    save_config(cfg, tmp_path / "captions.yaml")
    run_ranks(2, "-m", "toolkit", "train", "--config", str(tmp_path / "captions.yaml"), timeout=360)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counted = [r["samples"] for r in records if "samples" in r]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 17)) and len(counted) == 4
    assert all(c["skipped"] == {} for c in counted)
    # Both ranks' readers, summed: what each rank's own loader has read after its 16 batches (at least 21 passed
    # a count from one rank reading every shard, or counted twice).
    from toolkit.data.loader import build_loader

    read = 0
    for rank in range(2):
        loader = build_loader(cfg, rank=rank, world=2)
        batches = iter(loader)
        for _ in range(16):
            next(batches)
        read += loader.counts()["read"]
    assert counted[-1]["read"] == read and read >= 21
    assert sum(r["loss"] for r in records[-4:]) < sum(r["loss"] for r in records[:4])


def test_a_resume_after_changing_the_data_is_refused_unless_its_stream_starts_afresh(tok, tmp_path, capsys):
    """The saved stream position fits only its own data: a resume on other shards is refused before the run's files
    change, and with train.resume_data=false trains on, the new data from its first batch. A stop_at_step past the
    end of the schedule ends with it."""
    from toolkit import __main__ as cli
    from toolkit.config import save_config

    shardgen.make_dataset(tmp_path / "a", shards=2, per_shard=8, prefix="a")
    shardgen.make_dataset(tmp_path / "b", shards=3, per_shard=6, prefix="b")  # a state names shards and counts
    cfg = shardgen.tiny_config(tok, str(tmp_path / "a"), train={"max_training_steps": 5, "checkpoint_interval": 2,
                               "log_interval": 1, "eval_interval": 0, "export_best": False})  # fmt: skip
    cfg.backend.name, cfg.backend.device, cfg.backend.precision = "single", "cpu", "fp32"
    save_config(cfg, tmp_path / "a.yaml")
    run, on_b = f"train.run_dir={tmp_path / 'run'}", f"data.train_shards={tmp_path / 'b'}"
    _train_in_process(tmp_path / "a.yaml", run, "train.stop_at_step=2")
    saved = (tmp_path / "run" / "config.yaml").read_bytes()
    assert cli.main(["train", "--config", str(tmp_path / "a.yaml"), run, on_b]) == 2
    assert "train.resume_data=false" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_bytes() == saved  # refused before anything was rewritten
    resumed = _train_in_process(tmp_path / "a.yaml", run, on_b, "train.resume_data=false", "train.stop_at_step=9")
    fresh_b = _train_in_process(tmp_path / "a.yaml", f"train.run_dir={tmp_path / 'b_run'}", on_b)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]  # stop_at_step=9 ends with the schedule at 5
    assert [r["batch_digest"] for r in resumed[2:]] == [r["batch_digest"] for r in fresh_b[:3]]  # b from its start


def test_answer_accuracy_reads_caption_pairs_as_the_loss_does(tmp_path):
    """eval's loss scored img2dataset caption shards, while its answer accuracy skipped every sample (no_texts) and
    then printed "0 questions left out". Each pair is one turn asking the caption prompt, with its caption."""
    from toolkit.evaluate import iter_eval_samples

    keys = write_caption_shards(tmp_path / "caps", shards=1, per_shard=3)
    samples = list(iter_eval_samples(str(tmp_path / "caps")))
    assert [s["texts"] for s in samples] == [
        [{"user": "Describe the image.", "assistant": c}] for c in ("picture 0000", "caption 0001", "picture 0002")
    ]
    assert len(keys) == 3 and all(len(s["images"]) == 1 for s in samples)
    asked = list(iter_eval_samples(str(tmp_path / "caps"), caption_prompt="Caption:"))
    assert asked[0]["texts"][0]["user"] == "Caption:"
