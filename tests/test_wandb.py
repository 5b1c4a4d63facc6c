"""Optional Weights & Biases logging (issue 16): rank 0's W&B run holds what TensorBoard holds, offline.

What W&B recorded is read back from the run's `run-*.wandb` file: a LevelDB-style log of wandb's protobuf
`Record`s (wandb 0.31 ships no Python reader for it, so `wandb_records` below reads the framing itself and lets
wandb's own protobuf classes parse each record). Offline mode writes no wandb-summary.json or config.yaml, so the
history rows and the run record are what the tests compare. `run.finish()` returns before wandb's service has
written the file out (it closes the run's stream after), so the tests call `wandb.teardown()`, which waits for the
service to stop, before reading; a training process gets the same wait from wandb's exit hook.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from toolkit import __main__ as cli
from toolkit.data.prepare.synthetic import write_synth
from toolkit.errors import UserError
from toolkit.train.metrics import MetricsWriter
from toolkit.train.trainer import Trainer
from toolkit.train.wandb_log import WANDB_ID_FILE, WANDB_STEP

wandb = pytest.importorskip("wandb")
wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

WANDB_OWN = {"_step", "_runtime", "_timestamp"}  # keys wandb adds to every history row
BLOCK, HEADER, FILE_HEADER = 32768, 7, 7  # LevelDB log framing: 32 KiB blocks, 7-byte record headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of a .wandb file, each checked against its CRC-32 (over the type byte, then the payload)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    records, pending, pos = [], b"", FILE_HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) == crc, f"corrupt record at byte {pos} of {path}"
        pos += HEADER + length
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history_rows(records) -> list[dict[str, float]]:
    """The logged rows, wandb's own keys dropped; each key is one name (ours are flat already)."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
            rows.append({k: v for k, v in row.items() if k not in WANDB_OWN})
    return rows


def run_record(records) -> wandb_internal_pb2.RunRecord:
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 1
    return runs[0]


def recorded_config(records) -> dict:
    """The config the run record carries, wandb's own `_wandb` entry left out."""
    return {i.key: json.loads(i.value_json) for i in run_record(records).config.update if i.key != "_wandb"}


def offline_files(run: Path) -> list[Path]:
    """The .wandb file of each start of the run, in order of start (the folder names begin with its time)."""
    return [next(d.glob("run-*.wandb")) for d in sorted((run / "wandb").glob("offline-run-*"))]


def tensorboard_scalars(tb_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


@pytest.fixture(autouse=True)
def _wandb_home(tmp_path, monkeypatch):
    """wandb's settings, cache and staging folders inside tmp_path, no banner, and none of the machine sampling
    (system stats, host metadata, pip list) that only costs the tests time."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var, value in (("WANDB_SILENT", "true"), ("WANDB__DISABLE_STATS", "true"), ("WANDB__DISABLE_META", "true"),
                       ("WANDB__DISABLE_MACHINE_INFO", "true"), ("WANDB__SAVE_REQUIREMENTS", "false")):  # fmt: skip
        monkeypatch.setenv(var, value)


@pytest.fixture
def _keep_signal_handlers():
    """`train` in this process installs SIGTERM/SIGUSR1 handlers; put pytest's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth(str(out), samples=48, val_samples=8, seed=0)
    return out


def train_args(synth: Path, run: Path, *extra: str) -> list[str]:
    return [
        "train", "--config", "tiny", "backend.device=cpu", "backend.precision=fp32",
        f"model.tokenizer={synth / 'tokenizer'}", f"data.train_shards={synth / 'train'}",
        f"data.val_shards={synth / 'val'}", "data.num_workers=0", "data.shuffle_buffer=8", "train.batch_size=2",
        "train.max_training_steps=4", "train.eval_interval=0", "train.eval_max_batches=1",
        "train.checkpoint_interval=2", "train.export_best=false", f"train.run_dir={run}", "train.log_interval=1",
        "train.wandb_project=nanovlm-test", "train.wandb_mode=offline", *extra,
    ]  # fmt: skip


@pytest.fixture
def stopped_and_resumed(synth, tmp_path, _keep_signal_handlers) -> tuple[Path, dict]:
    """A 4-step run stopped after step 2 (stop_at_step) and resumed to the end; returns the run folder and the
    resolved config the first start saved (config.yaml is rewritten by the resume)."""
    run = tmp_path / "run"
    assert cli.main(train_args(synth, run, "train.stop_at_step=2")) == 0
    first_config = yaml.safe_load((run / "config.yaml").read_text())
    assert cli.main(train_args(synth, run)) == 0
    wandb.teardown()  # the .wandb files are complete once wandb's service has stopped
    return run, first_config


def test_wandb_holds_what_tensorboard_holds_and_resume_continues_the_same_run(stopped_and_resumed):
    run, first_config = stopped_and_resumed
    files = offline_files(run)
    assert [f.parent.parent for f in files] == [run / "wandb"] * 2  # one offline run per start, in the run folder
    starts = [wandb_records(f) for f in files]

    # The resume continued the W&B run the first start made: same id, the one run_dir/wandb_id names.
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    assert [run_record(r).run_id for r in starts] == [run_id, run_id]
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2

    # Each start attached its resolved config, as the run folder's config.yaml has it.
    assert recorded_config(starts[0]) == first_config
    assert recorded_config(starts[1]) == yaml.safe_load((run / "config.yaml").read_text())
    assert first_config["train"]["stop_at_step"] == 2  # the two starts' configs do differ

    rows = [row for records in starts for row in history_rows(records)]
    logged = {(key, int(row[WANDB_STEP])): value for row in rows for key, value in row.items() if key != WANDB_STEP}
    assert len(logged) == sum(len(row) - 1 for row in rows)  # no (key, step) logged twice
    assert sorted({step for _, step in logged}) == [1, 2, 3, 4]

    # The same flattened keys as TensorBoard's tags, at the same steps, with the same values (TB keeps float32).
    tb = tensorboard_scalars(run / "tb")
    assert {key for key, _ in logged} == {tag for tag, _ in tb}
    assert set(logged) == set(tb)
    for pair, value in logged.items():
        assert np.float32(value) == np.float32(tb[pair]) or (math.isnan(value) and math.isnan(tb[pair])), pair
    assert {"loss", "val_loss", "grad_norm"} <= {key for key, _ in logged}

    # Loss at full precision equals metrics.jsonl's.
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {step: value for (key, step), value in logged.items() if key == "loss"} == {
        m["step"]: m["loss"] for m in jsonl if "loss" in m
    }


def test_a_step_logged_late_keeps_its_own_step(tmp_path):
    """lmms-eval scores arrive after later steps were logged: W&B keeps them at the step they belong to."""
    writer = MetricsWriter(tmp_path, rank=0, total_steps=10, wandb_project="nanovlm-test", wandb_mode="offline")
    writer.log(5, {"loss": 1.5})
    writer.log(3, {"lmms": {"mme": {"score": 0.25}}})
    writer.close()
    wandb.teardown()
    (file,) = offline_files(tmp_path)
    records = wandb_records(file)
    assert history_rows(records) == [{WANDB_STEP: 5, "loss": 1.5}, {WANDB_STEP: 3, "lmms/mme/score": 0.25}]
    # Every metric is plotted against our step, which W&B itself treats as a hidden metric.
    metrics = {r.metric.glob_name or r.metric.name: r.metric for r in records if r.HasField("metric")}
    assert metrics["*"].step_metric == WANDB_STEP
    assert metrics[WANDB_STEP].options.hidden
    assert [r.run.resumed for r in records if r.HasField("run")] == [False]
    # wandb's own step counted the two calls in order: it never saw ours.
    steps = [json.loads(i.value_json) for r in records if r.HasField("history") for i in r.history.item
             if i.nested_key == ["_step"]]  # fmt: skip
    assert steps == [0, 1]


def test_a_start_from_step_0_drops_an_earlier_attempts_tensorboard_steps(tmp_path):
    """A restart before the first checkpoint (or train.resume=none into the folder) rewrote metrics.jsonl but left
    the dead attempt's events: TensorBoard showed steps 1-6 twice. A skipped step's `skipped` is a 0/1 scalar."""
    first = MetricsWriter(tmp_path, rank=0, total_steps=12)
    for step in range(1, 7):
        first.log(step, {"loss": float(step), "skipped": False})
    first.close()
    again = MetricsWriter(tmp_path, rank=0, total_steps=12)
    for step in range(1, 4):
        again.log(step, {"loss": 10.0 + step, "skipped": step == 2})
    again.close()
    scalars = tensorboard_scalars(tmp_path / "tb")
    assert {step: v for (key, step), v in scalars.items() if key == "loss"} == {1: 11.0, 2: 12.0, 3: 13.0}
    assert {step: v for (key, step), v in scalars.items() if key == "skipped"} == {1: 0.0, 2: 1.0, 3: 0.0}
    assert [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [11, 12, 13]


def test_missing_wandb_is_refused_before_step_1(synth, tmp_path, capsys, monkeypatch, _keep_signal_handlers):
    fits = []
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: fits.append(1) or [])
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails, find_spec finds nothing
    run = tmp_path / "run"
    assert cli.main(train_args(synth, run)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train.wandb_project=nanovlm-test" in last and "pip install 'nanovlm-scale[wandb]'" in last
    assert fits == [] and not run.exists()
    # wandb_mode=disabled turns W&B off without the package: the same run passes the checks.
    assert cli.main(train_args(synth, run, "train.wandb_mode=disabled")) == 0
    assert fits == [1] and not (run / "wandb").exists()


def test_writer_without_wandb_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"pip install 'nanovlm-scale\[wandb\]'"):
        MetricsWriter(tmp_path / "run", rank=0, total_steps=1, wandb_project="p", wandb_mode="offline")
    assert not (tmp_path / "run").exists()  # refused before any file is written
    # Other ranks never touch W&B, and without a project nothing asks for it.
    MetricsWriter(tmp_path / "other", rank=1, total_steps=1, wandb_project="p").close()
    MetricsWriter(tmp_path / "plain", rank=0, total_steps=1).close()
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["metrics.jsonl", "tb"]


def test_a_run_that_raised_is_finished_as_failed(tmp_path):
    """close() runs in a `finally`: an exception in flight finishes the W&B run with exit code 1, else 0."""
    for name, fails in (("ok", False), ("crashed", True)):
        writer = MetricsWriter(tmp_path / name, rank=0, total_steps=2, wandb_project="nanovlm-test",
                               wandb_mode="offline")  # fmt: skip
        with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
            try:
                writer.log(1, {"loss": 2.0})
                if fails:
                    raise RuntimeError("step 2 failed")
            finally:
                writer.close()
    wandb.teardown()
    exits = {name: [r.exit.exit_code for r in wandb_records(f) if r.HasField("exit")]
             for name in ("ok", "crashed") for f in offline_files(tmp_path / name)}  # fmt: skip
    assert exits == {"ok": [0], "crashed": [1]}


def test_the_console_line_shows_the_mean_loss_and_token_rate_since_the_last_line(tmp_path, monkeypatch, caplog):
    """It showed one step's loss and tokens/s every log_interval steps: one noisy step (on a busy machine 572
    tok/s beside neighbours at 15-20k). A skipped step's NaN is left out of the mean."""
    from toolkit.train import metrics

    clock = iter(range(100))
    monkeypatch.setattr(metrics.time, "monotonic", lambda: float(next(clock)))  # one second a call
    writer = MetricsWriter(tmp_path, rank=0, total_steps=10, log_interval=5)
    with caplog.at_level("INFO", logger=metrics.log.name):
        for step in range(1, 11):
            loss = float("nan") if step == 3 else float(step)
            writer.log(step, {"loss": loss, "tokens": 1000, "tokens_per_s": 99999.0})
    writer.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    # Steps 2-5 after step 1 (its time lies before the window); then 6-10. 1000 tokens a step, a second a step.
    assert [line.split(" eta")[0] for line in lines] == [
        "step 5/10 loss 3.6667 tok/s 1,000",
        "step 10/10 loss 8.0000 tok/s 1,000",
    ]
