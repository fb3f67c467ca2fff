"""Pretraining entry point: args -> data -> model -> engine, for every mode (text_mlm, image_mim,
image_text_itc). Launch with `torchrun --nproc_per_node=N main_pretrain_cook.py ...` (or under SLURM)."""
import math
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from custom_datasets.image_dataset import IMAGE_NORMS
from custom_datasets.pretrain_data import build_pretrain_data
from custom_datasets.hf_tokenizer import tokenizer_from_any_state
from custom_datasets.tokenizer import load_tokenizer
from engine_pretrain import EngineConfig, NonFiniteLoss, train_one_epoch
from models.loading import check_architecture, load_pretrained_weights
from models.registry import create_model, model_config, model_names
from models.trainable import configure_trainable
from models.vlmo import ITC_LOSSES, MIM_TARGETS, MODES
from util.bad_samples import BadSampleLog
from util.checkpoint import set_rng_state
from util.checkpointer import Checkpointer, NonFiniteCheckpoint
from util.config import add_run_args, make_parser, parse_with_config, write_args_json
from util.errors import UserError
from util.logger import LOG, RunLog
from util.optim_factory import build_adamw
from util.resume import plan_resume
from util.run_common import (autocast_setup, entry_point, load_full_state, log_trainable, resolve_batch_and_lr,
                              start_run)
from util.run_setup import build_dual_encoder_run, build_evaluators, build_mim_targets, resolve_image_state

DEFAULT_TOKENIZER = "checkpoints/tokenizer/"
DEFAULT_DVAE = "checkpoints/dall_e_tokenizer_weight/encoder.pkl"
DUAL_ENCODER = "dual_encoder"


def get_args_parser():
    p = make_parser("Pretrain a VLMo-style multiway transformer")
    g = p.add_argument_group("run")
    g.add_argument("--exp_name", default="text_mlm", help="run name; selects the mode unless --mode is given")
    g.add_argument("--mode", default=None, choices=MODES)
    g.add_argument("--output_dir", default="outputs/run")
    add_run_args(g)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vlmo_base_patch16")
    g.add_argument("--ffn_layout", default="multiway", choices=["multiway", "shared"])
    g.add_argument("--img_size", type=int, default=None, help="default: the model's")
    g.add_argument("--drop_path", type=float, default=0.1)
    g.add_argument("--image_tower", default="vit_base_patch16_224",
                   help=f"--model {DUAL_ENCODER}: timm model name of the image tower")
    g.add_argument("--image_tower_weights", default=None,
                   help="timm state dict (.pth, {'model': sd} or .safetensors) for the image tower; default random")
    g.add_argument("--image_tower_kwargs", default=None, help='JSON of extra timm kwargs, e.g. \'{"depth": 6}\'')
    g.add_argument("--text_tower", default="ours",
                   help="'ours', or a local Hugging Face BERT/RoBERTa folder (uses its own tokenizer; needs "
                        "`pip install transformers`)")
    g.add_argument("--text_tower_kwargs", default=None,
                   help='JSON for our text tower: width, depth, heads, mlp_ratio (default 512, 12, 8, 4)')
    g.add_argument("--itc_embed_dim", type=int, default=512, help=f"--model {DUAL_ENCODER}: shared embedding dim")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="training data (required, by flag or --config)")
    g.add_argument("--val_data_path", default=None, help="held-out data evaluated at every epoch end")
    g.add_argument("--eval_first", action="store_true", help="also evaluate before the first step of a fresh run")
    g.add_argument("--tokenizer", default=None,
                   help=f"vocab.txt, tokenizer.json or a folder; default: the resumed checkpoint's, else "
                        f"{DEFAULT_TOKENIZER}")
    g.add_argument("--do_lower_case", default=None, action="store_true")
    g.add_argument("--no_lower_case", dest="do_lower_case", action="store_false")
    g.add_argument("--max_text_len", type=int, default=196)
    g.add_argument("--mlm_prob", type=float, default=0.15)
    g.add_argument("--num_workers", type=int, default=8)
    g.add_argument("--pin_mem", default=True, action=__import__("argparse").BooleanOptionalAction)
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=64, help="per process, per accumulation step")
    g.add_argument("--accum_iter", type=int, default=1)
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--warmup_epochs", type=float, default=10)
    g.add_argument("--blr", type=float, default=1.5e-4, help="lr = blr * effective batch / 256")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min_lr", type=float, default=1e-6)
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--opt_betas", type=float, nargs=2, default=[0.9, 0.98])
    g.add_argument("--clip_grad", type=float, default=None)
    g = p.add_argument_group("LoRA and self-regularization")
    g.add_argument("--lora_rank", type=int, default=0)
    g.add_argument("--lora_alpha", type=float, default=1.0, help="scale = alpha / rank")
    g.add_argument("--self_regularization", action="store_true")
    g.add_argument("--reg_loss_weight", type=float, default=0.0)
    g = p.add_argument_group("image modes")
    g.add_argument("--image_norm", default=None, choices=sorted(IMAGE_NORMS),
                   help="pixel normalisation; default: the resumed checkpoint's, else beit (0.5/0.5, as BEiT weights "
                        "were trained)")
    g.add_argument("--color_jitter", type=float, default=0.4)
    g.add_argument("--mim_target", default="dalle", choices=MIM_TARGETS,
                   help="dalle: dVAE tokens of the masked patches; pixel: normalised-pixel regression")
    g.add_argument("--dvae_path", default=DEFAULT_DVAE,
                   help="DALL-E encoder.pkl or its safetensors conversion (util/convert_dvae.py); an "
                        "encoder.safetensors beside the .pkl is preferred")
    g.add_argument("--num_mask_patches", type=int, default=75)
    g.add_argument("--min_mask_patches", type=int, default=16)
    g.add_argument("--max_mask_aspect", type=float, default=1 / 0.3)
    g.add_argument("--itc_loss", default="clip", choices=ITC_LOSSES)
    g.add_argument("--itc_crop_min_scale", type=float, default=0.5)
    g.add_argument("--itc_pool", default="cls", choices=["cls", "mean"],
                   help="embedding of each tower: the CLS token (VLMo), or the mean of its tokens, which trains "
                        "from random initialisation much sooner on small models")
    g.add_argument("--lock_image", action="store_true", help="LiT: image tower frozen, embeddings unchanged")
    g.add_argument("--lock_text", action="store_true")
    g.add_argument("--zeroshot_data_path", default=None, help="ImageNet-style folder for zero-shot evaluation")
    g.add_argument("--zeroshot_classnames", default=None, help="wnid<TAB>name file (default: folder names)")
    g.add_argument("--zeroshot_templates", default=None, help="prompt templates, one per line with {}")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--resume", default="", help="training checkpoint, weights file, or 'auto'")
    g.add_argument("--save_per_epochs", type=int, default=20, help="keep a copy every N epochs")
    g.add_argument("--save_every_minutes", type=float, default=30.0)
    g.add_argument("--save_every_steps", type=int, default=0)
    g.add_argument("--save_merged_lora_model", action="store_true",
                   help="at the end, also write checkpoint-merged.pth: LoRA adapters merged into the weights, no "
                        "lora_* tensors (the file the next stage resumes from)")
    return p


def resolve_mode(args):
    if args.mode:
        return args.mode
    for mode in MODES:
        if args.exp_name == mode or args.exp_name.startswith(mode):
            return mode
    raise UserError(f"--exp_name {args.exp_name!r} does not name a mode ({', '.join(MODES)}); pass --mode")


def parse_args(argv=None):
    args = parse_with_config(get_args_parser(), argv)
    args.mode = resolve_mode(args)
    if args.model not in model_names() + [DUAL_ENCODER]:
        raise UserError(f"--model {args.model!r} is unknown; known: {', '.join(model_names() + [DUAL_ENCODER])}")
    if args.model == DUAL_ENCODER and args.mode != "image_text_itc":
        raise UserError(f"--model {DUAL_ENCODER} trains only the image_text_itc mode, not {args.mode}")
    if not args.data_path:
        raise UserError("--data_path is required (on the command line or in the --config file)")
    if not os.path.exists(args.data_path):
        raise UserError(f"--data_path: not found: {args.data_path}")
    if args.val_data_path and not os.path.exists(args.val_data_path):
        raise UserError(f"--val_data_path: not found: {args.val_data_path}")
    for flag in ("batch_size", "accum_iter", "epochs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1")
    if args.lora_rank < 0:
        raise UserError("--lora_rank must be >= 0")
    if args.lock_image and args.lock_text:
        raise UserError("--lock_image and --lock_text together leave nothing to train")
    args.log_dir = args.log_dir or args.output_dir
    return args


def resolve_run_args(args, world_size):
    """Fill in everything derived from the launch (once; saved to args.json, never changed after)."""
    resolve_batch_and_lr(args, world_size)
    args.use_self_regularization = bool(args.self_regularization and args.reg_loss_weight > 0 and args.lora_rank > 0)
    return args


def load_run_tokenizer(args, plan):
    state = plan.ckpt.get("tokenizer") if isinstance(plan.ckpt, dict) else None
    if args.tokenizer is None and state:
        LOG.info(f"tokenizer: inherited from {plan.path}")
        return tokenizer_from_any_state(state)
    path = args.tokenizer or DEFAULT_TOKENIZER
    tok = load_tokenizer(path, do_lower_case=args.do_lower_case, max_len=args.max_text_len)
    LOG.info(f"tokenizer: {path} ({tok.vocab_size} tokens, lower case {tok.do_lower_case})")
    return tok


def model_overrides(args, tokenizer, mim_vocab=None):
    overrides = dict(vocab_size=tokenizer.vocab_size, ffn_layout=args.ffn_layout, drop_path_rate=args.drop_path,
                     mim_target=args.mim_target, itc_loss=args.itc_loss, itc_pool=args.itc_pool,
                     max_text_len=max(args.max_text_len, 196))
    if args.img_size:
        overrides["img_size"] = args.img_size
    if mim_vocab:
        overrides["mim_vocab_size"] = mim_vocab
    return overrides


def build_model(args, overrides, plan):
    model = create_model(args.model, **overrides)
    provided = []
    if plan.kind == "weights":
        report = load_pretrained_weights(model, plan.state_dict, plan.path, "--resume", plan.ckpt.get("model_config"))
        provided = report["loaded"]
        LOG.info(f"loaded {len(report['loaded'])} tensors from {plan.path}; resized {len(report['resized'])}; "
                 f"newly initialised {len(report['missing'])}; unused {len(report['unused'])}"
                 + (f"; dropped heads of another shape: {report['dropped']}" if report["dropped"] else ""))
    elif plan.kind == "train":
        check_architecture(plan.ckpt.get("model_config"), model.config, plan.path, "--resume")
        provided = plan.ckpt.get("provided_keys", [])
    groups = configure_trainable(model, args.mode, args.lora_rank, args.lora_alpha, provided, args.lock_image,
                                 args.lock_text, args.reg_loss_weight if args.use_self_regularization else 0.0)
    if plan.kind == "train":
        load_full_state(model, plan.state_dict, plan.path)
    return model, provided, groups


def main(argv=None):
    return entry_point(parse_args, run, argv)


def run(args, argv):
    env = start_run(args, resolve_run_args)
    LOG.info(f"mode {args.mode} | model {args.model} ({args.ffn_layout}) | {env.world_size} process(es) via "
             f"{env.launcher} on {env.device} | effective batch {args.effective_batch_size} | lr {args.lr:.3e}")
    torch.manual_seed(args.seed + env.rank)
    plan = plan_resume(args.output_dir, args.resume, args.mode)
    LOG.info(plan.reason)
    if args.model == DUAL_ENCODER:
        model, tokenizer, provided, groups = build_dual_encoder_run(args, plan, lambda: load_run_tokenizer(args, plan))
        target_fn, arch = None, model.config
    else:
        tokenizer = load_run_tokenizer(args, plan)
        target_fn, mim_vocab = build_mim_targets(args, env.device)
        overrides = model_overrides(args, tokenizer, mim_vocab)
        arch = model_config(args.model, **overrides)
    image_state = resolve_image_state(args, plan, arch["img_size"])
    grid = (arch["img_size"] // arch["patch_size"],) * 2 if arch.get("patch_size") else None
    data = build_pretrain_data(args, tokenizer, env.rank, env.world_size, image_state, grid)
    steps_per_epoch = data.batches_per_epoch // args.accum_iter
    if steps_per_epoch < 1:
        raise UserError(f"--data_path: one epoch gives {data.batches_per_epoch} batches per process, fewer than "
                        f"--accum_iter {args.accum_iter}")
    if args.model != DUAL_ENCODER:
        model, provided, groups = build_model(args, overrides, plan)
    log_trainable(model, groups)
    model.to(env.device)
    optimizer = build_adamw(model, args.lr, args.weight_decay, tuple(args.opt_betas))
    autocast_dtype, scaler = autocast_setup(args.precision, env.device)
    start_epoch, start_step, global_step = 0, 0, 0
    if plan.kind == "train":
        optimizer.load_state_dict(plan.ckpt["optimizer"])
        if scaler is not None and plan.ckpt.get("scaler"):
            scaler.load_state_dict(plan.ckpt["scaler"])
        start_epoch, start_step = plan.ckpt["epoch"], plan.ckpt["step_in_epoch"]
        global_step = plan.ckpt["global_step"]
        rngs = plan.ckpt.get("rng") or []
        if rngs:
            set_rng_state(rngs[env.rank % len(rngs)])
    ddp = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.distributed else model
    cfg = EngineConfig(args.mode, env.device, args.accum_iter, steps_per_epoch, args.epochs, args.batch_size, args.lr,
                       args.min_lr, int(args.warmup_epochs * steps_per_epoch), args.clip_grad, autocast_dtype,
                       args.log_freq)
    if env.is_main:
        write_args_json(os.path.join(args.output_dir, "args.json"), args, argv, env.world_size,
                        {"model_config": model.config, "resumed_from": plan.path, "resume_kind": plan.kind,
                         "steps_per_epoch": steps_per_epoch, "num_train": data.num_train, "num_val": data.num_val})

    def build_state(epoch, step_in_epoch, step):
        return {"model": model.state_dict(), "model_config": model.config, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch,
                "step_in_epoch": step_in_epoch, "global_step": step, "mode": args.mode,
                "batches_consumed": step_in_epoch * args.accum_iter, "args": _plain(vars(args)),
                "provided_keys": list(provided), "tokenizer": tokenizer.to_state(), "image_preprocess": image_state}

    checkpointer = Checkpointer(args.output_dir, build_state, env.device, args.save_per_epochs, args.save_every_steps,
                                args.save_every_minutes)
    run_log = RunLog(args.output_dir, args.log_dir, env.is_main)
    evaluate_epoch = build_evaluators(args, data, tokenizer, image_state, env.rank, env.world_size, target_fn)
    bad_samples = BadSampleLog(args.output_dir, env.rank)
    post_step = _clamp_logit_scale(model) if args.mode == "image_text_itc" and args.itc_loss == "clip" else None
    if start_epoch >= args.epochs:
        LOG.info(f"nothing to do: the checkpoint is at epoch {start_epoch} of {args.epochs}")
    LOG.info(f"training {args.epochs - start_epoch} epoch(s) of {steps_per_epoch} steps from epoch {start_epoch + 1} "
             f"step {start_step + 1}; {data.num_train} training samples, {data.num_val} held out")
    started = time.time()
    try:
        if args.eval_first and evaluate_epoch is not None and global_step == 0:
            held_out(evaluate_epoch, model, cfg, 0, 0, run_log)
        for epoch in range(start_epoch, args.epochs):
            data.train_sampler.set_epoch(epoch, start=start_step * args.accum_iter * args.batch_size)
            global_step = train_one_epoch(ddp, model, data.train_loader, optimizer, scaler, epoch, start_step,
                                          global_step, cfg, target_fn=target_fn, post_step=post_step,
                                          checkpointer=checkpointer, run_log=run_log, bad_sample_sink=bad_samples)
            start_step = 0
            if evaluate_epoch is not None:
                held_out(evaluate_epoch, model, cfg, epoch + 1, global_step, run_log)
            checkpointer.end_of_epoch(epoch, args.epochs, global_step)
    except (NonFiniteLoss, NonFiniteCheckpoint) as e:
        LOG.error(f"stopping: {e}")
        raise SystemExit(3) from None
    finally:
        run_log.close()
    if args.save_merged_lora_model and args.lora_rank > 0 and env.is_main:
        from util.merge_lora import write_merged
        dst = os.path.join(args.output_dir, "checkpoint-merged.pth")
        rep = write_merged(build_state(args.epochs, 0, global_step), dst,
                           source=os.path.join(args.output_dir, "checkpoint-latest.pth"))
        LOG.info(f"merged {len(rep['layers'])} LoRA layers (rank {rep['rank']}, alpha {rep['alpha']:g}) -> {dst}")
    LOG.info(f"done in {(time.time() - started) / 60:.1f} min; checkpoints in {args.output_dir}")
    return 0


def held_out(evaluate_epoch, model, cfg, epoch, global_step, run_log):
    """Evaluate on every rank, log the numbers (console, TensorBoard, log.jsonl); stop on non-finite ones."""
    stats = evaluate_epoch(model, cfg)
    when = "before training" if epoch == 0 else f"after epoch {epoch}"
    LOG.info(f"held-out {when}: " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    run_log.write({"epoch": epoch, **stats}, global_step, prefix="val")
    if not all(math.isfinite(v) for v in stats.values()):
        raise NonFiniteLoss(f"non-finite held-out metrics {when}: {stats}")


def _clamp_logit_scale(model):
    from models.contrastive import clamp_logit_scale_

    return lambda: clamp_logit_scale_(model.logit_scale)


def _plain(d):
    """args as str/int/float/bool/None/list only (checkpoints load with weights_only=True)."""
    out = {}
    for k, v in d.items():
        out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else \
            list(v) if isinstance(v, (list, tuple)) else str(v)
    return out


if __name__ == "__main__":
    sys.exit(main())
