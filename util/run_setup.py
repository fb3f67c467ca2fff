"""Pieces of a pretraining run's setup that depend on the mode: image preprocessing inherited from
checkpoints, the dVAE target maker for image_mim, and the per-epoch evaluation of each mode."""
import os

from custom_datasets.image_dataset import ImageFolderDataset, build_eval_transform, image_preprocess_state
from custom_datasets.image_dataset import collate_image_batch
from custom_datasets.loaders import eval_loader
from util.errors import UserError
from util.logger import LOG


def resolve_image_state(args, plan, img_size):
    """Image preprocessing of the run: the flag, else the resumed checkpoint's, else BEiT's 0.5/0.5.
    A flag that contradicts the checkpoint's record wins, with a loud warning."""
    inherited = plan.ckpt.get("image_preprocess") if isinstance(plan.ckpt, dict) else None
    norm = args.image_norm or (inherited or {}).get("norm") or "beit"
    state = image_preprocess_state(img_size=img_size, norm=norm)
    if inherited and args.image_norm and inherited.get("norm") != args.image_norm:
        LOG.warning("!" * 100 + f"\n!! --image_norm {args.image_norm} differs from the '{inherited.get('norm')}' "
                    f"normalisation recorded in {plan.path}.\n!! The weights were trained on differently normalised "
                    "pixels; continuing with the flag's value.\n" + "!" * 100)
    return state


class MimTargets:
    """Adds `mim_labels` [B, N] (dVAE token ids of the 112 px view) to a batch, in float32, no grad."""

    def __init__(self, dvae):
        self.dvae = dvae

    def __call__(self, batch):
        batch["mim_labels"] = self.dvae(batch["images_for_vae"])


def dvae_file(path):
    """The safetensors conversion beside an encoder.pkl is preferred (no unpickling at all)."""
    converted = os.path.splitext(path)[0] + ".safetensors"
    if path.endswith(".pkl") and os.path.isfile(converted):
        return converted
    if not os.path.isfile(path):
        raise UserError(f"--dvae_path: DALL-E tokenizer weights not found: {path}. Place encoder.pkl there (from "
                        "the DALL-E release), convert it once with `python util/convert_dvae.py`, or use "
                        "--mim_target pixel")
    return path


def build_mim_targets(args, device):
    """(target maker, dVAE vocabulary size) for `image_mim` with dVAE targets, else (None, None)."""
    if args.mode != "image_mim" or args.mim_target != "dalle":
        return None, None
    from models.dvae import DVAETokenizer

    path = dvae_file(args.dvae_path)
    dvae = DVAETokenizer.from_path(path).to(device)
    LOG.info(f"dVAE tokenizer: {path} ({dvae.vocab_size} visual tokens); kept outside the model checkpoint")
    return MimTargets(dvae), dvae.vocab_size


def build_zero_shot(args, tokenizer, image_state, rank, world_size):
    from util.itc_eval import ZeroShot
    from util.retrieval_metrics import read_classnames, read_templates

    dataset = ImageFolderDataset(args.zeroshot_data_path, build_eval_transform(image_state), seed=args.seed)
    names = read_classnames(args.zeroshot_classnames, wnids=dataset.classes) if args.zeroshot_classnames else \
        [c.replace("_", " ") for c in dataset.classes]
    loader = eval_loader(dataset, collate_image_batch, args.batch_size, rank, world_size, min(args.num_workers, 2),
                         args.pin_mem)
    return ZeroShot(loader, names, read_templates(args.zeroshot_templates), tokenizer), len(dataset)


def build_evaluators(args, data, tokenizer, image_state, rank, world_size, target_fn):
    """A function (model, cfg) -> {metric: value} run at every epoch end on all ranks, or None."""
    from engine_pretrain import evaluate

    if args.mode != "image_text_itc":
        if data.val_loader is None:
            return None
        return lambda model, cfg: evaluate(model, data.val_loader, cfg, target_fn)
    from util.itc_eval import retrieval_metrics

    zero_shot = None
    if args.zeroshot_data_path:
        zero_shot, n = build_zero_shot(args, tokenizer, image_state, rank, world_size)
        LOG.info(f"zero-shot evaluation: {n} images of {len(zero_shot.classnames)} classes in "
                 f"{args.zeroshot_data_path}")
    if data.val_loader is None and zero_shot is None:
        return None

    def evaluate_itc(model, cfg):
        stats = {}
        if data.val_loader is not None:
            stats.update(retrieval_metrics(model, data.val_loader, data.val_dataset, cfg.device, cfg.autocast_dtype))
        if zero_shot is not None:
            stats.update(zero_shot(model, cfg.device, cfg.autocast_dtype))
        return stats

    return evaluate_itc
