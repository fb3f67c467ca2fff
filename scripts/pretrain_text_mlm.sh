#!/usr/bin/env bash
# Continual recipe, stage 2: learn text with masked language modelling through LoRA adapters on converted
# BEiT weights, under self-regularization. The published hyperparameters (batch 384 per GPU, 100 epochs,
# 40 warmup, blr 1.5e-4, wd 0.05, LoRA rank 64, reg weight 1e1).
#
#   bash scripts/pretrain_text_mlm.sh                              # one node, every local GPU
#   REG_WEIGHT=1e4 bash scripts/pretrain_text_mlm.sh --epochs 50   # extra flags are passed through (last wins)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 bash scripts/pretrain_text_mlm.sh   # on each node
#
# Re-running the same command resumes: a checkpoint-latest.pth in OUTPUT_DIR wins over RESUME.
# Afterwards: python util/merge_lora.py --src $OUTPUT_DIR/checkpoint-latest.pth  (-> *_merged.pth for stage 3).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_PATH=${DATA_PATH:-data/CC3M/cc3m_captions.json}
RESUME=${RESUME:-checkpoints/beit_base_patch16_224_pt22k_ft22kto1k_transfertovlmo.pth}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/text_mlm/}
MODEL=${MODEL:-vlmo_base_patch16}
FFN_LAYOUT=${FFN_LAYOUT:-multiway}     # must match the converted checkpoint (util/convert_beit_ckpt.py --ffn_layout)
REG_WEIGHT=${REG_WEIGHT:-1e1}          # self-regularization weight; 0 turns it off
LORA_RANK=${LORA_RANK:-64}
BATCH_SIZE=${BATCH_SIZE:-384}          # per GPU
TOKENIZER=${TOKENIZER:-}               # default: checkpoints/tokenizer/ (or the resumed checkpoint's)
source scripts/launch_torchrun.sh
launch_pretrain --exp_name text_mlm --model "$MODEL" --ffn_layout "$FFN_LAYOUT" --data_path "$DATA_PATH" \
  ${TOKENIZER:+--tokenizer "$TOKENIZER"} --batch_size "$BATCH_SIZE" --output_dir "$OUTPUT_DIR" \
  --log_dir "$OUTPUT_DIR" --resume "$RESUME" --lora_rank "$LORA_RANK" --self_regularization \
  --reg_loss_weight "$REG_WEIGHT" --save_per_epochs 20 --epochs 100 --warmup_epochs 40 --blr 1.5e-4 \
  --weight_decay 0.05 "$@"
