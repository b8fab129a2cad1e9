#!/usr/bin/env bash
# The GPU checks of the training issue, as one script for a lent device: train-step tokens/s and MFU
# of a 2B-shaped random model in bf16 (LoRA and full), and the small config, written to $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
run() { timeout 200 python3 -m experiments.bench_train "$@" 2>&1 | grep -v "^WARNING\|absl" | tail -3; }
run --model 2b --finetune lora --dtype bfloat16 --batch 8 --steps 5 --out "$OUT/train_2b_lora.json"
run --model 2b --finetune full --dtype bfloat16 --batch 8 --steps 5 --out "$OUT/train_2b_full.json"

