#!/usr/bin/env bash
# Demo: set up, generate the built-in demo data, and pretrain on the tiny model with 2 CPU processes
# (torchrun + gloo). Default mode text_mlm: prints MLM loss/accuracy falling, train and held-out (1-3 min).
# Other modes: `bash scripts/demo.sh image_mim` or `bash scripts/demo.sh image_text_itc`; extra flags follow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1
.venv/bin/python scripts/make_demo_data.py --out data/demo
mode=text_mlm
case "${1:-}" in text_mlm|image_mim|image_text_itc) mode=$1; shift ;; esac
out=outputs/demo_$mode/$(date +%Y%m%d-%H%M%S)
.venv/bin/torchrun --standalone --nproc_per_node=2 main_pretrain_cook.py --config "configs/demo_$mode.yaml" \
  --output_dir "$out" "$@"
echo "demo finished: logs, TensorBoard events and checkpoints in $out"
