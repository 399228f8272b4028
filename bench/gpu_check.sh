#!/usr/bin/env bash
# The whole GPU check in one call, for a lent CUDA machine (it has torch and triton, not diffusers or deepspeed):
#   1. build the C++ and CUDA extensions against the machine's CUDA torch (sm_90 unless TEMPFLOW_CUDA_ARCHS says);
#   2. run the kernel tests on the GPU: real Triton compilation, the hand-written CUDA kernels, the rng stream,
#      and the trainer + engine on the GPU (tests/test_gpu_train.py: needs diffusers and peft wheels in .whl/);
#   3. time the fused ops against the eager Flow-GRPO step (bench/bench_step.py --device cuda);
#   4. the real-size check (bench/gpu_real_size.py): the published SD3.5-Medium and FLUX.1-dev transformer
#      configurations with random bf16 weights at 512 and 1024 px: the step kernels (GB/s against a measured copy,
#      x the eager step), the TempFlow rollout engine against the naive official-structure loop (N=4, K=6, T=10,
#      eager / compiled / CUDA graphs), one training step with one forward per state against one per action. Each
#      result is checked; sizes are scaled down to what is left of GPU_CHECK_BUDGET_S (default 480 s for the whole
#      check, inside the device tool's 10 minutes), and the output says what was scaled or skipped. It needs
#      diffusers (its wheel in .whl/, as for step 2) and uses the image's peft for the LoRA training step.
# Logs, the bench's JSON line and gpu_real_size.jsonl go to $OUT when set (the device tool brings that folder back:
# 7 files, within its 8), else to bench/results/. Commit what it wrote under bench/results/. The copy of the tree
# on the GPU machine has no .git: pass TEMPFLOW_COMMIT=<sha> to name the commit in the results' header.
# The exit status is non-zero when a test failed or a real-size result was wrong.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
set -euo pipefail
check_start=$(date +%s)
cd "$(dirname "$0")/.."
dest=${OUT:-bench/results}
mkdir -p "$dest"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TEMPFLOW_CUDA_ARCHS=${TEMPFLOW_CUDA_ARCHS:-90}
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then  # optional wheels carried along (see the device tool's README)
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$dest/gpu_device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$dest/gpu_device.txt"

echo "== build"
start=$(date +%s)
TEMPFLOW_REQUIRE_EXT=1 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -n 20 \
  | tee "$dest/gpu_build.log"
echo "build took $(( $(date +%s) - start )) s" | tee -a "$dest/gpu_build.log"
$PY -m tempflow.cli doctor | tee -a "$dest/gpu_build.log"

echo "== tests on the GPU"
set +e
$PY -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_rng.py tests/test_sde.py tests/test_gpu_train.py 2>&1 | tee "$dest/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
set -e

echo "== step benchmark"
$PY bench/bench_step.py --device cuda 2>&1 | tee "$dest/gpu_bench_step.log"
[ "$dest" = bench/results ] || tail -n 1 bench/results/bench_step.jsonl > "$dest/bench_step_gpu.jsonl"

echo "== real size: SD3.5-Medium and FLUX.1-dev configurations, random bf16 weights"
budget=$(( ${GPU_CHECK_BUDGET_S:-480} - ($(date +%s) - check_start) ))
[ "$budget" -ge 120 ] || budget=120  # at least the kernels and the SD3.5-M rollout
set +e
$PY bench/gpu_real_size.py --device cuda --out "$dest" --budget-s "$budget" 2>&1 | tee "$dest/gpu_real_size.log"
real_rc=${PIPESTATUS[0]}
set -e
echo "gpu_check: tests exit $tests_rc, real-size check exit $real_rc, $(( $(date +%s) - check_start )) s in all"
[ "$tests_rc" -eq 0 ] || exit "$tests_rc"
exit "$real_rc"
