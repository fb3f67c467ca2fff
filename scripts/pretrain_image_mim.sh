#!/usr/bin/env bash
# BEiT masked image modelling on an ImageNet-style folder: predict the DALL-E dVAE token of each masked
# patch. Hyperparameters: batch 128 per GPU, 800 epochs, 40 warmup, blr 1.5e-4, wd 0.05, no LoRA
# (lora_rank 0: every weight on the image path trains); drop path 0.1 and gradient clipping 3.0 as in BEiT.
#
#   bash scripts/pretrain_image_mim.sh
#   RESUME=checkpoints/beit_...transfertovlmo.pth bash scripts/pretrain_image_mim.sh --epochs 100   # continue one
#   MIM_TARGET=pixel bash scripts/pretrain_image_mim.sh        # normalised-pixel targets, no dVAE weights needed
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 bash scripts/pretrain_image_mim.sh   # on each node
#
# Re-running the same command resumes from OUTPUT_DIR/checkpoint-latest.pth.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_PATH=${DATA_PATH:-data/ILSVRC2012/train/}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/image_mim/}
MODEL=${MODEL:-vlmo_base_patch16}
FFN_LAYOUT=${FFN_LAYOUT:-multiway}
MIM_TARGET=${MIM_TARGET:-dalle}
DVAE_PATH=${DVAE_PATH:-checkpoints/dall_e_tokenizer_weight/encoder.pkl}
BATCH_SIZE=${BATCH_SIZE:-128}          # per GPU
RESUME=${RESUME:-}                     # empty: from random initialisation (BEiT's 800-epoch schedule)
source scripts/launch_torchrun.sh
launch_pretrain --exp_name image_mim --model "$MODEL" --ffn_layout "$FFN_LAYOUT" --data_path "$DATA_PATH" \
  --mim_target "$MIM_TARGET" --dvae_path "$DVAE_PATH" --batch_size "$BATCH_SIZE" --output_dir "$OUTPUT_DIR" \
  --log_dir "$OUTPUT_DIR" ${RESUME:+--resume "$RESUME"} --lora_rank 0 --epochs 800 --warmup_epochs 40 \
  --blr 1.5e-4 --weight_decay 0.05 --drop_path 0.1 --clip_grad 3.0 --save_per_epochs 20 "$@"
