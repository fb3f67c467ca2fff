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


def _json_kwargs(value, flag):
    """--image_tower_kwargs / --text_tower_kwargs: a JSON object on the command line, a mapping in --config."""
    if value is None or isinstance(value, dict):
        return dict(value or {})
    import json

    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag}: not valid JSON ({e.msg}); e.g. {flag} '{{\"depth\": 2}}'") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{flag}: expected a JSON object, e.g. '{{\"depth\": 2}}'")
    return parsed


def build_dual_encoder_run(args, plan, load_our_tokenizer):
    """(model, tokenizer, provided_keys, trainable groups) of a `--model dual_encoder` run.

    A training checkpoint rebuilds its own architecture and tokenizer (no image weights file or HF folder
    read); otherwise the flags build it: a Hugging Face --text_tower brings its folder's tokenizer,
    `load_our_tokenizer()` gives ours; a weights-only --resume then loads the tensors it has."""
    from custom_datasets.hf_tokenizer import HFTokenizer, tokenizer_from_any_state
    from models.dual_encoder import (OURS, build_dual_encoder, dual_encoder_from_config, is_dual_encoder_config,
                                     load_dual_encoder_weights)

    if plan.kind == "train":
        cfg = plan.ckpt.get("model_config")
        if not is_dual_encoder_config(cfg):
            raise UserError(f"--resume {plan.path}: not a dual_encoder checkpoint (--model)")
        if cfg["image"]["name"] != args.image_tower or (cfg["text"]["kind"] == OURS) != (args.text_tower == OURS):
            raise UserError(f"--resume {plan.path}: holds a dual encoder of {cfg['image']['name']} + "
                            f"{cfg['text'].get('path', OURS)}, not --image_tower {args.image_tower} + --text_tower "
                            f"{args.text_tower}")
        model, tokenizer = dual_encoder_from_config(cfg), tokenizer_from_any_state(plan.ckpt["tokenizer"])
        provided = list(plan.ckpt.get("provided_keys", []))
    else:
        if args.text_tower == OURS:
            tokenizer = load_our_tokenizer()
        elif args.tokenizer:
            raise UserError("--tokenizer: a Hugging Face --text_tower uses its own folder's tokenizer; drop --tokenizer")
        else:
            tokenizer = HFTokenizer(args.text_tower, args.max_text_len)
            LOG.info(f"tokenizer: {args.text_tower} ({tokenizer.vocab_size} tokens, Hugging Face)")
        model = build_dual_encoder(args.image_tower, args.text_tower, args.itc_embed_dim, args.itc_loss,
                                   args.img_size or 224, tokenizer.vocab_size, args.image_tower_weights,
                                   _json_kwargs(args.image_tower_kwargs, "--image_tower_kwargs"),
                                   _json_kwargs(args.text_tower_kwargs, "--text_tower_kwargs"),
                                   max_text_len=max(args.max_text_len, 196) if args.text_tower == OURS
                                   else args.max_text_len, drop_path=args.drop_path)
        provided = list(model.pretrained_keys)
        if plan.kind == "weights":
            report = load_dual_encoder_weights(model, plan.state_dict, plan.path, "--resume",
                                               plan.ckpt.get("model_config"))
            LOG.info(f"loaded {len(report['loaded'])} tensors from {plan.path}; newly initialised "
                     f"{len(report['missing'])}; unused {len(report['unused'])}; dropped {report['dropped']}")
            provided = sorted(set(provided) | set(report["loaded"]))
    groups = model.configure_trainable(args.mode, args.lora_rank, args.lora_alpha, provided, args.lock_image,
                                       args.lock_text, args.reg_loss_weight if args.use_self_regularization else 0.0)
    if plan.kind == "train":
        from util.run_common import load_full_state
        load_full_state(model, plan.state_dict, plan.path)
    return model, tokenizer, provided, groups
