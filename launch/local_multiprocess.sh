#!/usr/bin/env bash
# Starts N local CPU processes of pause_flax.train that form one multi-host job
# on 127.0.0.1 (a smoke test of the pod code path). See launch/local.py --help.
#   launch/local_multiprocess.sh --num-processes=2 --devices-per-process=4 \
#       --gin-file=gin_configs/local/<smoke>.gin --model-dir=/tmp/run
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/local.py" "$@"
