"""Fine-tuning entry point: args -> data -> model -> engine, for every task in tasks/.

    torchrun --nproc_per_node=8 main_finetune.py --task image_classification --finetune <pretrain ckpt> ...
    torchrun --nproc_per_node=8 main_finetune.py --task image_classification --eval --resume <fine-tuned ckpt> ...
"""
import argparse
import json
import os
import sys
import time

import torch

from custom_datasets.finetune_data import resolve_image_preprocess, resolve_tokenizer
from engine_pretrain import stop_for_preemption, Trainer, evaluate, run_config, train_one_epoch
from models.loading import check_architecture
from models.checkpointing import apply_block_options
from models.registry import LEGACY_DEFAULTS, backbone_names, create_model, model_config, recorded_config
from models.vlmo import ITC_LOSSES
from tasks import all_tasks, get_task, task_names
from tasks.base import (GLOBAL_POOLS, FinetuneModel, WeightEma, discard_pretraining_heads, load_backbone_weights,
                        set_trainable)
from util.bad_samples import BadSampleLog
from util.checkpoint import (LATEST, copy_atomic, extract_state_dict, is_training_checkpoint, latest_in, load_file,
                              written_by_rank0)
from util.checkpointer import Checkpointer
from util.config import (add_optimizer_args, add_run_args, add_scale_args, make_parser, parse_with_config,
                         write_args_json)
from util.errors import NonFiniteLoss, UserError
from util.evaluation import EvalSet
from util.flag_checks import (check_output_dir, check_paths, fraction, non_negative_float, non_negative_int,
                              positive_float, positive_int)
from util.layer_decay import layer_decay_scale
from util.logger import LOG, RunLog
from util.optim_factory import build_adamw
from util.preemption import PreemptionWatch
from util.resume import ResumePlan, plan_resume
from util.run_common import (RunPosition, wrap_ddp, autocast_setup, entry_point, load_full_state, log_trainable,
                             resolve_batch_and_lr, restore_training_state, start_run, training_state, adapt_to_world_size)

DEFAULT_TOKENIZER = "checkpoints/tokenizer/"
DEFAULT_MODEL = "vlmo_base_patch16"
BEST = "checkpoint-best.pth"
# Backbone settings a run inherits from its checkpoint's model_config unless a flag says otherwise (every switch
# that checkpoints record, LEGACY_DEFAULTS, among them).
_INHERITED_CONFIG = ("ffn_layout", "itc_loss", "max_text_len", "vocab_size", "mim_target", "mim_vocab_size",
                     "vl_start") + tuple(LEGACY_DEFAULTS)


def get_args_parser():
    p = make_parser("Fine-tune a VLMo-style multiway transformer on a downstream task")
    g = p.add_argument_group("run")
    g.add_argument("--task", default=None, help=f"one of: {', '.join(task_names())}")
    g.add_argument("--eval", action="store_true", help="only evaluate --resume (or --finetune) and exit")
    g.add_argument("--output_dir", default="outputs/finetune", help="checkpoints, logs and args.json (created)")
    add_run_args(g)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"one of: {', '.join(backbone_names())}; default: the checkpoint's, else {DEFAULT_MODEL}")
    g.add_argument("--finetune", default="", help="pretraining checkpoint (training or merged weights) to start from")
    g.add_argument("--ffn_layout", default=None, choices=["multiway", "shared"], help="default: the checkpoint's")
    g.add_argument("--itc_loss", default=None, choices=ITC_LOSSES, help="default: the checkpoint's")
    g.add_argument("--drop_path", type=fraction(open_high=True), default=0.1, help="stochastic depth rate")
    add_scale_args(g)
    g.add_argument("--global_pool", default="avg", choices=GLOBAL_POOLS,
                   help="classification/regression heads: mean of the tokens, or the CLS token")
    g.add_argument("--lora_rank", type=non_negative_int(), default=0, help="> 0: LoRA on the weights --finetune provided")
    g.add_argument("--lora_alpha", type=positive_float(), default=1.0, help="scale = alpha / rank")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the weights (evaluated and saved)")
    g.add_argument("--ema_decay", type=fraction(open_high=True), default=0.9999, help="--ema: weight of the old average")
    g = p.add_argument_group("data (the checkpoint's tokenizer and image preprocessing unless given)")
    g.add_argument("--data_path", default=None, help="training data of the task (required unless --eval)")
    g.add_argument("--val_data_path", default=None, help="held-out data evaluated at every epoch end")
    g.add_argument("--nb_classes", type=positive_int(), default=None, help="default: from the training data")
    g.add_argument("--tokenizer", default=None, help=f"vocab.txt, tokenizer.json or a folder; default: the "
                                                     f"checkpoint's, else {DEFAULT_TOKENIZER}")
    g.add_argument("--do_lower_case", default=None, action=argparse.BooleanOptionalAction,
                   help="lowercase text; default: the tokenizer's own setting")
    g.add_argument("--img_size", type=positive_int(), default=None, help="default: the checkpoint's")
    g.add_argument("--image_norm", default=None, help="beit, imagenet or clip mean/std")
    g.add_argument("--interpolation", default=None, help="bicubic, bilinear, lanczos or nearest")
    g.add_argument("--crop_pct", type=fraction(open_low=True), default=None, help="evaluation centre crop / resized side")
    g.add_argument("--num_workers", type=non_negative_int(), default=8, help="data loader processes per rank")
    g.add_argument("--pin_mem", default=True, action=argparse.BooleanOptionalAction,
                   help="page-locked host memory for batches (CUDA only)")
    g = p.add_argument_group("regularisation")
    g.add_argument("--mixup", type=non_negative_float(), default=0.0, help="mixup alpha (image classification)")
    g.add_argument("--cutmix", type=non_negative_float(), default=0.0, help="cutmix alpha (image classification)")
    g.add_argument("--smoothing", type=fraction(open_high=True), default=0.1, help="label smoothing (classification)")
    g = p.add_argument_group("optimisation")
    add_optimizer_args(g, 30, 5, 5e-4, (0.9, 0.999))
    g.add_argument("--layer_decay", type=fraction(open_low=True), default=0.75, help="lr scale per layer down from the top")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--resume", default="", help="fine-tuning checkpoint of this task, or 'auto'")
    g.add_argument("--save_per_epochs", type=non_negative_int(), default=0, help="keep a copy every N epochs (0: last only)")
    g.add_argument("--save_every_minutes", type=non_negative_float(), default=30.0, help="0: off")
    g.add_argument("--save_every_steps", type=non_negative_int(), default=0, help="0: off")
    for task in all_tasks():
        task.add_args(p)
    return p


def parse_args(argv=None):
    args = parse_with_config(get_args_parser(), argv)
    if args.task not in task_names():
        raise UserError(f"--task {args.task!r}: choose one of {', '.join(task_names())}")
    if args.model is not None and args.model not in backbone_names():
        raise UserError(f"--model {args.model!r} is unknown; known: {', '.join(backbone_names())}")
    check_paths(args, ("finetune", "data_path", "val_data_path"))
    check_output_dir(args.output_dir)
    args.log_dir = args.log_dir or args.output_dir
    return args


def resolve_run_args(args, world_size):
    """Everything derived from the launch, resolved once (saved to args.json, never changed after)."""
    return resolve_batch_and_lr(args, world_size)


def finetune_mode(task_name):
    return f"finetune:{task_name}"


NO_FINETUNE = "no --finetune: the backbone starts from random initialisation"


def _not_this_task(ckpt, path, task):
    if isinstance(ckpt, dict) and ckpt.get("task") and ckpt.get("task") != task:
        return UserError(f"--resume {path}: a fine-tuning checkpoint of task {ckpt['task']!r}, not {task!r}")
    return UserError(f"--resume {path}: not a fine-tuning checkpoint of {task}; start from pretrained weights "
                     "with --finetune instead")


def find_start(args):
    """Which checkpoint the run starts from, as a ResumePlan: "train" (a fine-tuning checkpoint of this task),
    "weights" (pretrained weights, --finetune) or "none". Training: this run's own latest checkpoint wins
    (requeue), then --resume, then --finetune. --eval: exactly the --resume file (or --finetune weights)."""
    mode = finetune_mode(args.task)
    if args.eval:
        if args.resume:
            path = latest_in(args.output_dir) if args.resume == "auto" else args.resume
            if path is None:
                raise UserError(f"--eval --resume auto: no {LATEST} in --output_dir {args.output_dir}")
            ckpt = load_file(path, "--resume")
            if not is_training_checkpoint(ckpt) or ckpt.get("mode") != mode:
                raise _not_this_task(ckpt, path, args.task)
            return ResumePlan("train", path, ckpt, f"evaluating {path} (epoch {ckpt['epoch']})")
        if args.finetune:
            return ResumePlan("weights", args.finetune, _load_weights(args.finetune),
                              f"evaluating the pretrained weights of {args.finetune} (any task head is untrained)")
        raise UserError("--eval needs --resume <fine-tuned checkpoint> (or --finetune <pretrained weights>)")
    plan = plan_resume(args.output_dir, args.resume, mode)
    if plan.kind == "train":
        return plan
    if plan.kind == "weights":
        raise _not_this_task(plan.ckpt, plan.path, args.task)
    if args.finetune:
        return ResumePlan("weights", args.finetune, _load_weights(args.finetune), f"fine-tuning from {args.finetune}")
    return ResumePlan("none", reason=plan.reason if args.resume else NO_FINETUNE)


def _load_weights(path):
    ckpt = load_file(path, "--finetune")
    if extract_state_dict(ckpt) is None:
        raise UserError(f"--finetune {path}: no model weights found (expected a state dict, possibly under 'model')")
    return ckpt if isinstance(ckpt, dict) and "model" in ckpt else {"model": extract_state_dict(ckpt)}


def backbone_settings(args, ckpt_config, tokenizer):
    """(model name, create_model overrides) from the flags, the checkpoint's model_config and the tokenizer."""
    ckpt_config = recorded_config(ckpt_config) or {}
    name = args.model or ckpt_config.get("name") or DEFAULT_MODEL
    overrides = {k: ckpt_config[k] for k in _INHERITED_CONFIG if k in ckpt_config}
    if args.ffn_layout:
        overrides["ffn_layout"] = args.ffn_layout
    if args.itc_loss:
        overrides["itc_loss"] = args.itc_loss
    if tokenizer is not None:
        overrides["vocab_size"] = tokenizer.vocab_size
        overrides["max_text_len"] = max(overrides.get("max_text_len", 196), tokenizer.max_len)
    overrides["drop_path_rate"] = args.drop_path
    return name, overrides


def build_model(args, task, name, overrides, start):
    """Backbone (pretraining heads the task does not use discarded, weights loaded) + the task's head, with
    everything off the task's path frozen. Returns (FinetuneModel, provided keys, trainable groups)."""
    backbone = create_model(name, **overrides)
    discarded = discard_pretraining_heads(backbone, task.keep_heads)
    provided = []
    if start.kind == "weights":
        report, lines = load_backbone_weights(backbone, extract_state_dict(start.ckpt), start.path,
                                              start.ckpt.get("model_config"), discarded)
        for line in lines:
            LOG.info(line)
        provided = report["loaded"]
    elif start.kind == "train":
        check_architecture(start.ckpt.get("model_config"), backbone.config, start.path, "--resume")
        provided = start.ckpt.get("provided_keys", [])
    if args.lora_rank and not provided:
        LOG.info("--lora_rank: no pretrained weights were loaded, so nothing is adapted; everything trains fully")
    head = task.build_head(backbone)
    groups = set_trainable(backbone, head, task, args.lora_rank, args.lora_alpha, provided)
    model = FinetuneModel(backbone, head, task)
    if start.kind == "train":
        load_full_state(model, start.ckpt["model"], start.path, " (check --lora_rank, --nb_classes)")
    return model, provided, groups


def main(argv=None):
    return entry_point(parse_args, run, argv)


def run(args, argv):
    env = start_run(args, resolve_run_args, "console_eval.log" if args.eval else "console.log")
    watch = PreemptionWatch().install()
    task_cls = get_task(args.task)
    start = find_start(args)
    if start.kind == "train" and not args.eval:
        adapt_to_world_size(args, start.ckpt, start.path)
    LOG.info(f"task {args.task} | {env.world_size} process(es) via {env.launcher} on {env.device} | "
             f"effective batch {args.effective_batch_size} | lr {args.lr:.3e} | {start.reason}")
    ckpt = start.ckpt or {}
    if args.eval and start.kind == "train":  # the checkpoint's adapters define the network being evaluated
        args.lora_rank = int(ckpt.get("args", {}).get("lora_rank", args.lora_rank))
        args.lora_alpha = float(ckpt.get("args", {}).get("lora_alpha", args.lora_alpha))
    tokenizer = resolve_tokenizer(args.tokenizer, args.do_lower_case, ckpt.get("tokenizer"), start.path,
                                  task_cls.needs_tokenizer, DEFAULT_TOKENIZER)
    name, overrides = backbone_settings(args, ckpt.get("model_config"), tokenizer)
    preprocess = resolve_image_preprocess(ckpt.get("image_preprocess"), start.path,
                                          model_config(name, **overrides)["img_size"], args.img_size,
                                          args.image_norm, args.interpolation, args.crop_pct)
    overrides["img_size"] = preprocess["img_size"]
    task = task_cls(args, ckpt.get("task_state") if start.kind == "train" else None)
    data = task.build_data(tokenizer, preprocess, env.rank, env.world_size, train=not args.eval)
    torch.manual_seed(args.seed)  # the same initial head on every rank
    model, provided, groups = build_model(args, task, name, overrides, start)
    apply_block_options(model.backbone, args.grad_checkpointing, args.compile, LOG.info)
    if not args.eval:
        log_trainable(model, groups)
    model.to(env.device)
    autocast_dtype, scaler = autocast_setup(args.precision, env.device)
    torch.manual_seed(args.seed + env.rank)  # drop path differs per rank
    if args.eval:
        return run_eval(args, env, model, data, start, autocast_dtype, argv)
    steps_per_epoch = data.batches_per_epoch // args.accum_iter
    if steps_per_epoch < 1:
        raise UserError(f"--data_path: one epoch gives {data.batches_per_epoch} batches per process, fewer than "
                        f"--accum_iter {args.accum_iter}")
    optimizer = build_adamw(model, args.lr, args.weight_decay, tuple(args.opt_betas),
                            lr_scale_of=layer_decay_scale(model.backbone.config["depth"], args.layer_decay))
    ema = WeightEma(model, args.ema_decay) if args.ema else None
    pos, best = RunPosition(), {"value": None, "epoch": None}
    if start.kind == "train":
        pos = restore_training_state(ckpt, optimizer, scaler, env.rank, env.world_size, args.seed, start.path)
        if ema is not None and ckpt.get("model_ema") is not None:
            ema.load_state_dict(ckpt["model_ema"])
        best = {"value": ckpt.get("best_metric"), "epoch": ckpt.get("best_epoch")}
    ddp = wrap_ddp(model, env)
    cfg = run_config(args, env.device, steps_per_epoch, autocast_dtype)
    if env.is_main:
        write_args_json(os.path.join(args.output_dir, "args.json"), args, argv, env.world_size,
                        {"model_config": model.backbone.config, "start": start.kind, "started_from": start.path,
                         "task_state": task.state, "image_preprocess": preprocess, "steps_per_epoch": steps_per_epoch,
                         "num_train": data.num_train, "num_val": data.num_val})
    data_state = {"tokenizer": tokenizer.to_state() if tokenizer is not None else None,
                  "image_preprocess": dict(preprocess)}

    def build_state(epoch, step_in_epoch, step):
        extra = {"model_ema": ema.state_dict() if ema is not None else None, "task": args.task,
                 "task_state": task.state, "main_metric": task.main_metric, "best_metric": best["value"],
                 "best_epoch": best["epoch"]}
        return training_state(model_state=model.state_dict(), model_config=model.backbone.config,
                              optimizer_state=optimizer.state_dict(), scaler=scaler,
                              position=RunPosition(epoch=epoch, step_in_epoch=step_in_epoch, global_step=step),
                              mode=finetune_mode(args.task), args=args, accum_iter=args.accum_iter, provided=provided,
                              data_state=data_state, extra=extra)

    trainer = Trainer(model=ddp, raw_model=model, optimizer=optimizer, scaler=scaler, cfg=cfg,
                      post_step=_after_step(task.post_step(model.backbone), ema),
                      run_log=RunLog(args.output_dir, args.log_dir, env.is_main),
                      checkpointer=Checkpointer(args.output_dir, build_state, env.device, args.save_per_epochs,
                                                args.save_every_steps, args.save_every_minutes),
                      preemption=watch,
                      bad_samples=BadSampleLog(args.output_dir, env.rank))
    if pos.epoch >= args.epochs:
        LOG.info(f"nothing to do: the checkpoint is at epoch {pos.epoch} of {args.epochs}")
    LOG.info(f"training {args.epochs - pos.epoch} epoch(s) of {steps_per_epoch} steps from epoch {pos.epoch + 1} "
             f"step {pos.step_in_epoch + 1}; {data.num_train} training items, {data.num_val} evaluation items")
    started, global_step, start_step = time.time(), pos.global_step, pos.step_in_epoch
    try:
        for epoch in range(pos.epoch, args.epochs):
            data.train_sampler.set_epoch(epoch, start=start_step * args.accum_iter * args.batch_size)
            global_step = train_one_epoch(trainer, data.train_loader, epoch, start_step, global_step)
            start_step = 0
            with watch.holding():  # evaluation and the saves run to their end, a signal waits for them
                stats = evaluate_all(model, ema, data, cfg.device, cfg.autocast_dtype)
                LOG.info(f"evaluation after epoch {epoch + 1} ({data.num_val} items): " + _fmt(stats))
                trainer.run_log.write({"epoch": epoch + 1, **stats}, global_step, prefix="val")
                if not all(_finite(v) for v in stats.values()):
                    raise NonFiniteLoss(f"non-finite evaluation metrics after epoch {epoch + 1}: {stats}")
                improved = best["value"] is None or stats[task.main_metric] > best["value"]
                if improved:
                    best = {"value": stats[task.main_metric], "epoch": epoch + 1}
                trainer.checkpointer.end_of_epoch(epoch, args.epochs, global_step)
                if improved:
                    written_by_rank0(lambda: copy_best(args.output_dir, task.main_metric, best["value"]), env.device)
            if epoch + 1 < args.epochs and watch.pending():
                stop_for_preemption(trainer, epoch + 1, 0, global_step, saved=True)
    finally:
        watch.finish()
        trainer.run_log.close()
    if best["value"] is not None:
        LOG.info(f"best {task.main_metric} {best['value']:.4f} after epoch {best['epoch']}")
    LOG.info(f"done in {(time.time() - started) / 60:.1f} min; checkpoints in {args.output_dir}")
    return 0


def _after_step(post_step, ema):
    """One callable for after each optimizer step: the task's (e.g. a temperature clamp), then the EMA."""
    steps = [f for f in (post_step, ema.update if ema is not None else None) if f is not None]
    if not steps:
        return None
    return lambda: [f() for f in steps]


def task_eval_set(model, data):
    """The task's evaluation of `data.val_loader` (per-item predictions, metrics over the whole set)."""
    def metrics(outputs):
        return {**model.task.metrics(outputs), "n_items": data.num_val}
    return EvalSet(loader=data.val_loader, num_items=data.num_val, predict=lambda m, batch, _: m.predict(batch),
                   metrics=metrics)


def evaluate_all(model, ema, data, device, autocast_dtype):
    """The model's metrics, plus the EMA weights' as ema_<name>."""
    eval_set = task_eval_set(model, data)
    stats = evaluate(eval_set, model, device, autocast_dtype)
    if ema is not None:
        ema_stats = evaluate(eval_set, ema.module, device, autocast_dtype)
        stats.update({f"ema_{k}": v for k, v in ema_stats.items() if k != "n_items"})
    return stats


def run_eval(args, env, model, data, start, autocast_dtype, argv):
    ckpt = start.ckpt or {}
    ema = None
    if start.kind == "train" and ckpt.get("model_ema") is not None:
        ema = WeightEma(model, 0.0)
        ema.load_state_dict(ckpt["model_ema"])
    if env.is_main:
        write_args_json(os.path.join(args.output_dir, "args_eval.json"), args, argv, env.world_size,
                        {"evaluated": start.path, "start": start.kind, "task_state": model.task.state})
    stats = evaluate_all(model, ema, data, env.device, autocast_dtype)
    LOG.info(f"evaluation of {start.path} ({data.num_val} items): " + _fmt(stats))
    run_log = RunLog(args.output_dir, None, env.is_main)
    run_log.write({"checkpoint": start.path, "checkpoint_epoch": ckpt.get("epoch"), **stats},
                  int(ckpt.get("global_step", 0)), prefix="eval")
    run_log.close()
    if env.is_main:
        print(json.dumps(stats), flush=True)
    return 0


def copy_best(output_dir, metric, value):
    copy_atomic(os.path.join(output_dir, LATEST), os.path.join(output_dir, BEST))
    LOG.info(f"new best {metric} {value:.4f}: saved {BEST}")


def _finite(v):
    return not isinstance(v, float) or v == v and abs(v) != float("inf")


def _fmt(stats):
    return " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())


if __name__ == "__main__":
    sys.exit(main())
