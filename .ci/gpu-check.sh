#!/usr/bin/env bash
# One pass over everything that needs a GPU, sized for a few minutes of a lent single-GPU machine.
#
# Run from the repository root on a CUDA host whose python3 already has torch; the wheels that host lacks are
# carried in .whl/ (`bash .ci/gpu-wheels.sh` fills it). Logs, the bench JSON and kernel profiles go to $OUT.
#   1. `python -m toolkit.bench.gpu`: the README's GPU table (BENCH_BUDGET_S caps its variants), alone on the
#      machine: on 2026-11-28 the CPU suite running beside it slowed some variants by a third;
#   2. the `gpu`-marked tests;
#   3. the CPU suite (`-m "not gpu"`), as `make test` would run it there, in whatever time is left.
# Each stage has its own time limit, so one that hangs cannot take the others' results with it. Expect about
# 8 minutes; the limits add up to 11 (install 30 s, bench 240, dense comparison 150, gpu tests 150, suite 100), so
# under a 600 s device call a slow run loses the last stage, the CPU suite, first. Logs are written as they go.
set -u
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
{
  nvidia-smi -L
  python3 -c 'import sys, torch, deepspeed; print(sys.version.split()[0], torch.__version__, deepspeed.__version__,
torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT/env.log"

variants=${BENCH_VARIANTS:-plain,single,zero2,zero3,fsdp,single+compile,zero2+compile,single+ac,zero3+ac,fsdp+ac,fsdp+compile,single+ac+compile}
timeout "${BENCH_TIMEOUT_S:-240}" python3 -m toolkit.bench.gpu --budget-s "${BENCH_BUDGET_S:-170}" \
  --steps 8 --warmup 3 --variants "$variants" --profile "${BENCH_PROFILE:-single+compile}" 2>&1 | tee "$OUT/bench.log"
cp runs/bench/gpu.json runs/bench/gpu_profile_*.txt "$OUT/" 2>/dev/null
# the decoder's packed attention as a dense SDPA mask instead of FlexAttention (whose forward the 2026-11-28
# profile showed at 4x its own backward): which one the `auto` choice should be
timeout "${DENSE_TIMEOUT_S:-150}" python3 -m toolkit.bench.gpu --budget-s 60 --steps 8 --warmup 3 \
  --variants single,single+compile train.attention_kernel=dense 2>&1 | tee -a "$OUT/bench.log"
cp runs/bench/gpu.json "$OUT/gpu_dense_attention.json" 2>/dev/null

timeout "${GPU_TESTS_TIMEOUT_S:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"

timeout "${SUITE_TIMEOUT_S:-100}" python3 -m pytest -q -n 12 -m "not gpu" -p no:cacheprovider >"$OUT/suite.log" 2>&1
echo "suite exit status: $?" >>"$OUT/suite.log"
tail -n 25 "$OUT/suite.log"
