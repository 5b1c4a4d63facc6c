"""Benchmark targets checked on their pure parts (timings stay in `python -m toolkit bench`)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import CPU_ENV
from toolkit import bench
from toolkit.bench import gpu, overhead, pipeline
from toolkit.bench.packing import measure, nanovlm_knapsack, ours, vlm_length_mix
from toolkit.data.collate import Encoded
from toolkit.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("buffer_packs", "target"), [(8, 0.985), (32, 0.995)])
def test_pack_stream_fill_target_on_vlm_mix(buffer_packs, target):
    items = vlm_length_mix(20_000, seed=1)
    kw = {"capacity": 4096, "max_images": 18, "buffer_packs": buffer_packs}
    mine = measure(ours, items, **kw)  # measure() also asserts nothing was lost or duplicated
    base = measure(nanovlm_knapsack, items, **kw)
    assert mine["fill"] >= target
    # The baseline behaves as nanoVLM's balanced knapsack is described to (about 58% at 8 packs, 85% at 32).
    expected_base = {8: (0.52, 0.64), 32: (0.80, 0.90)}[buffer_packs]
    assert expected_base[0] < base["fill"] < expected_base[1]


# -- pipeline ---------------------------------------------------------------------------------------------------------


def test_knapsack_rows_packs_real_samples_exactly_as_the_knapsack_packs_their_shapes():
    items = vlm_length_mix(600, seed=3)
    samples = [
        Encoded([0] * t, [-100] * t, torch.empty(0, 3, 1, 1), images=i, key=str(k)) for k, (t, i) in enumerate(items)
    ]
    kw = {"capacity": 4096, "max_images": 18, "buffer_packs": 8}
    rows = list(pipeline.knapsack_rows(samples, **kw))
    assert sorted(s.key for row in rows for s in row) == sorted(s.key for s in samples)  # each sample exactly once
    assert [[(len(s.input_ids), s.images) for s in row] for row in rows] == list(nanovlm_knapsack(items, **kw))


@pytest.fixture(scope="module")
def synth_pipeline(tmp_path_factory):
    from toolkit.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("pipeline")
    cfg = pipeline.make_data(root / "synth", samples=48, seed=0)
    tok = load_tokenizer(cfg.model)
    rows = pipeline.read_rows(cfg.data.train_shards)
    return cfg, tok, rows, pipeline.build_table(rows, root / "table")


def test_both_pipelines_deliver_every_sample_of_the_same_data(synth_pipeline):
    cfg, tok, rows, table = synth_pipeline
    assert len(rows) == len(table) == 48
    with Image.open(io.BytesIO(rows[5]["images"][0])) as img:
        expected = np.asarray(img.convert("RGB"))
    assert np.array_equal(np.asarray(table[5]["images"][0].convert("RGB")), expected)  # same pixels, datasets-decoded
    assert table[5]["texts"] == rows[5]["texts"]
    assert pipeline.toolkit_pass(cfg, tok) == pipeline.nanovlm_pass(table.shuffle(seed=1), cfg, tok) == 48


def test_stage_shares_account_for_the_whole_end_to_end_time(synth_pipeline):
    cfg, tok, _, table = synth_pipeline
    stages = pipeline.stage_costs(cfg, tok, table, repeats=1)
    assert set(stages) == {*pipeline.TOOLKIT_STAGES, *pipeline.NANOVLM_STAGES}
    assert all(v > 0 for v in stages.values())
    # The table's arithmetic on stage times given by hand: each share is its stage's seconds over its pipeline's
    # end-to-end seconds, and 'other' is what the stages leave (0.2 s of toolkit's 2 s, 0.9 of nanovlm's 3).
    given = {stage: 0.3 for stage in pipeline.TOOLKIT_STAGES} | {stage: 0.6 for stage in pipeline.NANOVLM_STAGES}
    given["resize/tile"] = 0.3  # one stage both pipelines have: timed once
    timed = {"toolkit": {"cpu": 2.0, "samples": 48}, "nanovlm": {"cpu": 3.0, "samples": 48}}
    rows = {(r["pipeline"], r["stage"]): r for r in pipeline.table_rows(timed, given)}
    assert rows[("toolkit", "end to end")]["samples_per_s"] == 24.0 and rows[("nanovlm", "end to end")]["share"] == 1
    assert rows[("toolkit", "image decode")]["share"] == pytest.approx(0.15)
    assert rows[("toolkit", "image decode")]["us_per_sample"] == pytest.approx(0.3e6 / 48)
    assert rows[("nanovlm", "resize/tile")]["share"] == pytest.approx(0.1)
    assert rows[("toolkit", "other (loop, buffers, copies)")]["share"] == pytest.approx(0.1)
    assert rows[("nanovlm", "other (loop, buffers, copies)")]["share"] == pytest.approx((3.0 - 0.3 - 3 * 0.6) / 3.0)


# -- overhead ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_steps", "warmup_ratio"), [(100, 0.03), (10, 0.3), (7, 0.2)])
def test_plain_loop_schedule_is_the_toolkit_schedule(max_steps, warmup_ratio):
    from toolkit.train.schedule import WarmupCosine

    ours = WarmupCosine(max_steps, warmup_ratio=warmup_ratio, min_lr_ratio=0.1)
    plain = overhead.warmup_cosine(max_steps, warmup_ratio, 0.1)
    assert [plain(s) for s in range(max_steps + 3)] == pytest.approx([ours(s) for s in range(max_steps + 3)])


@pytest.fixture
def one_thread():
    """Two torch threads on a shared 2-core box run several times slower than one; the result does not change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_toolkit_step_and_plain_loop_do_the_same_work(tmp_path, one_thread):
    cfg, batches = overhead.loader_batches(3, seed=0, tmp=tmp_path)
    cfg.train.max_training_steps = 6
    ours, our_model = overhead.toolkit_step(cfg, seed=0)
    plain, plain_model = overhead.plain_step(cfg, seed=0)
    for batch in batches * 2:  # 6 steps: warmup, peak and decay of the LR, clipping on the first ones
        assert ours(batch) == pytest.approx(plain(batch), rel=1e-5)
    for (name, a), b in zip(our_model.named_parameters(), plain_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_interleave_alternates_blocks_on_the_same_batch_sequence():
    seen: dict[str, list[int]] = {"a": [], "b": []}
    order: list[str] = []

    def recorder(name):
        def step(batch):
            seen[name].append(batch["i"])
            order.append(name)
            return 0.0

        return step

    batches = [{"i": i} for i in range(5)]
    timings = overhead.interleave({"a": recorder("a"), "b": recorder("b")}, batches, blocks=3, block=2, warmup=1)
    assert seen["a"] == seen["b"] == [0, 1, 2, 3, 4, 0, 1]  # warm-up step, then 3 blocks of 2, cycling the batches
    assert {k: len(v) for k, v in timings.items()} == {"a": 6, "b": 6}  # the warm-up step is not kept
    assert order == ["b", "a", "a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]


def test_host_reads_count_device_values_read_by_the_host_and_nothing_else():
    """On the CPU the counter must tell the would-be device tensors from host ones: host arithmetic, reads of what
    `.cpu()` returned and dtype changes are free; reads of device values and value-sized outputs are syncs."""
    device = torch.device("cpu")
    weight = torch.nn.Parameter(torch.ones(4))  # made before counting, like the model: on the device
    with overhead.HostReads(device) as mode:
        counts = torch.zeros(3)  # a host vector, as the trainer builds its counts
        float(counts[0] + 1)  # host arithmetic: free
        on_device = counts.to(device)  # the backend's own device object: moved to the device
        float(on_device.sum().double())  # 1: __float__ of a device value (a dtype change stays on the device)
        back = on_device.cpu()  # 2: the copy to the host ...
        int(back[1]), back.tolist()  # ... and reads of the copy are free
        weight[weight > 0]  # 3: a boolean mask's output size needs the count of True
        made_there = torch.zeros(2, device=on_device.device)  # factories with the device of a device tensor
        bool(made_there.any())  # 4
    assert sorted(op for op, _ in mode.sites.elements()) == ["__bool__", "__float__", "__getitem__", "cpu"]
    assert all(site.startswith("tests/test_bench.py:") for _, site in mode.sites)


def test_a_step_reads_the_device_once_alone_and_the_model_reads_nothing(one_thread):
    """One read a step on one rank: the loss with the gradient norm (and the stop flag and rank times) in one
    transfer after the last backward. The clip reads nothing (its norm came with the loss: it read it once more,
    and twice before that); the counts stay on the host (with ranks they go through the device and are read with
    the loss: the next test). The model reads nothing back, since the
    backend hands it the image and target positions found on the host."""
    from toolkit.bench.memory import synthetic_batch
    from toolkit.config import load_config

    cfg = load_config("tiny", ["backend.device=cpu", "backend.precision=fp32"])
    trainer = overhead.toolkit_trainer(cfg, seed=0)
    reads = overhead.count_host_reads(trainer, [synthetic_batch(cfg.model, seed=s) for s in range(2)])
    assert [site.split(" (")[1] for site in reads] == ["_read_step)"], reads
    assert sum(reads.values()) == 1, reads
    assert trainer.history[-1]["grad_norm"] > 0  # the norm read with the loss is the one reported


def test_paired_ratio_is_the_median_of_back_to_back_block_ratios():
    base = [1.0, 3.0, 2.0, 2.0, 5.0, 7.0]  # blocks of 2: medians 2, 2, 6 (the load moved between blocks)
    ours = [2.4, 2.4, 2.0, 2.2, 6.0, 6.0]  # medians 2.4, 2.1, 6: ratios 1.2, 1.05, 1.0
    stats = {"single": (base, base, []), "backend": (ours, [2 * x for x in ours], [])}
    wall, cpu = overhead.paired_ratios(stats, block=2)
    assert wall == pytest.approx(1.05) and cpu == pytest.approx(2.1)


def test_narrow_450m_keeps_the_presets_structure_and_the_backend_asked_for():
    from toolkit.config import load_config

    full = load_config("nanovlm-450m", []).model
    for backend, label in (("ddp", "ddp"), ("fsdp", "fsdp"), ("deepspeed", "zero2")):
        cfg = overhead.narrow_config(backend)
        assert (cfg.backend.name, overhead.backend_label(cfg), cfg.backend.precision) == (backend, label, "fp32")
        assert (cfg.model.vit_n_blocks, cfg.model.lm_n_blocks) == (full.vit_n_blocks, full.lm_n_blocks) == (12, 32)
        assert cfg.model.lm_hidden_dim == 48 and not cfg.train.compile and cfg.train.gradient_accumulation_steps == 1
    cfg = overhead.narrow_config("deepspeed", ["backend.ds_config=ds_configs/zero3.json"])
    assert overhead.backend_label(cfg) == "zero3"
    with pytest.raises(ValueError, match="choose one of ddp, fsdp, deepspeed"):
        overhead.narrow_config("zero9")


def test_overrides_may_follow_the_world_sizes(monkeypatch):
    """`--world 2 backend.x=y`: the override is an override (a list-valued --world took it for a world size)."""
    import toolkit.bench

    seen = {}
    monkeypatch.setattr(toolkit.bench, "run", lambda name, **kw: seen.update(kw, name=name) or {})
    override = "backend.fsdp_reshard_after_forward=false"
    assert overhead.main(["--backend", "fsdp", "--world", "1,2", override, "--profile"]) == 0
    assert (seen["name"], seen["worlds"], seen["overrides"], seen["profile_steps"]) == (
        "overhead",
        (1, 2),
        [override],
        3,
    )
    assert seen["label"] == "overhead_fsdp+fsdp_reshard_after_forward=false"  # not the plain run's overhead_fsdp
    overhead.main(["--backend", "deepspeed", "backend.ds_config=ds_configs/zero3.json", "train.max_grad_norm=0.5"])
    assert seen["label"] == "overhead_zero3+max_grad_norm=0.5"
    with pytest.raises(SystemExit):
        overhead.main(["--backend", "fsdp", "--world", "0"])


def test_backend_overhead_takes_its_block_sizes_and_the_plain_comparison_refuses_them(monkeypatch, capsys):
    """--blocks/--block were dropped between the CLI and run_backend (18 steps whatever was asked), and without
    --backend --world/--blocks/--block were ignored without a word."""
    seen = {}
    monkeypatch.setattr(overhead, "run_backend", lambda backend, **kw: seen.update(kw, backend=backend) or {})
    overhead.run(backend="ddp", blocks=1, block=2, worlds=(1,))
    assert (seen["blocks"], seen["block"], seen["worlds"]) == (1, 2, (1,))
    seen.clear()
    overhead.run(backend="ddp")
    assert "blocks" not in seen and "block" not in seen  # run_backend's own defaults
    for extra in (["--world", "1"], ["--blocks", "2"], ["--block", "2"]):
        with pytest.raises(SystemExit):
            overhead.main(extra)
        assert f"{extra[0]}: only with --backend" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        overhead.main(["--backend", "ddp", "--blocks", "0"])


@pytest.fixture(scope="module")
def fsdp_two_ranks() -> dict:
    """One short `bench overhead --backend fsdp --world 2 --profile` launch, shared by the tests below."""
    return overhead.run_backend("fsdp", worlds=(2,), blocks=1, block=1, warmup=0, n_batches=1, read_steps=2,
                                profile_steps=1, timeout_s=300)  # fmt: skip


def test_profile_on_two_ranks_finishes_and_keeps_rank_0s_profile(fsdp_two_ranks):
    """`--profile` on 2 ranks: the profiled steps hold collectives, so every rank must run them (rank 0 alone
    did, and the launch hung in the other rank's barrier until torchrun's timeout)."""
    assert "_fsdp_param_group.py" in fsdp_two_ranks["profile_rank0"]["x2"]  # FSDP's own hooks were profiled
    assert "foreach_reduce" in fsdp_two_ranks["profile_rank0"]["x2"]  # and its reduce-scatter, a collective


def test_a_step_on_two_ranks_reads_the_device_once(fsdp_two_ranks):
    """With ranks, the counts go through the device for their all-reduce and used to come back before the first
    forward: two reads a step. A caller whose batches cannot run out (train_step here, the toolkit's endless
    training loader in a run) has them read with the loss, after the backward: one."""
    reads = fsdp_two_ranks["host_reads"]
    for loop in ("single x2", "fsdp x2"):
        assert sum(reads[loop].values()) == 1, reads[loop]
        assert [site.split(" (")[1] for site in reads[loop]] == ["_read_step)"], reads[loop]


# -- gpu --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fit_up_to", "limit"), [(0, 32), (1, 32), (5, 32), (8, 32), (13, 32), (32, 32), (50, 20)])
def test_largest_batch_search_finds_the_largest_size_that_fits(fit_up_to, limit):
    """Doubling, then bisection: the answer for every threshold, each size tried at most once, and about
    2 log2(answer) tries; an out-of-memory error is a 'no', any other error is raised."""
    from toolkit.bench import largest_batch

    class FakeOOM(Exception):
        pass

    released = []

    def measure(rows):
        if rows > fit_up_to:
            raise FakeOOM(rows)
        return {"tokens_per_s": 100.0 * rows}

    row = largest_batch.search_rows("v", measure, limit=limit, oom=FakeOOM, release=lambda: released.append(1))
    want = min(fit_up_to, limit)
    assert row["batch_rows"] == want
    assert len(set(row["tried"])) == len(row["tried"]) == len(released)
    assert len(row["tried"]) <= 2 * max(want, 1).bit_length() + 1
    if want:
        assert row["tokens_per_s"] == 100.0 * want and row["status"].startswith(f"ok: largest micro-batch {want}")
    else:
        assert row["status"] == "failed: one row does not fit" and row["tried"] == [1]
    with pytest.raises(ValueError, match="boom"):
        largest_batch.search_rows("v", lambda rows: (_ for _ in ()).throw(ValueError("boom")), limit=4, oom=FakeOOM)


def test_gpu_bench_skips_cleanly_without_cuda(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = bench.run("gpu", out_dir=tmp_path)
    assert result["rows"] == [{"variant": "-", "status": "skipped: needs CUDA (no GPU visible to torch)"}]
    assert "skipped: needs CUDA" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu.json").read_text())["headline"] == {"skipped": "needs CUDA"}
    measured = {"name": "gpu", "rows": [{"variant": "single"}], "headline": {"single_tokens_per_s": 1.0}}
    (tmp_path / "gpu.json").write_text(json.dumps(measured))
    bench.run("gpu", out_dir=tmp_path)  # a login node's `make bench` replaced the GPU's results
    assert json.loads((tmp_path / "gpu.json").read_text()) == measured and "kept" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"--calibrate needs CUDA.*cost.json not written"):
        bench.run("gpu", out_dir=tmp_path, calibrate=tmp_path / "cost.json")  # exited 0 without the file


def test_bench_gpu_refuses_bad_options_in_one_line(capsys):
    for bad in (["--steps", "0"], ["--warmup", "-1"], ["--variants", "bogus"], ["--profile", "x+y"],
                ["--device", "tpu:x"]):  # fmt: skip
        with pytest.raises(SystemExit):
            gpu.main(bad)
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err, bad


def test_bench_gpu_warns_when_a_variant_leaves_memory_behind(monkeypatch, caplog):
    """A variant that does not free its model (as ZeRO-3 under dynamo's "eager" compile backend does) leaves every
    later row less memory, the largest-batch searches included: the log names it, once per new leak, not for noise."""
    allocated = iter([1.0, 1.2, 9.2, 9.3, 9.3])  # GB: before any job, then after each of four
    monkeypatch.setattr(gpu, "_allocated_gb", lambda dev: next(allocated))
    jobs = [(name, lambda name=name: {"variant": name, "status": "ok"}) for name in ("a", "leaky", "b", "c")]
    with caplog.at_level("WARNING", logger=gpu.log.name):
        rows = gpu._run_jobs(jobs, budget_s=1e9, dev=torch.device("cpu"))
    assert [r["variant"] for r in rows] == ["a", "leaky", "b", "c"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("bench gpu: 8.2 GB stay allocated after leaky")


def test_bench_gpu_runs_its_variants_with_recompile_headroom_and_restores_the_limit(monkeypatch):
    """The variants share one process and compile the same block forwards: at dynamo's default limit (8) a later
    compiled variant could fall back to eager blocks. The bench raises it while its jobs run, and only then."""
    import torch._dynamo.config as dynamo_config

    seen = []

    def record(jobs, budget_s, dev):
        seen.append(dynamo_config.recompile_limit)
        return [{"variant": label, "status": "failed: not run"} for label, _ in jobs]

    monkeypatch.setattr(gpu, "_run_jobs", record)
    before = dynamo_config.recompile_limit
    gpu.run(device="cpu", preset="tiny", variants=gpu.parse_variants("single+compile"), steps=1, warmup=0)
    assert seen == [max(before, gpu.RECOMPILE_LIMIT)] and seen[0] > 8
    assert dynamo_config.recompile_limit == before


def test_cli_bench_gpu_exits_0_without_cuda(monkeypatch, tmp_path, capsys):
    from toolkit.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)  # the result goes to runs/bench/ under the working directory
    assert main(["bench", "gpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["headline"] == {"skipped": "needs CUDA"}
    assert (tmp_path / "runs" / "bench" / "gpu.json").exists()


def test_cli_bench_gpu_takes_its_own_options_and_other_benches_refuse_them(monkeypatch, tmp_path, capsys):
    from toolkit.__main__ import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "gpu", "--budget-s", "60", "--preset", "tiny", "--variants", "plain,single", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["config"] == {"preset": "tiny"}
    assert main(["bench", "packing", "--budget-s", "60"]) == 2
    assert "only gpu, pipeline and overhead" in capsys.readouterr().err
    assert main(["bench", "packing", "-h"]) == 0  # was refused as an option
    out = capsys.readouterr().out
    assert "bench packing" in out and "pack_stream" in out and "takes no options" in out


def test_gpu_synthetic_packs_follow_the_batch_contract():
    from toolkit.train.metrics import step_flops

    cfg = gpu.bench_config("nanovlm-450m", gpu.Variant("plain"), batch_size=2, device="cpu", overrides=[])
    m = cfg.model
    image_id = m.lm_base_vocab_size + list(m.vlm_extra_tokens).index("image_token")
    for batch in gpu.synthetic_batches(cfg, 1, seed=0, device=torch.device("cpu")):  # 2 packs of 4096 tokens
        ids, labels, pos, stats = batch.inputs.input_ids, batch.inputs.labels, batch.inputs.position_ids, batch.stats
        assert ids.shape == labels.shape == pos.shape == (2, m.lm_max_length)
        tiles = batch.inputs.pixel_values.shape[0]
        assert stats.tiles == tiles
        assert int((ids == image_id).sum()) == tiles * m.mp_image_token_length  # 64 image tokens per tile
        assert not bool((labels[ids == image_id] != -100).any())
        segments = [
            n
            for row in pos
            for n in torch.diff(torch.nonzero(row == 0).flatten(), append=torch.tensor([len(row)])).tolist()
        ]
        lengths = stats.sample_lengths
        assert sum(segments) == pos.numel() and set(lengths) <= set(segments)  # samples restart position_ids
        assert stats.tokens == sum(lengths) >= 0.95 * pos.numel()  # full packs from a full buffer
        sum_sq = float(sum(n * n for n in lengths))
        assert gpu.batch_flops(cfg, batch) == pytest.approx(
            step_flops(m, n_tokens=sum(lengths), sum_sq_lengths=sum_sq, n_tiles=tiles)
        )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_bench_runs_every_code_path_on_cpu(tmp_path):
    """The `gpu` bench end to end on the CPU with the tiny preset: every backend, checkpointing and compile.

    A correctness check of the harness (rows, MFU and tokens/s arithmetic, same work in every variant), not a speed
    figure. It runs as `python -m toolkit.bench.gpu` in a child process: engines and process groups stay out of pytest.
    """
    variants = "plain,single,ddp,zero1,zero2,zero3,fsdp,fsdp+ac,single+compile"
    cmd = [sys.executable, "-m", "toolkit.bench.gpu", "--device=cpu", "--preset=tiny", "--steps=1", "--warmup=1"]
    cmd += ["--batch-size=2", f"--variants={variants}", "--peak-flops=1e12", "--profile=fsdp"]
    cmd += ["--largest-batch=single", "--largest-limit=2"]  # no out-of-memory on a CPU: both stop at the limit
    env = {**os.environ, **CPU_ENV}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "runs" / "bench" / "gpu.json").read_text())["rows"]}
    largest = {name: rows.pop(f"single, {name} loss") for name in ("chunked", "dense")}
    assert list(rows) == [
        "plain", "single", "ddp", "zero1", "zero2", "zero3", "fsdp", "fsdp ac=language", "single compile"
    ]  # fmt: skip
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert [r["batch_rows"] for r in largest.values()] == [2, 2], largest
    assert largest["chunked"]["last_loss"] == pytest.approx(largest["dense"]["last_loss"], rel=1e-5)  # same work
    cfg = gpu.bench_config("tiny", gpu.Variant("plain"), batch_size=2, device="cpu", overrides=[])
    timed = gpu.synthetic_batches(cfg, 2, seed=0, device=torch.device("cpu"))[1]  # the warm-up step took batch 0
    for r in rows.values():
        assert r["mfu"] * 1e12 * r["step_s"] == pytest.approx(gpu.batch_flops(cfg, timed), rel=1e-6)
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(timed.stats.tokens, rel=1e-6)
    losses = [r["last_loss"] for r in rows.values()]
    assert max(losses) / min(losses) < 1.02, losses  # same init, same batches: every variant trains the same model
    assert rows["plain"]["vs_plain"] == 1.0
    profile = (tmp_path / "runs" / "bench" / "gpu_profile_fsdp.txt").read_text()  # only the variant asked for
    assert list((tmp_path / "runs" / "bench").glob("gpu_profile_*")) == [tmp_path / "runs/bench/gpu_profile_fsdp.txt"]
    assert "sorted by self_cpu_time_total" in profile and "aten::" in profile  # host time: FSDP's hooks show here


def test_pipeline_photos_mode_feeds_photo_sized_images_through_450m_tiling(tmp_path):
    """The --photos data: JPEGs of 640-1600 px, tiled at nanovlm-450m's 512 px (12 tiles + the global one)."""
    from toolkit.data.loader import build_loader
    from toolkit.data.tokenizer import load_tokenizer

    cfg = pipeline.make_data(tmp_path / "synth", samples=6, seed=0, photos=True)
    assert (cfg.model.vit_img_size, cfg.model.max_img_size) == (512, 2048)
    rows = pipeline.read_rows(cfg.data.train_shards)
    assert len(rows) == 6 and all(Image.open(io.BytesIO(r["images"][0])).format == "JPEG" for r in rows)
    tok = load_tokenizer(cfg.model)
    batches = list(build_loader(cfg, rank=0, world=1, tokenizer=tok, finite=True))
    assert sum(b.stats.samples for b in batches) == 6
    # nanoVLM HEAD's rule with resize_to_max_side_len (its default, and the preset's): the long side is scaled to
    # max_img_size (2048), the short side alike and rounded up to a multiple of 512. Every photo here is 4:3 or 3:4
    # (1024x768, 800x600, 1280x960, 640x480, 1600x1200, 768x1024) -> 2048x1536 or 1536x2048: 4x3 tiles, + global.
    assert sum(b.stats.tiles for b in batches) == 6 * 12 + 6
    assert all(b.inputs.pixel_values.shape[1:] == (3, 512, 512) for b in batches)


def test_cli_bench_pipeline_photos_writes_its_own_json(monkeypatch, tmp_path, capsys):
    from toolkit.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["bench", "pipeline", "--photos", "--samples", "6", "--json"]) == 0
    result = json.loads((tmp_path / "runs" / "bench" / "pipeline_photos.json").read_text())
    assert result["config"]["samples"] == 6 and "photo" in result["config"]["data"]
    assert not (tmp_path / "runs" / "bench" / "pipeline.json").exists()  # the default run's file is left alone
    rows = {(r["pipeline"], r["stage"]): r for r in result["rows"]}
    assert rows[("toolkit", "end to end")]["samples_per_s"] > 0 and rows[("nanovlm", "end to end")]["samples_per_s"] > 0


def test_checkpoint_bench_times_both_paths_on_the_same_state(tmp_path):
    """`bench checkpoint` on the tiny preset (the figures mean nothing here): one sync and one async row per
    backend over the same state; the async checkpoint is written completely before the bench moves on, and the
    stall it reports is part of its total write time."""
    from toolkit.bench import checkpoint

    result = checkpoint.run(preset="tiny", repeats=1, out_dir=tmp_path)
    rows = {(r["backend"], r["mode"]): r for r in result["rows"]}
    assert set(rows) == {(b, m) for b in checkpoint.BACKENDS for m in ("sync", "async")}
    for backend in checkpoint.BACKENDS:
        sync, background = rows[backend, "sync"], rows[backend, "async"]
        assert sync["state_GB"] == background["state_GB"] > 0
        assert 0 < background["stall_s"] <= background["written_s"]
        assert result["headline"][f"{backend}_async_stall_vs_sync"] == background["stall_s"] / sync["stall_s"]
    assert list(tmp_path.iterdir()) == []  # its checkpoints are removed
    # The state it times is the model's: fp32 weights and AdamW's two moments (4 + 4 + 4 bytes a parameter) plus
    # one fp32 step count per tensor, counted here from the model itself (both rows read one variable).
    from toolkit.model import VisionLanguageModel

    model = VisionLanguageModel(checkpoint.bench_config("tiny", "single", []).model)
    params = list(model.parameters())
    expected = 12 * sum(p.numel() for p in params) + 4 * len(params)
    assert rows["single", "sync"]["state_GB"] * 1e9 == pytest.approx(expected, rel=1e-12)
