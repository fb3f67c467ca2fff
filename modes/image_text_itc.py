"""image_text_itc: image-text contrastive learning (CLIP softmax or SigLIP sigmoid), for the multiway
model and the CLIP-family dual encoder (`--model dual_encoder`): CLIP, SigLIP, LiT/SigLiT, Chinese CLIP.

Data: image-text pairs (custom_datasets/pair_dataset.py: CSV/TSV `text,image_path`, MUGE, WebDataset
shards); one random resized crop per image (`--itc_crop_min_scale`; keyed by (seed, epoch, sample index)),
flipped with probability `--itc_flip_prob` (default 0: captions say "left" and "right", and images hold
text), captions tokenized in the workers by PairCollator.
Fresh start: the towers' init is models/vlmo.py's (every block moves the residual stream, so the pooled
embedding depends on the input); a fresh SigLIP bias starts at the prior of the global batch
(models.contrastive.siglip_prior_bias, `--siglip_bias_init`); gradient clipping defaults to 1.0 (a fresh
run's loss spikes once it leaves chance). util/itc_monitor.py warns when the loss stays at chance.
Path: both towers and the shared attention stack, the ITC projections, the temperature (and SigLIP bias).
`--lock_image` / `--lock_text` (LiT): that tower is frozen and run without a graph; LoRA adapters then act
on the other modality only.
Loss (models/contrastive.py): features gathered across ranks with gradients, each rank the loss of its
own rows; summed over rows here and divided by the global row count, so N ranks equal one process on the
global batch. The CLIP temperature is clamped to [0, ln 100] after every optimizer step.
Accumulation (`--accum_iter k`) is exact: a contrastive loss does not split over micro-batches (every row's
negatives are the whole effective batch), so `accumulate_exactly` first embeds every micro-batch without a
graph, computes the loss of the whole effective batch on those cached features (gathered across ranks)
and its gradient with respect to each cached feature, then recomputes each micro-batch with a graph,
replaying its RNG state (drop path, dropout), and backpropagates that feature gradient through it, under
DDP `no_sync` except the last. The chain rule makes the sum of these backward passes the gradient of the
whole-batch loss; parameters only the loss uses (temperature, SigLIP bias) get their gradient once, in the
last micro-batch (open_clip's `--accum-freq` recomputes the full loss per micro-batch and so adds it k
times). Memory grows with the micro-batch (one graph at a time) plus the cached [k*B*W, D] features.
Evaluation: retrieval R@1/5/10 both ways on `--val_data_path` pairs, zero-shot top-1/5 on
`--zeroshot_data_path` (util/itc_eval.py), on the view `--eval_crop_pct` sets (default here 1.0: the
shorter side resized to the model's size and centre-cropped, i.e. the whole image training sees, not
fine-tuning's 0.875 crop); the fraction is saved with the run (image_preprocess) and util/eval_itc.py
evaluates a checkpoint on the same view.
"""
import contextlib
import os

import torch
from torch.utils.data import DataLoader

from custom_datasets.embedding_cache import CachedPairCollator, CachedPairs, EmbeddingCache, build_chunks, fingerprint
from custom_datasets.image_dataset import ImageFolderDataset, build_crop_view, build_eval_transform, collate_image_batch
from custom_datasets.loaders import batches_per_epoch, eval_loader, train_loader
from custom_datasets.pair_collator import PairCollator
from custom_datasets.pair_dataset import build_pair_dataset, is_shard_path
from custom_datasets.parquet_pairs import is_parquet_path
from models.contrastive import clamp_logit_scale_, contrastive_loss, siglip_prior_bias
from models.trainable import on_image_path
from models.vlmo import ITC_LOSSES
from modes import register_mode
from modes.base import PretrainData, PretrainMode
from util import dist as du
from util.errors import UserError
from util.flag_checks import Bounded, fraction
from util.itc_eval import retrieval_set, zero_shot_set
from util.itc_monitor import ContrastiveMonitor
from util.logger import LOG
from util.preemption import ignore_stop_signals
from util.retrieval_metrics import read_classnames, read_templates
from util.dist import any_rank, barrier, slow_barrier
from util.run_common import autocast_context, autocast_setup

# Batch entries the exact accumulation adds for a micro-batch's recompute (see accumulate_exactly).
GRAD_KEYS = ("itc_grad_image", "itc_grad_text")
CACHE_KEYS = ("itc_cached_image", "itc_cached_text")

IMAGE_POS_STEP = 0.03  # gain x peak lr of a fresh image_text_itc run
IMAGE_POS_GAIN_RANGE = (10.0, 30.0)


# A fresh multiway model here (nothing loaded; --model_kwargs wins) gets two image-path settings that the registry
# keeps off (BEiT/VLMo weights keep their function): a LayerNorm over the image tokens before block 0 (image_pre_norm,
# open_clip's ln_pre) and a locality prior in the image relative position tables (image_rel_pos_init "local",
# models/relative_position.py:locality_prior; a zero table moves ~lr per step, too slowly to give a short run any
# geometry). scripts/bench_itc_learning.py, 4 x 128, patch 8, CLIP, CLS, zero-shot top-1 on held-out digits, seeds
# 0-9: neither 0.9831, pre-norm 0.9861, both 0.9881, open_clip 0.9885 (seeds 0-2: 0.9839 / 0.9870 / 0.9895 vs
# 0.9895). Not kept: image_pos_gain 100 (0.9852; with pre-norm 0.9844, seeds 0-4), no relative bias (0.9837).
FRESH_IMAGE_PATH = {"image_pre_norm": True, "image_rel_pos_init": "local"}


def fresh_image_pos_gain(lr, log=None):
    """The image position gain of a fresh multiway model trained for this mode at peak `lr`, said to `log`:
    IMAGE_POS_STEP / lr within IMAGE_POS_GAIN_RANGE. ImageTextITC.fresh_model_overrides applies it when nothing is loaded
    and --model_kwargs does not set image_pos_gain; a loaded model keeps the registry's 10 (the loader rescales the
    stored positions to it), and so does every other mode.

    Measured with scripts/bench_itc_learning.py (zero-shot top-1 on held-out digits; the gain sweeps predate its
    per-codebase weight-decay groups, under which gain 30 gives CLS 0.987, mean 0.986, open_clip 0.990, and
    CLS 0.984, mean 0.985 once the input embeddings went undecayed, util/optim_factory.py; seeds 0-4):
    - 4 x 128, patch 8, CLIP, lr 1e-3. CLS pooling, gain 3 / 10 / 30 / 100: 0.972 (seeds 0, 1) / 0.983 (seeds
      0-2) / 0.984 / 0.986 (seeds 0-4); mean pooling, gain 10 / 30 / 100: 0.977 (seeds 0, 1) / 0.985 (seeds
      0-4) / 0.984 (seeds 0, 1); open_clip 0.988 (seeds 0-4).
    - 2 x 64, patch 16, SigLIP, CLS, seeds 0-2, gain 10 / 30 / 100: lr 3e-4 0.921 / 0.938 / 0.944; lr 1e-3
      0.957 / 0.971 / -; lr 3e-3 0.955 / 0.954 / 0.961. Gain 100 cost text-to-image R@1 at both rates (0.966,
      0.967 against 1.000), hence the ceiling of 30; the floor is the old fixed value.
    Pixel-target image_mim prefers a low gain at every rate (demo images, 2 x 64, held-out loss after 4 epochs,
    2 x 2 patches, gain 10 / 30: lr 1e-3 0.968 / 0.980, lr 2e-3 0.951 / 0.984, lr 3e-3 0.958 / 0.980; 8 x 8
    patches, 8 epochs, lr 1e-3, gain 3 / 10 / 30 / 100: 0.848 / 0.848 / 0.849 / 0.850), so it keeps 10.
    """
    low, high = IMAGE_POS_GAIN_RANGE
    gain = float(min(max(IMAGE_POS_STEP / lr, low), high)) if lr > 0 else high
    if log is not None:
        log(f"fresh model: image_pos_gain {gain:g} ({IMAGE_POS_STEP:g} / lr {lr:.3e}, within {low:g}-{high:g}); "
            "--model_kwargs '{\"image_pos_gain\": G}' sets another")
    return gain


class _ShardEpochs:
    """`set_epoch(epoch, start=samples)` for a WebDataset pair stream (which counts in steps)."""

    def __init__(self, dataset, batch_size):
        self.dataset, self.batch_size = dataset, batch_size

    def set_epoch(self, epoch, start=0):
        self.dataset.set_epoch(epoch, start // self.batch_size)


@register_mode
class ImageTextITC(PretrainMode):
    name = "image_text_itc"
    towers = ("image", "text")
    heads = (r"itc_(image|text)_proj\.", r"logit_scale$", r"logit_bias$")
    model_kinds = (None, "dual_encoder")
    eval_crop_pct = 1.0

    @staticmethod
    def add_args(group):
        group.add_argument("--itc_loss", default="clip", choices=ITC_LOSSES, help="image_text_itc: the loss")
        group.add_argument("--itc_crop_min_scale", type=fraction(open_low=True), default=0.5,
                           help="image_text_itc: smallest random-crop area share of a training image (1.0: the "
                                "whole image)")
        group.add_argument("--itc_flip_prob", type=fraction(), default=0.0,
                           help="image_text_itc: horizontal flip probability of a training image (default 0: "
                                "captions describe left and right, and images hold text)")
        group.add_argument("--siglip_bias_init", default="prior",
                           help="SigLIP: the fresh bias b; 'prior' = -ln(G - 1) for the global batch G (learns at "
                                "any batch), or a number (the paper's -10 suits G of 16k-32k)")
        group.add_argument("--itc_pool", default="cls", choices=["cls", "mean"],
                           help="embedding of each tower: the CLS token (VLMo), or the mean of its tokens")
        group.add_argument("--lock_image", action="store_true", help="LiT: image tower frozen, embeddings unchanged")
        group.add_argument("--lock_text", action="store_true", help="text tower frozen")
        group.add_argument("--lit_cache", default=None,
                           help="LiT (--lock_image, whole unflipped images): a folder for the locked tower's "
                                "embeddings of every training pair, computed once (sharded over ranks, resumable, "
                                "refused when stale); training then decodes no image")
        group.add_argument("--lit_cache_chunk", type=Bounded(int, 1), default=4096,
                           help="--lit_cache: embeddings per chunk file (what a killed build recomputes)")
        group.add_argument("--zeroshot_data_path", default=None, help="ImageNet-style folder for zero-shot evaluation")
        group.add_argument("--zeroshot_classnames", default=None, help="wnid<TAB>name file (default: folder names)")
        group.add_argument("--zeroshot_templates", default=None, help="prompt templates, one per line with {}")

    @staticmethod
    def resolve_defaults(args):
        if args.clip_grad is None:
            args.clip_grad = 1.0  # a fresh run spikes once it leaves chance; --clip_grad 0 turns it off
        if args.siglip_bias_init != "prior":
            try:
                args.siglip_bias_init = float(args.siglip_bias_init)
            except ValueError:
                raise UserError(f"--siglip_bias_init {args.siglip_bias_init!r}: 'prior' or a number") from None

    @staticmethod
    def check_inputs(args, grid):
        if not args.lit_cache or args.mode != "image_text_itc":
            return
        if not args.lock_image:
            raise UserError("--lit_cache caches the locked image tower's embeddings: it needs --lock_image")
        if args.itc_crop_min_scale < 1 or args.itc_flip_prob > 0:
            raise UserError(f"--lit_cache: the training view must be the evaluation view (whole, unflipped images); "
                            f"got --itc_crop_min_scale {args.itc_crop_min_scale:g} --itc_flip_prob "
                            f"{args.itc_flip_prob:g}: pass --itc_crop_min_scale 1")
        if is_shard_path(args.data_path) or is_parquet_path(args.data_path):
            raise UserError(f"--lit_cache: --data_path {args.data_path}: needs a CSV/TSV or MUGE pair file (the "
                            "cached run reads captions without the images)")

    def model_overrides(self):
        return {"itc_loss": self.args.itc_loss, "itc_pool": self.args.itc_pool}

    def fresh_model_overrides(self, settable):
        """A fresh multiway model's image positions learn at fresh_image_pos_gain(lr) x the base rate, and its image
        tokens pass a LayerNorm before the first block and its image attention starts with a locality prior
        (FRESH_IMAGE_PATH); only keys in `settable` (not set by --model_kwargs, and not a dual encoder's)."""
        out = {k: v for k, v in FRESH_IMAGE_PATH.items() if k in settable}
        if "image_pos_gain" in settable:
            out["image_pos_gain"] = fresh_image_pos_gain(self.args.lr, LOG.info)
        return out

    def init_fresh(self, backbone, loaded, global_batch):
        """A SigLIP bias no checkpoint provided starts at --siglip_bias_init (see siglip_prior_bias)."""
        if backbone.config["itc_loss"] != "siglip" or "logit_bias" in loaded:
            return
        init = self.args.siglip_bias_init
        value = siglip_prior_bias(global_batch) if init == "prior" else float(init)
        with torch.no_grad():
            backbone.logit_bias.fill_(value)
        LOG.info(f"SigLIP bias starts at {value:.4f}" + (f" = -ln({global_batch} - 1), the prior of the global "
                                                         f"batch" if init == "prior" else ""))

    def monitor(self):
        return ContrastiveMonitor()

    def build_data(self, tokenizer, image_state, rank, world_size, grid):
        a = self.args
        collate = train_collate = PairCollator(tokenizer)
        view = build_crop_view(image_state, scale=(a.itc_crop_min_scale, 1.0), hflip=a.itc_flip_prob)
        train_set = build_pair_dataset(a.data_path, view, seed=a.seed, batch_size=a.batch_size, rank=rank, world_size=world_size)
        if a.lit_cache:  # the images are decoded once, by before_training, on the (deterministic) training view
            self.cache_source = build_pair_dataset(a.data_path, view, seed=a.seed)
            stat = os.stat(a.data_path)
            self.cache_extra = {"preprocess": image_state, "view": [a.itc_crop_min_scale, a.itc_flip_prob],
                                "precision": a.precision, "data": os.path.abspath(a.data_path),
                                "bytes": stat.st_size, "mtime": int(stat.st_mtime), "items": len(train_set)}
            self.cache = EmbeddingCache(a.lit_cache, len(train_set), a.lit_cache_chunk)
            train_set, train_collate = CachedPairs(train_set, self.cache, a.seed), CachedPairCollator(tokenizer)
        if is_shard_path(a.data_path):
            loader = DataLoader(train_set, batch_size=a.batch_size, collate_fn=train_collate, num_workers=a.num_workers,
                                pin_memory=a.pin_mem and torch.cuda.is_available(),
                                persistent_workers=a.num_workers > 0, worker_init_fn=ignore_stop_signals)
            sampler, steps = _ShardEpochs(train_set, a.batch_size), train_set.steps_per_epoch
            num_train = steps * a.batch_size * world_size
        else:
            loader, sampler = train_loader(train_set, train_collate, a.batch_size, rank, world_size, a.seed,
                                           a.num_workers, a.pin_mem, "--data_path")
            steps, num_train = batches_per_epoch(sampler, a.batch_size), len(train_set)
        val, val_set = None, None
        if a.val_data_path:
            val_set = build_pair_dataset(a.val_data_path, build_eval_transform(image_state), seed=a.seed,
                                         flag="--val_data_path", split="valid")
            val = eval_loader(val_set, collate, a.batch_size, rank, world_size, min(a.num_workers, 2), a.pin_mem)
        return PretrainData(loader, sampler, val, steps, num_train, len(val_set) if val_set is not None else 0,
                            val_set)

    def before_training(self, backbone, env):
        """--lit_cache: check the cache against this run's image tower and data, and build what is missing."""
        if not self.args.lit_cache:
            return
        tensors = {k: v for k, v in backbone.state_dict().items() if on_image_path(backbone, k)}
        key = fingerprint(tensors, {**self.cache_extra, "pool": backbone.config.get("itc_pool")})
        complete = self.cache.check_or_start(key, self.args.data_path, env.is_main)
        if not any_rank(not complete, env.device):  # all ranks agree: build or not
            LOG.info(f"lit cache: {self.cache.num_items} embeddings in {self.args.lit_cache} match this run")
            return
        barrier()  # meta.json exists before any rank writes a chunk
        self.cache.adopt_layout()  # every rank: the folder's chunk size
        dtype, _ = autocast_setup(self.args.precision, env.device)
        was_training, rng = backbone.training, _rng_snapshot(env.device)
        backbone.eval()

        def encode(images):
            with torch.no_grad(), autocast_context(env.device, dtype):
                return backbone.encode_image(images.to(env.device))
        build_chunks(self.cache, self.cache_source, encode, env.rank, env.world_size, self.args.batch_size,
                     self.args.num_workers, LOG.info)
        backbone.train(was_training)
        _rng_restore(rng, env.device)  # the loaders drew seeds: a run with a partial cache stays the same run
        slow_barrier()  # every rank waits for the slowest one's chunks (longer than NCCL's timeout)
        if any_rank(bool(self.cache.missing(0, 1)), env.device):  # every rank stops, or none
            raise UserError(f"--lit_cache {self.args.lit_cache}: chunks missing after the build; is the folder "
                            "shared by every node?")
        LOG.info(f"lit cache: {self.cache.num_items} embeddings written to {self.args.lit_cache}")

    def loss_units(self, batch):
        return batch["text_ids"].new_full((), batch["text_ids"].shape[0])  # a fill kernel: no host-to-device copy

    @property
    def accumulate(self):
        return accumulate_exactly if self.args is not None and self.args.accum_iter > 1 else None

    def loss(self, backbone, batch):
        if GRAD_KEYS[0] in batch:
            return feature_gradient_surrogate(backbone, batch)
        img, txt = encode_pair(backbone, batch)
        out = contrastive_loss(backbone, img, txt)
        rows = self.loss_units(batch)
        total = out.pop("loss") * rows  # per-row mean -> sum over this rank's rows
        metrics = {k: v.detach() for k, v in out.items()}
        metrics["itc_loss"] = total.detach() / rows
        return {"loss": total, **metrics}

    def eval_sets(self, data, tokenizer, image_state, rank, world_size):
        sets = []
        if data.val_loader is not None:
            sets.append(retrieval_set(data.val_loader, data.val_dataset, image_state))
        if self.args.zeroshot_data_path:
            sets.append(build_zero_shot(self.args, tokenizer, image_state, rank, world_size))
        return sets

    def post_step(self, backbone):
        if backbone.config["itc_loss"] != "clip":
            return None
        return lambda: clamp_logit_scale_(backbone.logit_scale)


def build_zero_shot(args, tokenizer, image_state, rank, world_size):
    """The zero-shot EvalSet of `--zeroshot_data_path` (also used by util/eval_itc.py)."""
    dataset = ImageFolderDataset(args.zeroshot_data_path, build_eval_transform(image_state), seed=args.seed)
    names = read_classnames(args.zeroshot_classnames, wnids=dataset.classes) if args.zeroshot_classnames else \
        [c.replace("_", " ") for c in dataset.classes]
    loader = eval_loader(dataset, collate_image_batch, args.batch_size, rank, world_size, min(args.num_workers, 2),
                         args.pin_mem)
    LOG.info(f"zero-shot evaluation: {len(dataset)} images of {len(names)} classes in {args.zeroshot_data_path}")
    return zero_shot_set(loader, len(dataset), names, read_templates(args.zeroshot_templates), tokenizer)


def encode_pair(backbone, batch):
    """(image, text) embeddings [B, D]; a locked tower (LiT) runs without building a graph: its embeddings
    cannot change anyway."""
    if "image_emb" in batch:  # --lit_cache: the locked tower's embeddings, computed once
        img = batch["image_emb"]
    elif "image" in backbone.locked_towers:  # in eval mode too: a locked tower's drop path would vary them
        with torch.no_grad(), _eval_mode(backbone):
            img = backbone.encode_image(batch["images"])
    else:
        img = backbone.encode_image(batch["images"])
    with torch.no_grad() if "text" in backbone.locked_towers else contextlib.nullcontext():
        txt = backbone.encode_text(batch["text_ids"], batch["text_masks"])
    return img, txt


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def feature_gradient_surrogate(backbone, batch):
    """A micro-batch's recompute: sum(g * f) over its live features f and their cached whole-batch loss
    gradients g, whose parameter gradient is this micro-batch's share of the whole-batch gradient; with the
    cached features (the last micro-batch only) plus the loss on them with live temperature and bias,
    which adds their gradient once."""
    img, txt = encode_pair(backbone, batch)
    total = (img.float() * batch[GRAD_KEYS[0]]).sum() + (txt.float() * batch[GRAD_KEYS[1]]).sum()
    if CACHE_KEYS[0] in batch:
        total = total + contrastive_loss(backbone, batch[CACHE_KEYS[0]], batch[CACHE_KEYS[1]], spreads=False)["loss"]
    return {"loss": total}


def _rng_snapshot(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _rng_restore(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def accumulate_exactly(trainer, batches, nonfinite):
    """The loop's micro-batch step for a contrastive loss (engine_pretrain.accumulate_gradients' contract):
    one optimizer step's gradient of the loss over all k micro-batches of all ranks at once."""
    model, raw, cfg, scaler = trainer.model, trainer.raw_model, trainer.cfg, trainer.scaler
    backbone, device = raw.backbone, cfg.device
    states, imgs, txts = [], [], []

    def cache_features():
        for b in batches:
            states.append(_rng_snapshot(device))
            img, txt = encode_pair(backbone, b)
            imgs.append(img.float())
            txts.append(txt.float())
    with torch.no_grad(), autocast_context(device, cfg.autocast_dtype):
        du.call_whole(model, cache_features)  # FSDP: the weights gathered as in a forward
    after = _rng_snapshot(device)
    # The whole-batch loss on the cached features: this rank's k*B rows against every rank's, as if each
    # rank held one batch of k*B (rows are per-row means, so DDP's average is the global mean).
    cached_img = torch.cat(imgs).requires_grad_(True)
    cached_txt = torch.cat(txts).requires_grad_(True)
    out = contrastive_loss(backbone, cached_img, cached_txt, live_params=False)
    out["loss"].backward()  # all ranks: the gather's backward sums every rank's share into each own row
    nonfinite |= ~torch.isfinite(out["loss"].detach())
    grads_img = cached_img.grad.split([x.shape[0] for x in imgs])
    grads_txt = cached_txt.grad.split([x.shape[0] for x in txts])
    frozen = {"image": cached_img.detach(), "text": cached_txt.detach()}
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        b = dict(b, itc_grad_image=grads_img[i], itc_grad_text=grads_txt[i])
        if last:
            b.update(itc_cached_image=frozen["image"], itc_cached_text=frozen["text"])
        _rng_restore(states[i], device)
        with du.gradient_sync(model, last), autocast_context(device, cfg.autocast_dtype):
            surrogate = model(b, loss_normalizer=1.0, reg_scale=1.0 if last else 0.0)  # the term once per step
        loss = surrogate.pop("loss")
        (scaler.scale(loss) if scaler is not None else loss).backward()
    _rng_restore(after, device)
    metrics = {k: v.detach() for k, v in out.items() if k != "loss"}
    metrics["loss"] = metrics["itc_loss"] = out["loss"].detach()
    if "reg_loss" in surrogate:  # added with the last micro-batch: once per step
        metrics["reg_loss"] = surrogate["reg_loss"]
        metrics["loss"] = metrics["loss"] + surrogate["reg_loss"]
    return metrics

