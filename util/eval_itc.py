"""Standalone contrastive evaluation of a checkpoint: image<->text retrieval R@1/5/10 on held-out pairs and
zero-shot classification on an ImageNet-style folder, on every rank (torchrun or a single process).

    torchrun --nproc_per_node=8 util/eval_itc.py --checkpoint outputs/itc/checkpoint-latest.pth \
        --val_data_path data/coco/val.csv --zeroshot_data_path data/ILSVRC2012/val/ [--out metrics.json]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_datasets.image_dataset import build_eval_transform, image_preprocess_state  # noqa: E402
from custom_datasets.loaders import eval_loader  # noqa: E402
from custom_datasets.pair_collator import PairCollator  # noqa: E402
from custom_datasets.pair_dataset import build_pair_dataset  # noqa: E402
from custom_datasets.hf_tokenizer import tokenizer_from_any_state  # noqa: E402
from custom_datasets.tokenizer import load_tokenizer  # noqa: E402
from engine_pretrain import evaluate  # noqa: E402
from inference import load_network  # noqa: E402
from modes.image_text_itc import build_zero_shot  # noqa: E402
from util import dist as du  # noqa: E402
from util.errors import UserError  # noqa: E402
from util.itc_eval import retrieval_set  # noqa: E402
from util.logger import LOG, setup_logging  # noqa: E402
from util.run_common import entry_point  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--val_data_path", default=None, help="held-out pairs (CSV/TSV, MUGE) for retrieval")
    p.add_argument("--zeroshot_data_path", default=None)
    p.add_argument("--zeroshot_classnames", default=None)
    p.add_argument("--zeroshot_templates", default=None)
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint's")
    p.add_argument("--eval_crop_pct", type=float, default=None,
                   help="centre-crop fraction of the evaluation view; default: the one the run recorded")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the metrics as JSON (rank 0)")
    args = p.parse_args(argv)
    args.pin_mem = True
    if not args.val_data_path and not args.zeroshot_data_path:
        raise UserError("give --val_data_path and/or --zeroshot_data_path")
    if args.eval_crop_pct is not None and not 0.0 < args.eval_crop_pct <= 1.0:
        raise UserError(f"--eval_crop_pct {args.eval_crop_pct}: a fraction in (0, 1]")
    return args


def evaluate_checkpoint(args, argv=None):
    env = du.init_distributed()
    setup_logging(None, env.rank)
    model, ckpt = load_network(args.checkpoint, env.device)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else tokenizer_from_any_state(ckpt["tokenizer"])
    image_state = dict(ckpt.get("image_preprocess") or image_preprocess_state(model.config["img_size"], crop_pct=1.0))
    if args.eval_crop_pct is not None:
        image_state["crop_pct"] = args.eval_crop_pct
    LOG.info(f"evaluation view: shorter side resized to {image_state['img_size']} / {image_state['crop_pct']:g}, "
             f"centre crop {image_state['img_size']}")
    metrics = {}
    if args.val_data_path:
        val = build_pair_dataset(args.val_data_path, build_eval_transform(image_state), flag="--val_data_path",
                                 split="valid")
        loader = eval_loader(val, PairCollator(tokenizer), args.batch_size, env.rank, env.world_size,
                             args.num_workers, args.pin_mem)
        metrics.update(evaluate(retrieval_set(loader, val), model, env.device))
        metrics["num_pairs"] = len(val)
    if args.zeroshot_data_path:
        zero_shot = build_zero_shot(args, tokenizer, image_state, env.rank, env.world_size)
        metrics.update(evaluate(zero_shot, model, env.device))
        metrics["num_zeroshot_images"] = zero_shot.num_items
    LOG.info(json.dumps(metrics, indent=1))
    if args.out and env.is_main:
        with open(args.out, "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


def main(argv=None):
    return entry_point(parse_args, evaluate_checkpoint, argv)


if __name__ == "__main__":
    main()
    sys.exit(0)
