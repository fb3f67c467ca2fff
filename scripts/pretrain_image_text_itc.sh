#!/usr/bin/env bash
# Continual recipe, stage 3: align image and text with the CLIP contrastive loss, starting from the merged
# text_mlm checkpoint (python util/merge_lora.py --src outputs/text_mlm/checkpoint-latest.pth).
# CLIP-style settings: batch 256 per GPU (2048 on 8 GPUs), 30 epochs with 1 warmup epoch, blr 6.25e-5
# (lr 5e-4 at batch 2048), wd 0.2, betas (0.9, 0.98), every weight trains (LoRA off).
#
#   bash scripts/pretrain_image_text_itc.sh
#   ITC_LOSS=siglip bash scripts/pretrain_image_text_itc.sh           # sigmoid loss
#   bash scripts/pretrain_image_text_itc.sh --lock_image              # LiT: image tower locked
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash scripts/pretrain_image_text_itc.sh   # on each node
#
# DATA_PATH: a CSV/TSV of text,image_path, MUGE-style *_texts.jsonl, or WebDataset shards ("dir/{000..331}.tar").
# Zero-shot accuracy on ZEROSHOT_DATA (an ImageNet-style folder) after every epoch when the folder exists.
# Re-running the same command resumes from OUTPUT_DIR/checkpoint-latest.pth.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_PATH=${DATA_PATH:-data/CC3M/cc3m_pairs.csv}
VAL_DATA_PATH=${VAL_DATA_PATH:-}
RESUME=${RESUME:-outputs/text_mlm/checkpoint-latest_merged.pth}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/image_text_itc/}
MODEL=${MODEL:-vlmo_base_patch16}
FFN_LAYOUT=${FFN_LAYOUT:-multiway}
ITC_LOSS=${ITC_LOSS:-clip}
BATCH_SIZE=${BATCH_SIZE:-256}          # per GPU
ZEROSHOT_DATA=${ZEROSHOT_DATA:-data/ILSVRC2012/val/}
ZEROSHOT_CLASSNAMES=${ZEROSHOT_CLASSNAMES:-}   # wnid<TAB>name file; default: folder names
zeroshot=()
if [ -d "$ZEROSHOT_DATA" ]; then
  zeroshot=(--zeroshot_data_path "$ZEROSHOT_DATA" ${ZEROSHOT_CLASSNAMES:+--zeroshot_classnames "$ZEROSHOT_CLASSNAMES"})
fi
source scripts/launch_torchrun.sh
launch_pretrain --exp_name image_text_itc --model "$MODEL" --ffn_layout "$FFN_LAYOUT" --data_path "$DATA_PATH" \
  ${VAL_DATA_PATH:+--val_data_path "$VAL_DATA_PATH"} "${zeroshot[@]}" --itc_loss "$ITC_LOSS" \
  --batch_size "$BATCH_SIZE" --output_dir "$OUTPUT_DIR" --log_dir "$OUTPUT_DIR" --resume "$RESUME" --lora_rank 0 \
  --epochs 30 --warmup_epochs 1 --blr 6.25e-5 --weight_decay 0.2 --opt_betas 0.9 0.98 --save_per_epochs 5 "$@"
