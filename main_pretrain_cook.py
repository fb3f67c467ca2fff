"""Pretraining entry point: args -> mode -> data -> model -> engine, for every mode in modes/ (text_mlm,
image_mim, image_text_itc, text_distill). Launch with `torchrun --nproc_per_node=N main_pretrain_cook.py ...` (or under SLURM)."""
import argparse
import os
import sys
import time

import torch

from custom_datasets.hf_tokenizer import choose_tokenizer
from custom_datasets.image_dataset import IMAGE_NORMS, inherit_image_state
from custom_datasets.pair_dataset import DEFAULT_MAX_IMAGE_PIXELS, is_shard_path, set_max_image_pixels
from engine_pretrain import Trainer, held_out, run_config, stop_for_preemption, train_one_epoch
from models.checkpointing import apply_block_options
from models.loading import load_weights, model_for_resume
from models.parking import park_off_path
from models.sharding import describe_shards, shard_model
from models.registry import (DUAL_ENCODER, check_overrides, create_model, model_config, model_names, model_options,
                             patch_grid, switches_of)
from models.trainable import configure_trainable
from modes import all_modes, get_mode, mode_names
from modes.base import PretrainModel
from util import dist as du
from util.bad_samples import BadSampleLog
from util.checkpoint import LATEST
from util.checkpointer import Checkpointer
from util.config import (add_optimizer_args, add_run_args, add_scale_args, json_mapping, make_parser, parse_with_config,
                         write_args_json)
from util.errors import UserError
from util.flag_checks import (Bounded, check_output_dir, check_paths, fraction, no_effect_warnings, non_negative_float,
                              non_negative_int, positive_float, positive_int)
from util.logger import LOG, RunLog, warn_once
from util.optim_factory import build_adamw
from util.preemption import PreemptionWatch
from util.resume import plan_resume
from util.sharded_checkpoint import LATEST_SHARDED, full_model_state, load_model_state, optimizer_state
from util.run_common import (RunPosition, adapt_to_world_size, autocast_setup, batch_to_device, entry_point,
                             load_full_state, log_trainable, open_run_folder, resolve_batch_and_lr,
                             restore_training_state, start_processes, training_state, wrap_ddp)

DEFAULT_TOKENIZER = "checkpoints/tokenizer/"


def get_args_parser():
    p = make_parser("Pretrain a VLMo-style multiway transformer")
    g = p.add_argument_group("run")
    g.add_argument("--exp_name", default="text_mlm", help="run name; selects the mode unless --mode is given")
    g.add_argument("--mode", default=None, choices=mode_names(), help="the pretraining mode (default: from --exp_name)")
    g.add_argument("--output_dir", default="outputs/run", help="checkpoints, logs and args.json (created)")
    g.add_argument("--check", action="store_true",
                   help="validate flags and files, run a tokenizer round trip and one batch through the data "
                        "pipeline, build the model on the meta device, then exit 0 (or 2 with the error) without "
                        "training or writing anything; run it once before torchrun")
    add_run_args(g)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vlmo_base_patch16", help=f"one of: {', '.join(model_names())}")
    g.add_argument("--model_kwargs", default=None,
                   help='JSON of registry overrides, e.g. \'{"embed_dim": 128, "depth": 4, "num_heads": 2, '
                        '"patch_size": 8}\' (a mapping in --config)')
    g.add_argument("--ffn_layout", default="multiway", choices=["multiway", "shared"],
                   help="multiway: an expert FFN per modality (VLMo); shared: one FFN for all")
    g.add_argument("--img_size", type=positive_int(), default=None, help="default: the model's")
    g.add_argument("--drop_path", type=fraction(open_high=True), default=0.1, help="stochastic depth rate")
    add_scale_args(g, fsdp=True)
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
    g.add_argument("--itc_embed_dim", type=positive_int(), default=512, help=f"--model {DUAL_ENCODER}: shared embedding dim")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, help="training data (required, by flag or --config)")
    g.add_argument("--val_data_path", default=None, help="held-out data evaluated at every epoch end")
    g.add_argument("--eval_first", action="store_true", help="also evaluate before the first step of a fresh run")
    g.add_argument("--tokenizer", default=None,
                   help=f"vocab.txt, tokenizer.json or a folder; default: the resumed checkpoint's, else "
                        f"{DEFAULT_TOKENIZER}")
    g.add_argument("--do_lower_case", default=None, action="store_true",
                   help="lowercase text (default: the tokenizer's own setting)")
    g.add_argument("--no_lower_case", dest="do_lower_case", action="store_false", help="keep the case of text")
    g.add_argument("--max_text_len", type=Bounded(int, 3), default=196,
                   help="tokens per caption, [CLS] and [SEP] included")
    g.add_argument("--image_norm", default=None, choices=sorted(IMAGE_NORMS),
                   help="pixel normalisation; default: the resumed checkpoint's, else beit (0.5/0.5, as BEiT weights "
                        "were trained)")
    g.add_argument("--eval_crop_pct", type=fraction(open_low=True), default=None,
                   help="evaluation view: resize the shorter side to size / pct, centre-crop size; default: the "
                        "resumed run's, else the mode's (image_text_itc 1.0, the whole image training sees; "
                        "others 0.875); saved with the run")
    g.add_argument("--num_workers", type=non_negative_int(), default=8, help="data loader processes per rank")
    g.add_argument("--pin_mem", default=True, action=argparse.BooleanOptionalAction,
                   help="page-locked host memory for batches (CUDA only)")
    g.add_argument("--max_image_pixels", type=positive_int(), default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="larger images decode at reduced size (JPEG: 1/2, 1/4 or 1/8) or, when they cannot, are "
                        "replaced and listed like unreadable ones")
    g = p.add_argument_group("optimisation")
    add_optimizer_args(g, 100, 10, 1.5e-4, (0.9, 0.98))
    g = p.add_argument_group("LoRA and self-regularization")
    g.add_argument("--lora_rank", type=non_negative_int(), default=0, help="> 0: LoRA adapters of this rank")
    g.add_argument("--lora_alpha", type=positive_float(), default=1.0, help="scale = alpha / rank")
    g.add_argument("--self_regularization", action="store_true",
                   help="with --lora_rank and --reg_loss_weight: keep the adapted model close to the loaded one")
    g.add_argument("--reg_loss_weight", type=non_negative_float(), default=0.0, help="weight of the self-regularization loss")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--resume", default="", help="training checkpoint, weights file, or 'auto'")
    g.add_argument("--save_per_epochs", type=non_negative_int(), default=20, help="keep a copy every N epochs")
    g.add_argument("--save_every_minutes", type=non_negative_float(), default=30.0, help="0: off")
    g.add_argument("--save_every_steps", type=non_negative_int(), default=0, help="0: off")
    g.add_argument("--save_merged_lora_model", action="store_true",
                   help="at the end, also write checkpoint-merged.pth: LoRA adapters merged into the weights, no "
                        "lora_* tensors (the file the next stage resumes from)")
    added = []  # a mode derived from another shares its flags
    for mode in all_modes():
        if mode.add_args not in added:
            mode.add_args(p.add_argument_group(f"mode {mode.name}"))
            added.append(mode.add_args)
    return p


def resolve_mode(args):
    if args.mode:
        return args.mode
    for mode in mode_names():
        if args.exp_name == mode or args.exp_name.startswith(mode):
            return mode
    raise UserError(f"--exp_name {args.exp_name!r} does not name a mode ({', '.join(mode_names())}); pass --mode")


def parse_args(argv=None):
    parser = get_args_parser()
    args = parse_with_config(parser, argv)
    args.mode = resolve_mode(args)
    if args.model not in model_names():
        raise UserError(f"--model {args.model!r} is unknown; known: {', '.join(model_names())}")
    for flag in ("model_kwargs", "image_tower_kwargs", "text_tower_kwargs"):
        setattr(args, flag, json_mapping(getattr(args, flag), f"--{flag}"))
    try:
        check_overrides(args.model, args.model_kwargs)
    except KeyError as e:
        raise UserError(f"--model_kwargs: {e.args[0]}") from None
    kind = DUAL_ENCODER if args.model == DUAL_ENCODER else None
    if kind not in get_mode(args.mode).model_kinds:
        raise UserError(f"--model {args.model} does not train the {args.mode} mode")
    get_mode(args.mode).resolve_defaults(args)
    if args.lock_image and args.lock_text:
        raise UserError("--lock_image and --lock_text together leave nothing to train")
    locked = "image" if args.lock_image else "text" if args.lock_text else None
    if args.save_merged_lora_model and args.lora_rank > 0 and locked and args.model != DUAL_ENCODER:
        raise UserError(f"--save_merged_lora_model: with --lock_{locked} the LoRA adapters on the shared attention "
                        f"act on the other modality only; merged they would change the locked {locked} tower. "
                        "Drop the flag and use checkpoint-latest.pth with its adapters")
    try:
        grid = patch_grid(args.model, args.img_size, args.model_kwargs)
    except ValueError as e:
        flag = "--model_kwargs img_size" if "img_size" in args.model_kwargs else "--img_size"
        raise UserError(f"{flag} {e}") from None
    if args.fsdp and args.precision == "fp16":
        raise UserError("--precision fp16 with --fsdp: sharded training uses bf16 (or fp32); pick --precision bf16")
    if not args.data_path:
        raise UserError("--data_path is required (on the command line or in the --config file)")
    check_paths(args, ("data_path", "val_data_path", "image_tower_weights", "zeroshot_data_path",
                       "zeroshot_classnames", "zeroshot_templates"))
    get_mode(args.mode).check_inputs(args, grid)
    args.log_dir = args.log_dir or args.output_dir
    for flag in ("output_dir", "log_dir"):
        check_output_dir(getattr(args, flag), f"--{flag}")
    for warning in no_effect_warnings(args, parser):
        warn_once(f"warning: {warning}")
    return args


def resolve_run_args(args, world_size):
    """Fill in everything derived from the launch (once; saved to args.json, never changed after)."""
    resolve_batch_and_lr(args, world_size)
    args.use_self_regularization = bool(args.self_regularization and args.reg_loss_weight > 0 and args.lora_rank > 0)
    if args.self_regularization and not args.use_self_regularization:
        warn_once(f"warning: --self_regularization needs --lora_rank > 0 and --reg_loss_weight > 0 (given "
                    f"{args.lora_rank} and {args.reg_loss_weight:g}): it is off, and args.json says so")
        args.self_regularization = False
    if args.fsdp and world_size == 1:
        warn_once("warning: --fsdp on one process has nothing to shard over: training unsharded, with single-file "
                  "checkpoints (args.json records fsdp false)")
        args.fsdp = False
    return args


def hf_text_folder(args):
    """The Hugging Face folder of a model whose text tower brings its own tokenizer, else None."""
    tower = args.model_kwargs.get("text_tower", args.text_tower)
    return tower if "text_tower" in model_options(args.model) and tower != "ours" else None


def load_run_tokenizer(args, plan):
    state = plan.ckpt.get("tokenizer") if isinstance(plan.ckpt, dict) else None
    return choose_tokenizer(args.tokenizer, DEFAULT_TOKENIZER, args.do_lower_case, args.max_text_len,
                            hf_text_folder(args), state if args.tokenizer is None else None, plan.path, LOG.info)


def model_overrides(args, tokenizer, mode, fresh):
    """Registry overrides of this run: the flags and the tokenizer where the model has such a setting, the
    mode's own (heads, losses; for a `fresh` model also its fresh_model_overrides), then --model_kwargs, which
    wins."""
    run = dict(vocab_size=tokenizer.vocab_size, ffn_layout=args.ffn_layout, drop_path_rate=args.drop_path,
               max_text_len=args.max_text_len if hf_text_folder(args) else max(args.max_text_len, 196),
               image_tower=args.image_tower, image_tower_weights=args.image_tower_weights,
               image_tower_kwargs=args.image_tower_kwargs, text_tower=args.text_tower,
               text_tower_kwargs=args.text_tower_kwargs)
    if "image_tower" in model_options(args.model):
        run["embed_dim"] = args.itc_embed_dim  # the dual encoder's shared embedding; a backbone's is its width
    if args.img_size:
        run["img_size"] = args.img_size
    options, own = model_options(args.model), mode.model_overrides()  # e.g. text_distill: the teacher's architecture
    if fresh:  # a loaded model keeps the registry's values: the loader rescales what it stores to them
        run.update(mode.fresh_model_overrides(set(options) - set(own) - set(args.model_kwargs)))
    run.update(own)
    return {**{k: v for k, v in run.items() if k in options}, **args.model_kwargs}


def build_model(args, overrides, plan):
    """(model, provided keys, trainable groups): built, weights loaded, what trains decided (before the
    optimizer and DDP exist)."""
    if plan.kind == "train":
        model = model_for_resume(plan.ckpt.get("model_config"), args.model, overrides, plan.path)
        provided = plan.ckpt.get("provided_keys", [])
    else:
        if plan.kind == "weights":  # e.g. a converted VLMo file: its text positions, token types, VL experts
            overrides = {**overrides, **switches_of(plan.ckpt.get("model_config"), args.model_kwargs)}
        model = create_model(args.model, **overrides)
        provided = list(getattr(model, "pretrained_keys", []))
    if plan.kind == "weights":
        report = load_weights(model, plan.state_dict, plan.path, "--resume", plan.ckpt.get("model_config"))
        provided = sorted(set(provided) | set(report["loaded"]))
        LOG.info(f"loaded {len(report['loaded'])} tensors from {plan.path}; resized {len(report['resized'])}; "
                 f"newly initialised {len(report['missing'])}; unused {len(report['unused'])}"
                 + (f"; dropped heads of another shape: {report['dropped']}" if report["dropped"] else ""))
    groups = configure_trainable(model, args.mode, args.lora_rank, args.lora_alpha, provided, args.lock_image,
                                 args.lock_text, args.reg_loss_weight if args.use_self_regularization else 0.0)
    if args.lora_rank > 0 and not any("lora_" in n for names in groups.values() for n in names):
        warn_once(f"warning: --lora_rank {args.lora_rank}: no loaded weight is on this mode's path (LoRA adapts the "
                    "weights --resume provides), so no adapter exists and every parameter trains fully"
                    + ("; --self_regularization is off with it" if args.use_self_regularization else "")
                    + ". args.json records --lora_rank 0")
        args.lora_rank, args.use_self_regularization, args.self_regularization = 0, False, False
    if plan.kind == "train" and plan.ckpt.get("sharded"):  # read through DCP, resharded to this run
        load_model_state(model, plan.path)
    elif plan.kind == "train":
        load_full_state(model, plan.state_dict, plan.path)
    return model, provided, groups


def main(argv=None):
    return entry_point(parse_args, run, argv)


def run(args, argv):
    """Flags were checked by parse_args; here the files are read (the resumed checkpoint, the tokenizer),
    then the output folder is made, then the data is scanned and the model built."""
    env = start_processes(args, resolve_run_args)
    watch = PreemptionWatch().install()
    LOG.info(f"mode {args.mode} | model {args.model} ({args.ffn_layout}) | {env.world_size} process(es) via "
             f"{env.launcher} on {env.device} | effective batch {args.effective_batch_size} | lr {args.lr:.3e}")
    torch.manual_seed(args.seed + env.rank)
    plan = plan_resume(args.output_dir, args.resume, args.mode)
    LOG.info(plan.reason)
    if plan.kind == "train" and not args.check:  # --check runs in one process, before the real launch
        adapt_to_world_size(args, plan.ckpt, plan.path, sharded=is_shard_path(args.data_path))
    mode = get_mode(args.mode)(args)
    tokenizer = load_run_tokenizer(args, plan)
    plan = mode.starting_point(plan, tokenizer)
    if args.check:
        return check_run(args, env, plan, mode, tokenizer)
    open_run_folder(args, env)
    overrides, image_state, data, steps_per_epoch = build_run_data(args, env, plan, mode, tokenizer)
    with torch.random.fork_rng(devices=[]):  # the same initial weights on every rank (FSDP shards them as built)
        torch.manual_seed(args.seed)
        backbone, provided, groups = build_model(args, overrides, plan)
        if plan.kind != "train":
            mode.init_fresh(backbone, set(provided), args.effective_batch_size)
    log_trainable(backbone, groups)
    apply_block_options(backbone, args.grad_checkpointing, args.compile, LOG.info)
    parked = park_off_path(backbone, args.mode, mode.eval_towers())  # frozen, off this mode's path: stays on the CPU, outside DDP
    LOG.info(parked.describe(env.device, args.mode))
    model = PretrainModel(backbone, mode).to(env.device)
    mode.before_training(backbone, env)
    autocast_dtype, scaler = autocast_setup(args.precision, env.device)
    wrapped = shard_model(model, autocast_dtype if env.device.type == "cuda" else None) if args.fsdp else \
        wrap_ddp(model, env)  # the optimizer is built over the sharded parameters
    if args.fsdp:
        LOG.info(describe_shards(model))
    optimizer = build_adamw(backbone, args.lr, args.weight_decay, tuple(args.opt_betas))
    pos = restore_training_state(plan.ckpt, optimizer, scaler, env.rank, env.world_size, args.seed, plan.path,
                                 model=backbone) if plan.kind == "train" else RunPosition()
    plan.ckpt = None  # set-up is done: the loaded (memory-mapped) checkpoint is released for the whole run
    cfg = run_config(args, env.device, steps_per_epoch, autocast_dtype)
    if env.is_main:
        write_args_json(os.path.join(args.output_dir, "args.json"), args, argv, env.world_size,
                        {"model_config": backbone.config, "resumed_from": plan.path, "resume_kind": plan.kind,
                         "steps_per_epoch": steps_per_epoch, "num_train": data.num_train, "num_val": data.num_val})
    data_state = {"tokenizer": tokenizer.to_state(), "image_preprocess": image_state}

    def build_state(epoch, step_in_epoch, step, whole=False):
        with parked.attached():  # the whole model in every checkpoint (FSDP: this rank's shards)
            model_state = full_model_state(backbone) if whole and args.fsdp else backbone.state_dict()
        # FSDP: keyed by parameter name, the sharded checkpoint's layout
        opt_state = optimizer_state(backbone, optimizer) if args.fsdp else optimizer.state_dict()
        return training_state(model_state=model_state, model_config=backbone.config, optimizer_state=opt_state,
                              scaler=scaler, position=RunPosition(epoch=epoch, step_in_epoch=step_in_epoch,
                                                                  global_step=step),
                              mode=args.mode, args=args, accum_iter=args.accum_iter, provided=provided,
                              data_state=data_state)

    trainer = Trainer(model=wrapped, raw_model=model, optimizer=optimizer, scaler=scaler, cfg=cfg,
                      post_step=mode.post_step(backbone), monitor=mode.monitor(), run_log=RunLog(args.output_dir, args.log_dir, env.is_main),
                      checkpointer=Checkpointer(args.output_dir, build_state, env.device, args.save_per_epochs,
                                                args.save_every_steps, args.save_every_minutes, sharded=args.fsdp),
                      preemption=watch, bad_samples=BadSampleLog(args.output_dir, env.rank))
    eval_sets = mode.eval_sets(data, tokenizer, image_state, env.rank, env.world_size)
    if pos.epoch >= args.epochs:
        LOG.info(f"nothing to do: the checkpoint is at epoch {pos.epoch} of {args.epochs}")
    LOG.info(f"training {args.epochs - pos.epoch} epoch(s) of {steps_per_epoch} steps from epoch {pos.epoch + 1} "
             f"step {pos.step_in_epoch + 1}; {data.num_train} training samples, {data.num_val} held out")
    started, global_step, start_step = time.time(), pos.global_step, pos.step_in_epoch
    try:
        if args.eval_first and eval_sets and global_step == 0:
            du.call_whole(model, held_out, eval_sets, backbone, cfg, 0, 0, trainer.run_log)
        for epoch in range(pos.epoch, args.epochs):
            data.train_sampler.set_epoch(epoch, start=start_step * args.accum_iter * args.batch_size)
            global_step = train_one_epoch(trainer, data.train_loader, epoch, start_step, global_step)
            start_step = 0
            with watch.holding():  # evaluation and the save run to their end, a signal waits for them
                if eval_sets:
                    du.call_whole(model, held_out, eval_sets, backbone, cfg, epoch + 1, global_step, trainer.run_log)
                trainer.checkpointer.end_of_epoch(epoch, args.epochs, global_step)
            if epoch + 1 < args.epochs and watch.pending():
                stop_for_preemption(trainer, epoch + 1, 0, global_step, saved=True)
    finally:
        watch.finish()
        trainer.run_log.close()
    if args.save_merged_lora_model and args.lora_rank > 0:
        from util.merge_lora import write_merged
        dst, final = os.path.join(args.output_dir, "checkpoint-merged.pth"), build_state(args.epochs, 0, global_step, True)
        if env.is_main:  # (FSDP: every rank took part in gathering the whole weights; the others wait for this
            # write in util.run_common.entry_point)
            rep = write_merged(final, dst, source=os.path.join(args.output_dir, LATEST_SHARDED if args.fsdp else LATEST))
            LOG.info(f"merged {len(rep['layers'])} LoRA layers (rank {rep['rank']}, alpha {rep['alpha']:g}) -> {dst}")
    LOG.info(f"done in {(time.time() - started) / 60:.1f} min; checkpoints in {args.output_dir}")
    return 0


def build_run_data(args, env, plan, mode, tokenizer):
    """(model overrides, image preprocessing, PretrainData, optimizer steps per epoch): the mode set up and
    the data scanned."""
    set_max_image_pixels(args.max_image_pixels)
    mode.setup(env.device)
    overrides = model_overrides(args, tokenizer, mode, plan.kind == "none")
    arch = model_config(args.model, **overrides)
    record = plan.ckpt if isinstance(plan.ckpt, dict) else None
    crop_pct = args.eval_crop_pct
    if crop_pct is None:  # a resumed run keeps its view; a new stage takes its mode's
        crop_pct = ((record or {}).get("image_preprocess") or {}).get("crop_pct") if plan.kind == "train" else None
    image_state = inherit_image_state(args.image_norm, record, plan.path, arch["img_size"],
                                      crop_pct if crop_pct is not None else mode.eval_crop_pct)
    grid = (arch["img_size"] // arch["patch_size"],) * 2 if arch.get("patch_size") else None
    data = mode.build_data(tokenizer, image_state, env.rank, env.world_size, grid)
    steps_per_epoch = data.batches_per_epoch // args.accum_iter
    if steps_per_epoch < 1:
        raise UserError(f"--data_path: one epoch gives {data.batches_per_epoch} batches per process, fewer than "
                        f"--accum_iter {args.accum_iter}")
    return overrides, image_state, data, steps_per_epoch


def check_run(args, env, plan, mode, tokenizer):
    """--check: everything a run reads and builds before its first step, with nothing written: a tokenizer
    round trip, one batch from the data pipeline (in this process), the model on the meta device."""
    sample = "a photo of a dog"
    ids = tokenizer.encode_batch([sample])[0][0]
    back = tokenizer.decode(ids)
    if not back.strip():
        raise UserError(f"--tokenizer: {sample!r} encodes to special tokens only ({ids.tolist()})")
    LOG.info(f"check: tokenizer round trip {sample!r} -> {len(ids)} ids -> {back!r}")
    args.num_workers = 0
    overrides, _, data, steps_per_epoch = build_run_data(args, env, plan, mode, tokenizer)
    batch = next(iter(data.train_loader))
    tensors, _ = batch_to_device(batch, torch.device("cpu"))
    LOG.info("check: one batch: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))
    with torch.device("meta"):
        backbone, _, groups = build_model(args, overrides, plan)
    log_trainable(backbone, groups)
    LOG.info(f"check passed: {data.num_train} training samples ({steps_per_epoch} steps per epoch on "
             f"{env.world_size} process(es)), {data.num_val} held out; nothing was written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
