#!/usr/bin/env bash
# The continual recipe end to end on the built-in demo data, on CPU, in a few minutes (2 cores):
#   random-init tiny BEiT -> convert -> text_mlm (LoRA + self-regularization) -> merge -> image_text_itc,
# then the forgetting probe between the converted and the text_mlm checkpoints, and a summary.
#
#   bash scripts/recipe_demo.sh                  # REG_WEIGHT=1e1, the published text recipe's weight
#   REG_WEIGHT=0 bash scripts/recipe_demo.sh     # no self-regularization
#   REG_WEIGHT=1e4 ITC_ARGS="--lock_image" bash scripts/recipe_demo.sh
#
# Variables: REG_WEIGHT, NPROC (processes, default 2), OUT (default outputs/recipe_demo/<time>-reg<W>),
# MLM_EPOCHS (4), ITC_EPOCHS (8), LORA_RANK (4), MLM_ARGS / ITC_ARGS (extra flags for the two stages).
#
# Why --ffn_layout shared: in the multiway layout text gets a new FFN expert of its own, and the image
# expert is off the text path, so text_mlm can touch the image path only through the shared attention. In
# the shared layout (the continual-learning variant) the image path's every FFN and attention weight also
# serves text and is adapted by the text LoRA: that is where learning text can make the model forget its
# images, what self-regularization is for, and what the forgetting probe then measures.
set -euo pipefail
cd "$(dirname "$0")/.."
REG_WEIGHT=${REG_WEIGHT:-1e1}
NPROC=${NPROC:-2}
OUT=${OUT:-outputs/recipe_demo/$(date +%Y%m%d-%H%M%S)-reg${REG_WEIGHT}}
MLM_EPOCHS=${MLM_EPOCHS:-4}
ITC_EPOCHS=${ITC_EPOCHS:-8}
LORA_RANK=${LORA_RANK:-4}
MLM_ARGS=${MLM_ARGS:-}
ITC_ARGS=${ITC_ARGS:-}
DEMO=data/demo

bash scripts/setup.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false NPROC_PER_NODE=$NPROC
PY=.venv/bin/python
source scripts/launch_torchrun.sh
mkdir -p "$OUT"
started=$(date +%s)

echo "== 1/6 demo data and a random-init tiny BEiT checkpoint (stands in for the downloaded release)"
$PY scripts/make_demo_data.py --out "$DEMO"
$PY scripts/make_tiny_beit.py --out "$OUT/beit_tiny_random.pth" --style ft --img_size 32

echo "== 2/6 convert BEiT -> VLMo layout (shared FFN)"
converted=$OUT/beit_tiny_transfertovlmo.pth
$PY util/convert_beit_ckpt.py --src "$OUT/beit_tiny_random.pth" --dst "$converted" --model vlmo_tiny_patch16 \
  --ffn_layout shared --img_size 32

echo "== 3/6 text_mlm through LoRA (rank $LORA_RANK) with self-regularization weight $REG_WEIGHT"
# shellcheck disable=SC2086  # MLM_ARGS / ITC_ARGS are word-split on purpose
launch_pretrain --exp_name text_mlm --model vlmo_tiny_patch16 --ffn_layout shared \
  --data_path "$DEMO/captions_train.json" --val_data_path "$DEMO/captions_val.json" --tokenizer "$DEMO/tokenizer" \
  --batch_size 32 --epochs "$MLM_EPOCHS" --warmup_epochs 0.5 --blr 2e-2 --weight_decay 0.05 --drop_path 0 \
  --num_workers 1 --log_freq 50 --save_per_epochs "$MLM_EPOCHS" --resume "$converted" --output_dir "$OUT/text_mlm" \
  --lora_rank "$LORA_RANK" --self_regularization --reg_loss_weight "$REG_WEIGHT" $MLM_ARGS

echo "== 4/6 merge the adapters"
merged=$OUT/text_mlm_merged.pth
$PY util/merge_lora.py --src "$OUT/text_mlm/checkpoint-latest.pth" --dst "$merged"

echo "== 5/6 image_text_itc (CLIP) from the merged weights, zero-shot on $DEMO/images/val"
# shellcheck disable=SC2086
launch_pretrain --exp_name image_text_itc --model vlmo_tiny_patch16 --ffn_layout shared \
  --data_path "$DEMO/pairs_train.csv" --val_data_path "$DEMO/pairs_val.csv" \
  --zeroshot_data_path "$DEMO/images/val" --zeroshot_classnames "$DEMO/classnames.txt" \
  --zeroshot_templates "$DEMO/templates.txt" --batch_size 32 --epochs "$ITC_EPOCHS" --warmup_epochs 0.5 \
  --blr 4e-3 --weight_decay 0.2 --drop_path 0 --num_workers 1 --log_freq 30 --save_per_epochs "$ITC_EPOCHS" \
  --resume "$merged" --output_dir "$OUT/image_text_itc" $ITC_ARGS

echo "== 6/6 forgetting probe: converted -> text_mlm"
$PY util/forgetting_probe.py --before "$converted" --after "$OUT/text_mlm/checkpoint-latest.pth" \
  --images "$DEMO/images/val" --captions "$DEMO/captions_val.json" --out "$OUT/probe_text_mlm.json"

$PY - "$OUT" "$REG_WEIGHT" "$started" <<'PYEOF'
import json, sys, time
out, weight, started = sys.argv[1], sys.argv[2], float(sys.argv[3])
probe = json.load(open(f"{out}/probe_text_mlm.json"))
rows = [json.loads(line) for line in open(f"{out}/image_text_itc/log.jsonl") if line.strip()]
val = [r for r in rows if r.get("split") == "val"]
summary = {"reg_weight": float(weight), "mlm_acc_heldout": probe["metrics"]["after"].get("mlm_acc"),
           "image_feature_drift": probe["image_feature_drift"],
           "image_feature_drift_prenorm": probe["image_feature_drift_prenorm"],
           "itc_zeroshot_top1": val[-1].get("zeroshot_top1") if val else None,
           "itc_r_mean": val[-1].get("r_mean") if val else None, "minutes": (time.time() - started) / 60}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(f"\n== summary (reg weight {weight}; {summary['minutes']:.1f} min; everything in {out})")
print(f"  text_mlm held-out MLM accuracy           {summary['mlm_acc_heldout']:.4f}")
print(f"  image-feature drift (mean 1-cos, CLS)    {summary['image_feature_drift']:.5f}"
      f"   (before the final norm: {summary['image_feature_drift_prenorm']:.5f})")
if val:
    print(f"  ITC zero-shot top-1 (%, {len(val)} epochs)     {summary['itc_zeroshot_top1']:.2f}"
          f"   retrieval mean recall {summary['itc_r_mean']:.2f}")
PYEOF
