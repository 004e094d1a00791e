#!/usr/bin/env bash
# One prepared GPU session (issue #9, part 3): checks, then MFU of the paper models.
#
#   bash benchmarks/gpu_session.sh OUT_DIR [BUDGET_SECONDS] [full|h100]
#
# 'full' (default): GPU model tests, both models and the setting variants, a
# decoding run. 'h100': the paper_1b settings that fit an 80 GB card, and
# paper_130m at a larger batch.
#
# Run from the repository root on a one-GPU machine with jax[cuda], flax, optax
# and absl installed (pause_flax need not be installed: the repo root goes on
# PYTHONPATH). Wheels in .whl/ (gin-config; optionally flax/optax pins) are
# installed to a private folder first. Each measurement is its own process with
# its own time limit; a measurement that would start past BUDGET_SECONDS is
# skipped. Rows collect in OUT_DIR/gpu_mfu.json, the log in OUT_DIR/log.
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [BUDGET_SECONDS] [full|h100]}
budget=${2:-480}
plan=${3:-full}
mkdir -p "$out"
exec > >(tee -a "$out/log") 2>&1

export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}

if ls .whl/gin_config-*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/gin_config-*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
versions='import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__,
"optax", optax.__version__, jax.devices())'
$py -c "$versions"

mfu() {  # mfu SECONDS ARGS...: one gpu_mfu.py process, skipped past the budget
  local limit=$1; shift
  if (( SECONDS + 60 > budget )); then echo "SKIPPED (budget): $*"; return; fi
  echo "=== [$SECONDS s] gpu_mfu.py $*"
  timeout "$limit" $py benchmarks/gpu_mfu.py --out "$out/gpu_mfu.json" "$@" \
    || echo "FAILED (rc $?): $*"
}

# Preflight: a tiny bf16 model through cuDNN attention. If the image's flax or
# optax cannot run it, retry with the pinned wheels carried in .whl/.
if ! timeout 120 $py benchmarks/gpu_mfu.py --models tiny --seq_len 128 --batch_sizes tiny:4 \
    --steps 2 --repeats 1 --tag preflight --out "$out/preflight.json"; then
  echo "preflight failed with the image's packages; trying the pinned flax/optax wheels"
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/pinned \
    .whl/flax-*.whl .whl/optax-*.whl
  export PYTHONPATH=/tmp/pinned:$PYTHONPATH
  $py -c "$versions"
  timeout 120 $py benchmarks/gpu_mfu.py --models tiny --seq_len 128 --batch_sizes tiny:4 \
    --steps 2 --repeats 1 --tag preflight --out "$out/preflight.json" || exit 1
fi

if [[ $plan == h100 ]]; then
  mfu 200 --models paper_1b --batch_sizes paper_1b:8
  mfu 200 --models paper_1b --batch_sizes paper_1b:8 --remat dots
  mfu 150 --models paper_130m --batch_sizes paper_130m:32
  # Packed segments: cuDNN with the dense [B, 1, L, L] mask against blocked
  # attention, which builds each block's mask from the segment ids.
  mfu 150 --models paper_130m --batch_sizes paper_130m:16 --packed 4
  mfu 150 --models paper_130m --batch_sizes paper_130m:16 --packed 4 --attention blocked
  echo "=== done in $SECONDS s"
  exit 0
fi

# The GPU-only model tests (cuDNN attention equals XLA's; causal flag equals mask).
JAX_PLATFORMS=cuda CUDA_VISIBLE_DEVICES=0 timeout 120 $py -m pytest -q -p no:cacheprovider \
  tests/test_model.py -k "cudnn or causal_flag or shapes" || echo "FAILED: GPU model tests"

mfu 200 --models paper_1b --batch_sizes paper_1b:8
mfu 150 --models paper_130m --batch_sizes paper_130m:16
XLA_FLAGS="--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_latency_hiding_scheduler=true" \
  mfu 200 --models paper_1b --batch_sizes paper_1b:8 --tag "cudnn, triton gemm off, LHS"
mfu 150 --models paper_130m --batch_sizes paper_130m:16 --attention xla
mfu 200 --models paper_1b --batch_sizes paper_1b:16 --loss_chunk_len 1024
# Packed segments (see the h100 plan).
mfu 150 --models paper_130m --batch_sizes paper_130m:16 --packed 4
mfu 150 --models paper_130m --batch_sizes paper_130m:16 --packed 4 --attention blocked
mfu 200 --models paper_1b --batch_sizes paper_1b:8 --packed 4 --attention blocked
if (( SECONDS + 60 <= budget )); then
  echo "=== [$SECONDS s] decode_throughput.py (paper_130m, KV cache vs none)"
  timeout 120 $py benchmarks/decode_throughput.py --model paper_130m --batch_size 8 \
    --prompt_len 128 --new_tokens 256 || echo "FAILED: decode_throughput"
fi
echo "=== done in $SECONDS s"
