#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one short run: a lent H100/H200 gives a session 15 minutes of device time
# (machine start included) and 10 minutes per command, so the step time-outs below add up to about 9.5 minutes.
# Each step writes its output under ${OUT:-gpu-checks}/ and the script goes on when one fails, so a single
# call collects every figure; the summary at the end lists the exit code of each step.
#
#   pip install -e . --no-deps && bash scripts/gpu_checks.sh            # on the GPU machine
#   RSP_GPU_CHECKS="pytest attack" bash scripts/gpu_checks.sh           # a subset
#   RSP_GPU_CHECKS=methods bash scripts/gpu_checks.sh                   # issue 7's table on the GPU (resumable):
#       copy the CIFAR-10 subset into the ignored gpu-data/ first (cp -r ../shared/data/cifar-10-subset gpu-data/)
#       and carry gpu-data; RSP_METHODS_FLAGS overrides the model and budget
#   RSP_GPU_CHECKS=paper bash scripts/gpu_checks.sh             # issue 16's table, GPU settings (full-width VGG-16),
#       the rows RSP_PAPER_FLAGS names (default: pgd-at at 99 %, the three masks, seed 0) on the same gpu-data copy
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
STEPS=${RSP_GPU_CHECKS:-"pytest kernels e2e attack train_step"}
declare -A RC
run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  RC[$name]=$?
  echo "   exit ${RC[$name]} in $((SECONDS - t0)) s; last line: $(tail -n 1 "$OUT/$name.log" | cut -c1-300)" | tee -a "$OUT/summary.txt"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt" 2>&1
for step in $STEPS; do
  case $step in
    pytest)     run pytest 120 python -m pytest -q -m gpu -p no:cacheprovider ;;           # CUDA kernels, verify on cuda
    kernels)    run kernels 150 python bench/kernels.py ;;                                 # BSR vs cuDNN, VGG-16 shapes
    # the CUDA artifact (target cuda, sm_90 on an H100/H200) end to end vs torch (cuDNN) and onnxruntime-CUDA
    e2e)        run e2e 140 python bench/e2e.py --device cuda --model vgg16 --model resnet18 --sparsity 0.9 \
                    --sparsity 0.99 --structure random --threads 1 --rounds 7 ;;
    attack)     run attack 80 python bench/attack.py ;;                                   # rsp vs loop, fp32 and bf16
    train_step) run train_step 90 python bench/train_step.py --objective pgd-at --batch-size 128 --steps 10 ;;
    methods)    run methods 480 python scripts/methods_table.py --data-dir "${RSP_CIFAR_DIR:-gpu-data/cifar-10-subset}" \
                    --device "${RSP_METHODS_DEVICE:-cuda}" --jobs 7 --root "${RSP_METHODS_ROOT:-/tmp/rsp-methods}" \
                    ${RSP_METHODS_FLAGS:---model vgg16 --epochs 20} ;;  # every registered method (rsp.methods, role method)
    paper)      run paper 540 python scripts/paper_table.py --data-dir "${RSP_CIFAR_DIR:-gpu-data/cifar-10-subset}" \
                    --device cuda --jobs 3 --root "${RSP_PAPER_ROOT:-/tmp/rsp-paper}" \
                    ${RSP_PAPER_FLAGS:---objective pgd-at --sparsity 0.99 --seed 0 --epochs 30} ;;
    *) echo "unknown step $step" ;;
  esac
done
echo "exit codes: $(for k in "${!RC[@]}"; do printf '%s=%s ' "$k" "${RC[$k]}"; done)" | tee -a "$OUT/summary.txt"
