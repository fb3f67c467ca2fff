#!/usr/bin/env bash
# Demo: set up, generate the built-in demo data, and pretrain text_mlm on the tiny model with 2 CPU
# processes (torchrun + gloo). Prints MLM loss/accuracy falling, train and held-out. About 2-4 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
.venv/bin/python scripts/make_demo_data.py --out data/demo
out=outputs/demo_text_mlm/$(date +%Y%m%d-%H%M%S)
.venv/bin/torchrun --standalone --nproc_per_node=2 main_pretrain_cook.py --config configs/demo_text_mlm.yaml \
  --output_dir "$out" "$@"
echo "demo finished: logs, TensorBoard events and checkpoints in $out"
