"""What a newcomer hits ends in one line that says what to do, not a traceback (issue 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit import __main__ as cli

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "--config", "tiny", "model.tokenizer=/nowhere/tok"], "Set model.tokenizer="),
        (
            ["data-stats", "--config", "tiny", "data.train_shards=/nowhere/shard-{000..003}.tar"],
            "4 of 4 shards are missing",
        ),
        (["train", "--config", "tiny", "backend.name=horovod"], "choose one of single, ddp, deepspeed, fsdp"),
        (["generate", "--checkpoint", "/nowhere", "--image", "x.png", "--prompt", "hi"], "/nowhere does not exist"),
        (["report", "/nowhere"], "pass a run folder"),
        (["data-stats", "--config", "tiny", "--max-packs", "-1"], "give 0 (one full pass)"),  # was a partial pass
        (["eval", "--checkpoint", "/nowhere", "--shards", "/nowhere/val"], "--shards='/nowhere/val' does not"),
    ],
)
def test_errors_end_in_one_line_of_advice(args, says, tmp_path):
    done = run_cli(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert says in done.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no GPU is present")
def test_gpu_asked_for_but_absent(tmp_path):
    done = run_cli("train", "--config", "tiny", "backend.device=cuda", f"train.run_dir={tmp_path}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "set backend.device=cpu or auto" in done.stderr


def test_generate_names_an_image_it_cannot_read_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """PIL's UnidentifiedImageError (and a cut file's OSError) as one line naming the file; the model never loads."""
    from toolkit import evaluate

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")  # enough to be found; loading it would fail
    monkeypatch.setattr(evaluate, "load_for_inference", lambda *a, **k: pytest.fail("loaded the model first"))
    (tmp_path / "notes.jpg").write_text("not an image")
    png = tmp_path / "cut.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 10, 10)).save(png)
    png.write_bytes(png.read_bytes()[:60])
    for image, says in [("notes.jpg", "is not an image PIL can read"), ("cut.png", "cannot be read")]:
        path = tmp_path / image
        args = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--image", str(path), "--prompt", "hi"]
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --image {path}") and says in err and "\n" not in err, err


def test_out_of_memory_gets_a_hint(monkeypatch, capsys):
    def boom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(cli.HANDLERS, "report", boom)
    assert cli.main(["report", "x"]) == 3
    err = capsys.readouterr().err
    assert "lower train.batch_size" in err and "train.activation_checkpointing" in err


def test_unreachable_hostfile_host(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# a host that does not resolve\nno-such-host.invalid slots=8\n")
    done = subprocess.run(["bash", "launch/deepspeed.sh", str(hostfile), "--config", "tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert "no-such-host.invalid" in done.stderr and "ssh-copy-id" in done.stderr


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    from toolkit.data.prepare.synthetic import write_synth

    root = tmp_path_factory.mktemp("synth")
    write_synth(str(root), samples=16, val_samples=4, seed=0)
    return root


def test_train_check_runs_the_checks_for_the_given_world_and_starts_nothing(synth_data, tmp_path, capsys):
    """`train --check --world N` makes the run's checks for N ranks (accumulation, resume) and writes nothing."""
    base = ["train", "--check", "--config", "tiny", f"model.tokenizer={synth_data / 'tokenizer'}",
            f"data.train_shards={synth_data / 'train'}", f"data.val_shards={synth_data / 'val'}",
            f"train.run_dir={tmp_path / 'run'}", "train.global_batch_size=4", "train.batch_size=1",
            "backend.name=ddp"]  # fmt: skip
    assert cli.main([*base, "--world", "2"]) == 0
    said = capsys.readouterr().out
    assert "config ok for 2 ranks" in said and "2 micro-steps of 1 rows" in said  # 4 rows / (1 row x 2 ranks)
    assert not (tmp_path / "run").exists()
    assert cli.main([*base, "--world", "3"]) == 2  # 4 rows cannot split over 3 ranks: the run would fail there
    assert "not a multiple of train.batch_size x world size" in capsys.readouterr().err
    run = [a for a in base if a != "--check"]
    assert cli.main([*run, "--world", "2"]) == 2  # a run's ranks are the launcher's: it trained one, silently
    assert "--world 2 applies to `train --check` only" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_shard_set_smaller_than_the_jobs_readers_is_said_with_the_fix(synth_data, tmp_path, caplog):
    """Fewer shards than readers (ranks x loader workers): every reader opens every shard for its 1/n of the
    samples, the set read n times a pass (64 validation shards on 512 ranks of 4 workers: 131,072 opens each
    validation, nothing said). Said once per set at the check, from 16 readers on; below, nothing."""
    import logging

    from toolkit.data.shards import resolve_sets

    train_shards = len(resolve_sets(str(synth_data / "train"))[0].shards)
    val_shards = len(resolve_sets(str(synth_data / "val"))[0].shards)
    assert val_shards < train_shards < 16
    base = ["train", "--check", "--config", "tiny", f"model.tokenizer={synth_data / 'tokenizer'}",
            f"data.train_shards={synth_data / 'train'}", f"data.val_shards={synth_data / 'val'}",
            f"train.run_dir={tmp_path / 'run'}", "backend.name=ddp", "data.num_workers=2"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert cli.main([*base, "--world", "7"]) == 0  # 14 readers
        assert "readers" not in caplog.text
        assert cli.main([*base, "--world", "8"]) == 0  # 16 readers
    said = [r.getMessage() for r in caplog.records if "readers" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith("data.train_shards:") and said[1].startswith("data.val_shards:")
    assert f"has {train_shards} shards for 16 readers (8 rank(s) x 2 loader worker(s)" in said[0]
    assert "keeps 1 sample in 16, so a pass reads the set 16 times" in said[1] and "at least 16 shards" in said[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the training order's own readers, whatever the ranks
        assert cli.main([*base, "--world", "2", "data.virtual_readers=16", "train.global_batch_size=64"]) == 0
    said = [r.getMessage() for r in caplog.records if "readers" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("data.train_shards:") and "(data.virtual_readers=16)" in said[0]


def test_a_typo_under_torchrun_fails_once_before_any_rank_starts(synth_data, tmp_path):
    """torchrun restarts a failed group (--max_restarts): a config error used to print on every rank of every
    restart and end in torchrun's ChildFailedError (exit 1). The launcher checks once first: exit 2, one line."""
    done = subprocess.run(
        ["bash", "launch/torchrun.sh", "--config", "tiny", f"model.tokenizer={synth_data / 'tokenizer'}",
         f"data.train_shards={synth_data / 'train'}", "train.max_step=5"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "NPROC_PER_NODE": "2"},
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("config error") == 1 and "ChildFailedError" not in done.stderr
    assert "train.max_training_steps" in done.stderr  # the hint


# What a survivor's collective raised in the audit runs when its peer died (gloo, CPU), and NCCL's words for it.
PEER_LOSS_TEXTS = [
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
    "[127.0.0.1]:33195. This is typically caused by a remote worker crashing. Check the logs of the remote worker "
    "before reporting an error. GLHF! \U0001f3d6\ufe0f",
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:12484: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application. "
    "Check the logs of the remote worker before reporting an error. GLHF! \U0001f3d6\ufe0f",
    "NCCL communicator was aborted on rank 0. Original reason for failure was: [Rank 0] Watchdog caught collective "
    "operation timeout: WorkNCCL(SeqNum=51, OpType=ALLREDUCE) ran for 600000 milliseconds before timing out.",
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:3356, remote process exited or there "
    "was a network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error or a "
    "remote process exiting prematurely.",
    "Failed to recv, got 0 bytes. Connection was likely closed. Did the remote server shutdown or crash?",
]
NOT_PEER_LOSS = [  # bugs, or this rank's own failure: their tracebacks stay
    "DDP expects same model across all ranks, but Rank 1 has 59 params, while rank 0 has inconsistent 50 params.",
    "[enforce fail at inline_container.cc:672] . unexpected pos 890112 vs 890064",
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv operation",
    "NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage (run with NCCL_DEBUG=WARN for details)",
]


def test_peer_loss_is_recognised_from_gloo_and_nccl_texts_only():
    from torch.distributed import DistBackendError

    from toolkit.errors import peer_loss

    for text in PEER_LOSS_TEXTS:
        for cls in (RuntimeError, DistBackendError):
            found = peer_loss(cls(text))
            assert found and "\n" not in found and "GLHF" not in found and not found.startswith("["), found
    assert peer_loss(RuntimeError(PEER_LOSS_TEXTS[0])).startswith("Connection closed by peer [127.0.0.1]:33195")
    wrapped = ValueError("while handling it")
    wrapped.__context__ = RuntimeError(PEER_LOSS_TEXTS[1])
    assert peer_loss(wrapped)
    for text in NOT_PEER_LOSS:
        assert peer_loss(RuntimeError(text)) is None and peer_loss(DistBackendError(text)) is None
    assert peer_loss(ValueError(PEER_LOSS_TEXTS[0])) is None  # only what a collective raises


@pytest.mark.parametrize("text", PEER_LOSS_TEXTS[:2])
def test_a_peer_that_stopped_is_one_line_with_the_exit_status_of_a_crash(text, monkeypatch, capsys):
    def boom(args):
        raise RuntimeError(text)

    monkeypatch.setitem(cli.HANDLERS, "report", boom)
    assert cli.main(["report", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: another rank stopped first") and "\n" not in err, err
    assert "own log says why" in err and "latest" in err and "127.0.0.1" in err, err


TIMEOUT_TEXTS = [
    "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 15000ms for send operation to "
    "complete",
    "Timed out after 1801 seconds waiting for clients. 1/2 clients joined.",  # the rendezvous: a rank never started
]


@pytest.mark.parametrize("text", TIMEOUT_TEXTS)
def test_a_collective_that_timed_out_is_one_line_with_the_exit_status_of_a_crash(text, monkeypatch, capsys):
    """A rank paused (SIGSTOP) or never started: the others stopped after backend.collective_timeout_s with a
    70-line traceback of gloo's or the store's. Now one line that says what waiting past the timeout means."""
    from torch.distributed import DistStoreError

    def boom(args):
        raise (DistStoreError if "clients" in text else RuntimeError)(text)

    monkeypatch.setitem(cli.HANDLERS, "report", boom)
    assert cli.main(["report", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: a collective waited past backend.collective_timeout_s") and "\n" not in err, err
    assert "Timed out" in err and ".cc:" not in err, err


def test_a_real_gloo_peer_loss_ends_the_survivor_in_one_line(tmp_path):
    """Two gloo ranks; rank 1 exits, rank 0's next all-reduce fails inside `main` as a training step's would."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import os, sys, torch, torch.distributed as d\n"
        "from toolkit import __main__ as cli\n"
        "def handler(args):\n"
        "    d.init_process_group('gloo')\n"
        "    d.barrier()\n"
        "    if d.get_rank() == 1:\n"
        "        os._exit(0)\n"
        "    for _ in range(100):\n"
        "        d.all_reduce(torch.ones(4))\n"
        "    return 0\n"
        "cli.HANDLERS['report'] = handler\n"
        "code = cli.main(['report', 'x'])\n"
        "sys.stderr.flush()\n"
        # what main returns is the test; the teardown of a process group whose peer is gone may abort (-6) under
        # load (a training run destroys its group before returning)
        "os._exit(code)\n"
    )
    from conftest import CPU_ENV, free_port

    env = {**os.environ, **CPU_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=REPO, env={**env, "RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]  # fmt: skip
    try:
        err0 = procs[0].communicate(timeout=90)[1]
        procs[1].communicate(timeout=30)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1, err0
    assert "Traceback" not in err0 and err0.strip().splitlines()[-1].startswith("error: another rank stopped"), err0


def test_an_error_raised_in_a_dataloader_worker_prints_its_own_message(monkeypatch, capsys):
    """torch re-raises a worker's error as `Caught ShardError in DataLoader worker process 0. Original Traceback
    ...`: only the original message is printed, a ShardError labelled as the data's fault."""
    from torch._utils import ExceptionWrapper

    from toolkit.config import ConfigError
    from toolkit.data.shards import ShardError

    said = "shard set '/d/train' gave reader 1 of 2 no samples in a whole epoch; check the shards"
    for cls, label in ((ShardError, "data error"), (ConfigError, "config error")):
        try:
            raise cls(said)
        except cls:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
        monkeypatch.setitem(cli.HANDLERS, "report", lambda args, w=wrapped: w.reraise())
        assert cli.main(["report", "x"]) == 2
        assert capsys.readouterr().err.strip() == f"{label}: {said}"


def test_another_ranks_failed_save_and_a_full_disk_outside_a_save_are_one_line(monkeypatch, capsys):
    import errno

    from toolkit.errors import OtherRankFailed

    cases = [
        (OtherRankFailed("checkpoint step 3: 1 other rank(s) failed to write their part"), 1, "other rank(s)"),
        (OSError(errno.ENOSPC, "No space left on device", "/runs/a/tb/events.out"), 2, "writing /runs/a/tb/events"),
    ]
    for exc, status, says in cases:

        def boom(args, exc=exc):
            raise exc

        monkeypatch.setitem(cli.HANDLERS, "report", boom)
        assert cli.main(["report", "x"]) == status
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err, err


def test_shard_data_argument_mistakes_are_not_called_config_errors(tmp_path, capsys):
    """No config is involved in `shard-data ... --part 3/2` or a missing OUT: they were labelled "config error"."""
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "hello", "answer": "x"}\n')
    for args in (["--part", "3/2"], ["--shard-size", "10XB"], ["--workers", "0"]):
        assert cli.main(["shard-data", str(src), str(tmp_path / "out"), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
    assert cli.main(["shard-data", str(src)]) == 2
    assert capsys.readouterr().err.startswith("error: shard-data needs SRC and OUT")


def test_shard_data_prints_its_summary_as_json_with_number_lists_on_one_line(tmp_path, capsys):
    """The token-length histogram printed one number per line (26 lines); it is still the manifest's JSON."""
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"texts": [{"user": f"q{i}", "assistant": "a"}]}) + "\n" for i in range(5)))
    from cli_runs import write_data

    tokenizer = write_data(tmp_path / "synth") / "tokenizer"  # with a tokenizer: the token-length histogram
    assert cli.main(["shard-data", str(src), str(tmp_path / "out"), "--tokenizer", str(tokenizer)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert summary["samples"] == manifest["samples"] == 5
    counts = summary["token_histogram"]["counts"]
    assert sum(counts) == 5 and f"[{', '.join(map(json.dumps, counts))}]" in out


def test_data_stats_fails_when_nothing_can_be_packed(tmp_path, capsys):
    """It exited 0 with `packs: 0`, and the training run it vouched for stopped after 10,000 skipped samples."""
    from cli_runs import write_data

    synth = write_data(tmp_path / "synth")
    base = ["data-stats", "--config", "tiny", f"model.tokenizer={synth / 'tokenizer'}",
            f"data.train_shards={synth / 'train'}", "data.num_workers=0"]  # fmt: skip
    assert cli.main(base) == 0
    capsys.readouterr()
    assert cli.main([*base, "data.max_sample_length=10"]) == 2
    out, err = capsys.readouterr()
    assert "packs: 0" in out and "none of the 48 samples read could be packed" in err and "too_long" in err
    # A mixture with a set that gives nothing: the pooled counts hid it, and a training stream stops on it.
    import shardgen

    (tmp_path / "bad").mkdir()
    shardgen.write_shard(tmp_path / "bad" / "shard-000000.tar", [shardgen.Spec(f"n{i}", {"source": "x"}) for i in
                                                                 range(4)])  # fmt: skip
    mix = f"data.train_shards=[{{pattern: {synth / 'train'}, weight: 3}}, {{pattern: {tmp_path / 'bad'}, weight: 1}}]"
    assert cli.main([*base, mix]) == 2
    out, err = capsys.readouterr()
    assert f"set: {synth / 'train'} (weight 3): 48 of 48 samples packed" in out
    assert f"set: {tmp_path / 'bad'} (weight 1): 0 of ? samples packed" in out
    assert f"no sample of {tmp_path / 'bad'} could be packed" in err


def test_train_check_applies_the_attention_kernel_rules_it_can_know(tmp_path, capsys, monkeypatch):
    """`--check` skipped them on every host, so a forced kernel that the run then refused passed it. The run's
    device is known for backend.device=cpu (or on a GPU host); on a host without the run's GPU, the model's rules."""
    from cli_runs import write_data

    from toolkit.model import attention

    synth = write_data(tmp_path / "synth")
    base = ["train", "--check", "--config", "tiny", f"model.tokenizer={synth / 'tokenizer'}",
            f"data.train_shards={synth / 'train'}", f"data.val_shards={synth / 'val'}",
            f"train.run_dir={tmp_path / 'run'}", "train.attention_kernel=flex"]  # fmt: skip
    assert cli.main([*base, "backend.device=cpu"]) == 2
    assert "flex trains on CUDA only" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(base) == 0  # device auto: the run may be on a GPU node
        monkeypatch.setattr(attention, "FLEX_MIN_HEAD_DIM", 32)  # the tiny model's heads (16) are then too small
        assert cli.main(base) == 2
        assert "needs heads of at least 32" in capsys.readouterr().err


def test_overrides_may_follow_an_option():
    """`data-stats a.b=1 --max-packs 3 c.d=2` was refused ("unrecognized arguments: c.d=2"); an unknown option
    still is."""
    parse = lambda *argv: cli._parse(cli.build_parser(), list(argv))  # noqa: E731
    args = parse("data-stats", "--config", "tiny", "data.seed=1", "--max-packs", "3", "data.shuffle_buffer=4")
    assert (args.overrides, args.max_packs) == (["data.seed=1", "data.shuffle_buffer=4"], 3)
    args = parse("train", "--check", "data.seed=1", "--world", "2", "backend.name=ddp")
    assert (args.overrides, args.world, args.check) == (["data.seed=1", "backend.name=ddp"], 2, True)
    for bad in (["train", "data.seed=1", "--bogus"], ["data-stats", "--max-packs", "3", "--bogus", "a.b=1"]):
        with pytest.raises(SystemExit):
            parse(*bad)
