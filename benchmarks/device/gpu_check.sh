#!/usr/bin/env bash
# Issue 17's GPU checks, run ON a device machine (an H100/H200) from the repository root, in two calls that each fit
# the 10-minute command limit. Prepare here first: `bash benchmarks/device/fetch_wheels.sh`. Then:
#   call 1  carry [".device/wheels-a", ".device/bench"]  command: bash benchmarks/device/gpu_check.sh speed
#   call 2  carry [".device/wheels-b"]                   command: bash benchmarks/device/gpu_check.sh train
# Call 2 must follow while the machine is still warm (it keeps call 1's .device/site); on a fresh machine carry
# both wheel folders in call 2 if they fit, or run `speed` again. Logs go to $OUT (they come back to this machine).
set -uo pipefail
cd "$(dirname "$0")/../.."
stage=${1:?usage: gpu_check.sh speed|train}
out=${OUT:-/tmp/medtee-gpu-check}
mkdir -p "$out" .device/site
for wheels in .device/wheels-a .device/wheels-b; do
  if compgen -G "$wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .device/site \
      "$wheels"/*.whl || exit 1
  fi
done
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.device/site:$PWD"
log() { tee -a "$out/$stage.log"; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, lightning, bitsandbytes as b; print('torch', torch.__version__,
  'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__,
  'bitsandbytes', b.__version__)"; } 2>&1 | log
case $stage in
  speed)  # the step: hand-written baseline and both medtee profiles in one process (about 7 minutes on an H200)
    timeout 530 python3 benchmarks/qlora_gpu.py --shared .device --steps 4 --warmup 2 \
      --models medgemma_27b medgemma_27b_lowmem 2>&1 | log ;;
  train)  # the CUDA-only tests, then `medtee train` itself against the module path on the 27B shape (4 layers)
    timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/data/test_packing_cuda.py \
      tests/training/test_gpu_dev_cuda.py 2>&1 | log
    timeout 300 python3 benchmarks/train_vs_module.py recipe=medgemma27b_random_gpu_dev trainer.max_steps=12 \
      --skip 4 2>&1 | log ;;
  *) echo "unknown stage '$stage': speed or train" >&2; exit 2 ;;
esac
