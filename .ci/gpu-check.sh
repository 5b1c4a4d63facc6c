#!/usr/bin/env bash
# One pass over everything that needs a GPU, sized for one call of a lent single-GPU machine (at most 9 minutes).
#
# Run from the repository root on a CUDA host whose python3 already has torch; the wheels that host lacks are
# carried in .whl/ (`bash .ci/gpu-wheels.sh` fills it). Logs, the bench JSON and kernel profiles go to $OUT.
#   1. the attention, patch, AdamW and chunked-loss `gpu` tests: do the fused kernels give the dense mask's outputs
#      and gradients, and does the bf16 chunked loss keep its bound and its memory? If torch's varlen kernel fails
#      them, the bench below runs on FlexAttention instead;
#   2. `python -m toolkit.bench.gpu`: issue 15's table (single, DDP, ZeRO-1/2/3 and FSDP2, compiled, and ZeRO-3
#      eager), the profile of the sharded rows, and the largest micro-batch with the chunked and the dense loss
#      (BENCH_BUDGET_S caps it), alone on the machine (on 2026-11-28 the CPU suite beside it slowed some variants
#      by a third);
#   3. the `gpu` test that trains each backend over NCCL with one rank and holds its bf16 losses, norms and validation
#      losses to single's (six launches at once), and a short run with train.profile_steps;
#   4. issue 14's cost calibration: seconds per tile, per token and per squared sample length (`--calibrate`, the
#      preset's compiled single backend; last, since its recompiles on new shapes are the least predictable).
# The CPU suite is left to CI. Each stage has its own time limit, so one that hangs cannot take the others'
# results with it: 20 s install + 75 + 240 + 110 + 90 = 535 s, under a 580 s device call. Logs are written as
# they go.
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
  python3 -c 'import sys, inspect, torch, deepspeed; print(sys.version.split()[0], torch.__version__,
deepspeed.__version__, torch.cuda.get_device_name(0))
from torch.nn.attention.varlen import varlen_attn; print("varlen_attn", inspect.signature(varlen_attn))'
} 2>&1 | tee "$OUT/env.log"

timeout "${KERNEL_TESTS_TIMEOUT_S:-75}" python3 -m pytest -q -m gpu -p no:cacheprovider \
  -k "attention or patch or adamw or chunked" 2>&1 | tee "$OUT/gpu_tests.log"
if grep -q "FAILED.*varlen" "$OUT/gpu_tests.log" || ! grep -q " passed" "$OUT/gpu_tests.log"; then
  kernel=flex  # the varlen kernel failed its checks: measure what `auto` would otherwise be
else
  kernel=auto
fi
echo "bench kernel: $kernel" | tee -a "$OUT/gpu_tests.log"

variants=${BENCH_VARIANTS:-plain,single+compile,ddp+compile,zero1+compile,zero2+compile,fsdp+compile,zero3+compile,zero3}
timeout "${BENCH_TIMEOUT_S:-240}" python3 -m toolkit.bench.gpu --budget-s "${BENCH_BUDGET_S:-185}" \
  --steps 8 --warmup 3 --variants "$variants" --profile "${BENCH_PROFILE:-zero3+compile,fsdp+compile,zero2+compile}" \
  --largest-batch "${LARGEST_BATCH:-single}" --largest-limit 24 "train.attention_kernel=$kernel" 2>&1 \
  | tee "$OUT/bench.log"
cp runs/bench/gpu.json runs/bench/gpu_profile_*.txt "$OUT/" 2>/dev/null

# the backend comparison starts its six one-rank launches side by side itself (a few hundred MB of the GPU each);
# with pytest-xdist the profile test runs beside it. -rP prints its table of deviations from single when it passes
parallel=$(python3 -c 'import xdist; print("-n 2")' 2>/dev/null)
timeout "${NCCL_TESTS_TIMEOUT_S:-110}" python3 -m pytest -q -rP -m gpu -p no:cacheprovider $parallel -k "nccl or profile" 2>&1 \
  | tee "$OUT/gpu_nccl_tests.log"

timeout "${CALIBRATE_TIMEOUT_S:-90}" python3 -m toolkit.bench.gpu --calibrate "$OUT/cost_calibration.json" \
  --steps 3 --warmup 2 "train.attention_kernel=$kernel" 2>&1 | tee "$OUT/calibrate.log"
