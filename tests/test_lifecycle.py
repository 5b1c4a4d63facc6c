"""A run survives being stopped: exact resume, SIGKILL mid-save, SIGTERM, exports, metrics (issue 5)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import CPU_ENV, REFERENCE, torchrun
from toolkit.config import load_config, save_config
from toolkit.data.batch import Batch, ModelInputs
from toolkit.data.prepare.synthetic import write_synth
from toolkit.model import VisionLanguageModel
from toolkit.model.hub import load_nanovlm, nanovlm_state_dict, read_nanovlm_config, save_nanovlm
from toolkit.train.checkpoint import RunDir

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, **CPU_ENV}
BACKENDS = {
    "zero3": ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json"],
    "fsdp": ["backend.name=fsdp"],
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synth(str(out), samples=192, val_samples=24, seed=0)
    return out


def common(synth: Path, steps: int = 12) -> list[str]:
    return [
        "backend.precision=fp32",
        "backend.device=cpu",
        f"model.tokenizer={synth / 'tokenizer'}",
        f"data.train_shards={synth / 'train'}",
        f"data.val_shards={synth / 'val'}",
        "data.num_workers=1",
        "data.shuffle_buffer=32",
        "train.batch_size=2",
        f"train.max_training_steps={steps}",
        "train.checkpoint_interval=3",
        "train.eval_interval=0",
        "train.export_best=false",
        "train.log_interval=1",
    ]


def launch(args: list[str], *, nproc: int = 2, module: bool = True, timeout: int = 300) -> None:
    target = ["-m", "toolkit", "train", "--config", "tiny", *args] if module else args
    done = subprocess.run(torchrun(nproc, *target), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """One process of this checkout (`-m toolkit ...` or a script) with the CPU environment, output captured."""
    return subprocess.run([sys.executable, *args], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def train_steps(run: Path) -> list[dict]:
    return [m for m in metrics(run) if "loss" in m]


@pytest.mark.multiproc
@pytest.mark.parametrize("backend", ["zero3", "fsdp"])
def test_exact_resume_and_export(backend, synth, tmp_path):
    base = [*common(synth), *BACKENDS[backend]]
    launch([*base, f"train.run_dir={tmp_path / 'once'}"])
    # FSDP2 writes the interrupted run's checkpoints in the background (DCP async_save): step 3's is written while
    # steps 4-5 train, and a third run resumes from it.
    twice = [*base, *(["train.async_checkpoint=true"] if backend == "fsdp" else [])]
    launch([*twice, f"train.run_dir={tmp_path / 'twice'}", "train.stop_at_step=6"])
    assert RunDir(tmp_path / "twice").latest().name == "step_6"
    if backend == "fsdp":
        step_3 = tmp_path / "twice" / "checkpoints" / "step_3"
        launch([*twice, f"train.run_dir={tmp_path / 'thrice'}", f"train.resume={step_3}"])
        from_3, once = train_steps(tmp_path / "thrice"), train_steps(tmp_path / "once")
        assert [m["step"] for m in from_3] == list(range(4, 13))
        assert [m["loss"] for m in from_3] == [m["loss"] for m in once[3:]]
    launch([*twice, f"train.run_dir={tmp_path / 'twice'}"])  # train.resume=auto
    once, twice = train_steps(tmp_path / "once"), train_steps(tmp_path / "twice")
    assert [m["step"] for m in twice] == list(range(1, 13))
    assert [m["loss"] for m in twice] == [m["loss"] for m in once]  # bit-identical in fp32
    assert [m["batch_digest"] for m in twice] == [m["batch_digest"] for m in once]  # the same batches
    assert [m["lr"] for m in twice] == [m["lr"] for m in once]
    _check_export(tmp_path / "once", tmp_path, backend)


def _check_export(run: Path, tmp_path: Path, backend: str) -> None:
    """The export (offline, from the sharded checkpoint) computes what the live sharded model computes."""
    live = tmp_path / "live.pt"
    launch(["tests/lifecycle_worker.py", "live", str(run), str(live)], module=False)
    exported = tmp_path / "export"
    done = python("-m", "toolkit", "export", str(run), str(exported))
    assert done.returncode == 0, done.stderr[-3000:]
    # DeepSpeed's reader unpickles its files: the export says so (issue 12); the toolkit's own readers need not.
    assert ("DeepSpeed reads its checkpoint files with Python's pickle" in done.stderr) == (backend == "zero3")
    want = torch.load(live, weights_only=False)
    model = VisionLanguageModel.from_pretrained(str(exported)).eval()
    probe = want["probe"]
    with torch.no_grad():
        got = model(**probe.inputs.as_kwargs(), return_logits=True)
    assert (got.logits - want["logits"]).abs().max().item() <= 1e-5
    fresh = nanovlm_state_dict(VisionLanguageModel(model.cfg))
    from safetensors import safe_open

    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == {  # noqa: SIM118
            k: tuple(v.shape) for k, v in fresh.items()
        }
    if backend == "fsdp":  # 2 ranks -> 1 rank: DCP reshards, the next batch's loss is the same
        one = tmp_path / "one.pt"
        launch(["tests/lifecycle_worker.py", "live", str(run), str(one)], module=False, nproc=1)
        assert torch.load(one, weights_only=False)["loss"].item() == pytest.approx(want["loss"].item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- train.init_from


def probe_batch(model_cfg) -> Batch:
    """Two packed rows, one with an image tile's tokens, and the tile: what the step-0 logits are compared on."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, model_cfg.lm_base_vocab_size, (2, 24), generator=gen)
    ids[0, 1 : 1 + model_cfg.mp_image_token_length] = model_cfg.lm_base_vocab_size  # the image token's id
    labels = torch.roll(ids, -1, dims=1)
    pos = torch.stack([torch.cat([torch.arange(10), torch.arange(14)]), torch.arange(24)])
    side = model_cfg.vit_img_size
    return Batch.of(ModelInputs(ids, labels, pos, torch.rand(1, 3, side, side, generator=gen)))


@pytest.fixture(scope="module")
def init_runs(synth, tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """Run configs that start from a nanoVLM-format folder (nanoVLM's own fixture when ../shared is there, and a
    toolkit export of a seeded tiny model), each with its probe batch and that folder's own logits on it."""
    root = tmp_path_factory.mktemp("init")
    folders = {}
    if (REFERENCE / "checkpoint" / "model.safetensors").exists():
        folders["nanovlm"] = REFERENCE / "checkpoint"
    model_cfg = load_config("tiny", [f"model.tokenizer={synth / 'tokenizer'}"]).model
    torch.manual_seed(3)
    save_nanovlm(VisionLanguageModel(model_cfg), root / "export", tokenizer_dir=str(synth / "tokenizer"))
    folders["export"] = root / "export"
    runs = {}
    for name, folder in folders.items():
        cfg = load_config("tiny", [*common(synth), f"train.init_from={folder}", f"train.run_dir={root / name}"])
        cfg.model = read_nanovlm_config(folder)
        probe = probe_batch(cfg.model)
        with torch.no_grad():
            want = load_nanovlm(folder).eval()(**probe.inputs.as_kwargs(), return_logits=True).logits
        save_config(cfg, root / f"{name}.yaml")
        torch.save(probe, root / f"{name}.yaml.probe.pt")
        runs[name] = (root / f"{name}.yaml", want)
    return runs


def _init_logits(configs: list[Path], tmp_path: Path, nproc: int) -> dict[str, torch.Tensor]:
    out = tmp_path / f"init{nproc}.pt"
    target = ["tests/lifecycle_worker.py", "init", str(out), *map(str, configs)]
    if nproc == 1:
        done = python(*target)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        launch(target, module=False, nproc=nproc)
    return torch.load(out, weights_only=False)


@pytest.mark.multiproc
def test_init_from_starts_every_backend_from_the_folders_weights(init_runs, tmp_path):
    """train.init_from a nanoVLM folder: the step-0 model computes that folder's logits (1e-6, fp32) under single,
    and on 2 ranks under FSDP2 (sharded after loading) and ZeRO-3 (partitioned after loading)."""
    configs = [path for path, _ in init_runs.values()]
    got = {**_init_logits(configs, tmp_path, 1), **_init_logits(configs, tmp_path, 2)}
    for name, (path, want) in init_runs.items():
        for backend in ("single", "fsdp", "zero3"):
            diff = (got[f"{path.stem}/{backend}"] - want).abs().max().item()
            assert diff <= 1e-6, (name, backend, diff)
    fresh = VisionLanguageModel(read_nanovlm_config(init_runs["export"][0].parent / "export"))
    probe = torch.load(f"{init_runs['export'][0]}.probe.pt", weights_only=False)
    with torch.no_grad():  # a control: a model that did not load the folder computes something else
        assert (
            fresh.eval()(**probe.inputs.as_kwargs(), return_logits=True).logits - init_runs["export"][1]
        ).abs().max() > 1e-2


def _fake_checkpoint(run: Path, config_text: str) -> Path:
    """A run folder whose `latest` names a complete-looking step_1 (enough for resume's resolution)."""
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "checkpoints" / "step_1" / "trainer.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_1")
    (run / "config.yaml").write_text(config_text)
    return run / "checkpoints" / "step_1"


def test_init_from_refuses_a_resume_and_another_architecture(init_runs, synth, tmp_path, capsys):
    """Refused before anything starts, naming what to drop; a restart of a stage that began from the same folder
    is the one mix that is allowed (it resumes)."""
    from toolkit import __main__ as cli
    from toolkit.train.run import check_init_and_resume

    path, _ = init_runs["export"]
    folder = path.parent / "export"
    other = _fake_checkpoint(tmp_path / "other", "train:\n  init_from: ''\n")
    cases = {
        f"train.resume={other}": "drop one",
        "model.lm_hidden_dim=32": "another architecture",
        f"model.vision_backbone={folder}": "would be overwritten",  # a folder with config.json + weights
    }
    for override, message in cases.items():
        assert cli.main(["train", "--config", str(path), f"train.run_dir={tmp_path / 'run'}", override]) == 2
        assert message in capsys.readouterr().err, override
    assert cli.main(["train", "--config", str(path), f"train.run_dir={tmp_path / 'other'}"]) == 2
    assert "did not start from it" in capsys.readouterr().err
    same = tmp_path / "same"
    resume_from = _fake_checkpoint(same, f"train:\n  init_from: {folder}\n")
    cfg = load_config(str(path), [f"train.run_dir={same}"])
    check_init_and_resume(cfg, RunDir(same), resume_from)  # a restart of this stage: resumes, no error


def test_sigkill_during_checkpoint_keeps_previous(synth, tmp_path):
    args = [*common(synth, steps=8), "backend.name=single", "data.num_workers=0"]
    run = tmp_path / "killed"
    died = python("tests/lifecycle_worker.py", "kill-at", str(run), "6", *args)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert (run / "checkpoints" / "step_6" / "rank_0.pt").exists()  # half-written: shards and rank state, no commit
    assert RunDir(run).latest().name == "step_3"
    before = train_steps(run)
    resumed = python("-m", "toolkit", "train", "--config", "tiny", *args, f"train.run_dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = train_steps(run)
    # Step 6 died in its checkpoint (before it was logged); steps 4-6 are redone identically and logged once.
    assert [m["step"] for m in before] == [1, 2, 3, 4, 5]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [m["loss"] for m in steps[:5]] == [m["loss"] for m in before]
    assert RunDir(run).latest().name == "step_8"


def test_sigkill_during_an_async_checkpoint_keeps_the_previous_and_resumes_exactly(synth, tmp_path):
    """train.async_checkpoint: the writer thread dies half-way through step 6's state file while training goes on;
    `latest` still names step 3 (itself written in the background during steps 4-5), and the resumed run's
    steps equal an uninterrupted synchronous run's, bit for bit."""
    args = [*common(synth, steps=8), "backend.name=single", "data.num_workers=0"]
    once = python("-m", "toolkit", "train", "--config", "tiny", *args, f"train.run_dir={tmp_path / 'once'}")
    assert once.returncode == 0, once.stderr[-3000:]
    run = tmp_path / "killed"
    died = python("tests/lifecycle_worker.py", "kill-async-at", str(run), "6", *args)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert (run / "checkpoints" / "step_6" / "rank_0.pt").exists()  # rank state is written at once; no commit
    assert RunDir(run).latest().name == "step_3"
    resumed = python("-m", "toolkit", "train", "--config", "tiny", *args, "train.async_checkpoint=true",
                     f"train.run_dir={run}")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_3 at step 3" in resumed.stderr
    steps, reference = train_steps(run), train_steps(tmp_path / "once")
    assert [m["step"] for m in steps] == list(range(1, 9))
    assert [m["loss"] for m in steps] == [m["loss"] for m in reference]
    assert [m["batch_digest"] for m in steps] == [m["batch_digest"] for m in reference]
    assert RunDir(run).latest().name == "step_8"


def test_sigterm_checkpoints_the_current_step_and_exits_zero(synth, tmp_path):
    run = tmp_path / "term"
    args = [
        *common(synth, steps=400),
        "backend.name=single",
        "data.num_workers=0",
        "train.checkpoint_interval=0",
        "train.eval_interval=2",
        "train.eval_max_batches=2",
        "train.eval_accuracy_samples=4",
        f"train.run_dir={run}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolkit", "train", "--config", "tiny", *args],
        env=ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() or len(train_steps(run)) < 4:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never reached step 4"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    last = train_steps(run)[-1]["step"]
    assert RunDir(run).latest().name == f"step_{last}"
    resume = [*args[:-1], f"train.run_dir={run}", f"train.stop_at_step={last + 2}"]
    again = python("-m", "toolkit", "train", "--config", "tiny", *resume)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [m["step"] for m in train_steps(run)][-3:] == [last, last + 1, last + 2]
    _check_metrics(run)
    # The steps after the stop are those of a run never stopped (a resume that kept the step counter but not the
    # optimizer, RNG or data position numbered its steps alike).
    whole = tmp_path / "whole"
    done = python("-m", "toolkit", "train", "--config", "tiny", *args[:-1], f"train.run_dir={whole}",
                  f"train.stop_at_step={last + 2}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    resumed, uninterrupted = ([(m["loss"], m["batch_digest"]) for m in train_steps(r)[-3:]] for r in (run, whole))
    assert resumed == uninterrupted


def test_a_stop_asked_for_during_a_checkpoint_stops_at_that_checkpoint(synth, tmp_path, monkeypatch, caplog):
    """A preemption signal that arrived while step 2 was being saved cost one more step and a second full
    checkpoint (of step 3) before the run stopped: minutes on a large model, where torchrun's SIGKILL follows its
    SIGTERM after 30 s. The ranks now agree on a stop right after a checkpoint."""
    from toolkit import __main__ as cli
    from toolkit.train import run as run_mod

    saved, real = [], run_mod.save_checkpoint

    def save_then_signal(run, step, **kw):
        real(run, step, **kw)
        saved.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as if it came during the write: the handler runs now

    monkeypatch.setattr(run_mod, "save_checkpoint", save_then_signal)
    run = tmp_path / "stop"
    args = [*common(synth, steps=6), "backend.name=single", "data.num_workers=0", "train.checkpoint_interval=2",
            f"train.run_dir={run}"]  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", "--config", "tiny", *args]) == 0
    assert saved == [2] and RunDir(run).latest().name == "step_2"
    assert [m["step"] for m in train_steps(run)] == [1, 2]
    assert "stopping after step 2: SIGTERM received" in caplog.text


def test_a_stop_file_left_by_an_earlier_job_is_named(synth, tmp_path, monkeypatch, caplog):
    """A stale NANOVLM_STOP_FILE stopped every run after one step, saying only "a stop was requested"."""
    from toolkit import __main__ as cli

    stale = tmp_path / "job.stop"
    stale.touch()
    monkeypatch.setenv("NANOVLM_STOP_FILE", str(stale))
    args = [*common(synth, steps=6), "backend.name=single", "data.num_workers=0", f"train.run_dir={tmp_path / 'r'}"]
    with caplog.at_level(logging.INFO):
        assert cli.main(["train", "--config", "tiny", *args]) == 0
    assert f"NANOVLM_STOP_FILE={stale} exists before the first step" in caplog.text
    assert f"stopping after step 2: the stop file {stale} (NANOVLM_STOP_FILE) exists" in caplog.text  # seen after 1


def test_the_stop_file_is_looked_for_once_a_second_by_one_rank_a_node(tmp_path, monkeypatch):
    """A stat of the stop file by every rank at every step was 5,000 a second on the metadata server at 512 ranks
    and 10 steps a second. Local rank 0 looks, at most every STOP_FILE_EVERY_S, and at once after a checkpoint; its
    request reaches the other ranks with the step's loss all-reduce."""
    from types import SimpleNamespace

    from toolkit.config import Config
    from toolkit.dist import DistEnv
    from toolkit.train import run as run_mod

    stop = tmp_path / "job.stop"
    monkeypatch.setenv("NANOVLM_STOP_FILE", str(stop))
    looks, real_stat = [], os.stat

    def counting_stat(path, *args, **kwargs):
        if str(path) == str(stop):
            looks.append(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    asked: list[str] = []
    trainer = SimpleNamespace(request_stop=asked.append)

    def lifecycle(local_rank: int) -> run_mod.Lifecycle:
        env = DistEnv(rank=local_rank, local_rank=local_rank, world_size=2, local_world_size=2)
        backend = SimpleNamespace(env=env, device=torch.device("cpu"))
        return run_mod.Lifecycle(Config(), RunDir(tmp_path / "run"), backend=backend, loader=None, tokenizer=None,
                                 writer=None)  # fmt: skip

    first = lifecycle(0)
    looks.clear()  # the look for a leftover file at start
    for _ in range(100):  # 100 steps within the second
        first.watch_stop_file(trainer)
    assert len(looks) == 1  # was 100
    stop.touch()
    first.watch_stop_file(trainer)
    assert asked == [] and len(looks) == 1  # not yet: looked less than a second ago
    first.watch_stop_file(trainer, now=True)  # after a checkpoint
    assert asked == [f"the stop file {stop} (NANOVLM_STOP_FILE) exists"] and len(looks) == 2
    first.stop_looked -= run_mod.STOP_FILE_EVERY_S  # a second later
    first.watch_stop_file(trainer)
    assert len(asked) == 2 and len(looks) == 3
    other = lifecycle(1)
    for _ in range(100):
        other.watch_stop_file(trainer, now=True)
    assert len(looks) == 3 and len(asked) == 2  # was 101 looks more: local rank 1 never looks


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (loader workers, the fork server, multiprocessing's resource tracker)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):  # gone meanwhile
            continue
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        kids = [p for p, parent in parents.items() if parent == pid]
        found += kids
        todo += kids
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the loader's processes in /proc (Linux)")
def test_a_job_wide_stop_signal_leaves_the_loaders_processes_to_the_rank(synth, tmp_path):
    """SLURM's preemption signal reaches every process of the job. Loader workers, the fork server and the resource
    tracker died of SIGTERM / SIGUSR1, so the rank's next batch failed ("DataLoader worker exited unexpectedly")
    before its stop checkpoint. Here they get both signals while the run goes on; it trains on, and the rank's
    own SIGTERM then stops it at a checkpoint of the step it reached, exit 0."""
    run = tmp_path / "group"
    args = [*common(synth, steps=400), "backend.name=single", "data.num_workers=2", "data.prefetch_factor=1",
            "train.checkpoint_interval=0", f"train.run_dir={run}"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "train", "--config", "tiny", *args], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() or len(train_steps(run)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    helpers = _descendants(proc.pid)
    assert len(helpers) >= 3, helpers  # two workers and at least the resource tracker
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        for pid in helpers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    reached = len(train_steps(run))
    while len(train_steps(run)) < reached + 4:  # it trains on: new batches come from the same workers
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    assert all(Path(f"/proc/{pid}").exists() for pid in helpers)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert RunDir(run).latest().name == f"step_{train_steps(run)[-1]['step']}"


@pytest.mark.multiproc
def test_a_second_run_on_a_run_folder_in_use_is_refused_on_every_rank(synth, tmp_path):
    """Two runs on one train.run_dir both trained (every step twice in metrics.jsonl, one deleting the other's
    checkpoint folder). A second run, on one rank or on two, is refused in one line naming the first; once the
    first has ended (here: SIGKILL, no clean-up) the folder is free again."""
    run = tmp_path / "busy"
    args = [*common(synth, steps=400), "backend.name=single", "data.num_workers=0", "train.checkpoint_interval=0",
            f"train.run_dir={run}"]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "toolkit", "train", "--config", "tiny", *args], env=ENV,
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() or len(train_steps(run)) < 2:
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        second = python("-m", "toolkit", "train", "--config", "tiny", *args)
        assert second.returncode == 2, second.stderr[-3000:]
        line = second.stderr.strip().splitlines()[-1]
        assert "is in use by another run" in line and f"pid {first.pid}" in line, line
        two = subprocess.run(torchrun(2, "-m", "toolkit", "train", "--config", "tiny", *args[:-2],
                                      "backend.name=ddp", f"train.run_dir={run}"),
                             env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert two.returncode != 0 and two.stderr.count("is in use by another run") == 2, two.stderr[-3000:]
        assert first.poll() is None
    finally:
        first.kill()
        first.communicate()
    steps = [m["step"] for m in train_steps(run)]
    assert steps == sorted(set(steps))  # no step logged twice
    assert python("-m", "toolkit", "train", "--config", "tiny", *args[:-1], f"train.run_dir={run}",
                  "train.max_training_steps=1").returncode == 0  # fmt: skip


def _check_metrics(run: Path) -> None:
    """metrics.jsonl and the TensorBoard event file carry the same scalars (read back with tensorboard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = metrics(run)
    step = next(m for m in lines if "val_loss" in m)
    for key in (
        "loss",
        "grad_norm",
        "tokens_per_s",
        "data_wait_share",
        "fill_rate",
        "images_per_pack",
        "peak_memory_gb",
    ):
        assert isinstance(step[key], float), key
    assert set(step["lr"]) == {"mp", "vision", "language"}
    assert step["samples"]["read"] > 0 and step["samples"]["skipped"] == {}
    assert set(step["val_accuracy"]) >= {"all"}
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "loss",
        "grad_norm",
        "lr/mp",
        "lr/vision",
        "lr/language",
        "tokens_per_s",
        "val_loss",
        "val_accuracy/all",
        "fill_rate",
        "samples/read",
    } <= tags
    logged = {e.step: e.value for e in events.Scalars("val_loss")}
    assert logged[step["step"]] == pytest.approx(step["val_loss"], rel=1e-6)
