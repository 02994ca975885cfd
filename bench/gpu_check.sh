#!/usr/bin/env bash
# The GPU checks of the performance path as one prepared run (under 10 minutes on one H100/H200): the compiled Triton
# kernels against math attention on the device, then the three benchmarks at the issue's GPU sizes.
# Everything lands in ${OUT:-results/gpu}/ (machine, test log, one text + JSON file per benchmark),
# ready to be copied into BENCHMARKS.md. Needs torch with CUDA, triton, transformers and pytest
# (deepspeed is not needed: nothing here trains through the engine).
#
#     bash bench/gpu_check.sh                   # PYTHON=... picks the interpreter (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__,
'| transformers', transformers.__version__)"; } 2>&1 | tee "$out/machine.txt"

# 1. correctness of the compiled kernels (fp32 and bf16, GQA, documents, odd lengths, head dims 64/128)
timeout 150 $py -m pytest -q -rs tests/test_attention.py -k cuda 2>&1 | tee "$out/tests.txt"
# 1b. the compiled decode step replays CUDA graphs ("reduce-overhead": none skipped) and generates what eager does
timeout 120 $py -m pytest -q -rs tests/test_generate.py -k cuda_graphs 2>&1 | tee -a "$out/tests.txt"
# 2. attention fwd+bwd TFLOP/s per backend, causal vs document-masked, head dim 128 (target: triton
#    >= 300 TFLOP/s causal at 4K; docs' useful TFLOP/s within 5% of causal)
timeout 180 $py bench/bench_attention.py --device cuda --seq-lens 1024,2048,4096,8192 --doc-len 1024 \
    --json "$out/attention.json" 2>&1 | tee "$out/attention.txt"
# 3. fused vs naive loss at 32K tokens x vocab 128,256 x hidden 4096, bf16 (target: fused <= 6 GB)
timeout 90 $py bench/bench_loss.py --device cuda --dtype bf16 --tokens 32768 --hidden 4096 --vocab 128256 \
    --repeats 3 --json "$out/loss.json" 2>&1 | tee "$out/loss.txt"
# 4. training step of the ~1B preset at seq 4096, minillm vs transformers (target: >= 45% MFU)
timeout 150 $py bench/bench_train_step.py --preset 1b --seq-len 4096 --batch-size 1 --dtype bf16 --steps 5 \
    2>&1 | tee "$out/train_step.txt"
