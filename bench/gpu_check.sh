#!/usr/bin/env bash
# The whole GPU check in one call, for a lent CUDA machine (it has torch and triton, not diffusers or deepspeed):
#   1. build the C++ and CUDA extensions against the machine's CUDA torch (sm_90 unless TEMPFLOW_CUDA_ARCHS says);
#   2. run the kernel tests on the GPU: real Triton compilation, the hand-written CUDA kernels, the rng stream,
#      and the trainer + engine on the GPU (tests/test_gpu_train.py: needs diffusers and peft wheels in .whl/);
#   3. time the fused ops against the eager Flow-GRPO step (bench/bench_step.py --device cuda).
# Logs and the bench's JSON line go to $OUT when set (the device tool brings that folder back), else to
# bench/results/. Commit what it wrote under bench/results/.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
set -euo pipefail
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
exit "$tests_rc"
