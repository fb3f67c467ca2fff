"""Build the training and held-out loaders of a pretraining mode from resolved args."""
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from custom_datasets.image_dataset import (ImageFolderDataset, build_eval_transform, build_two_view_transform,
                                           collate_image_batch)
from custom_datasets.loaders import batches_per_epoch, eval_loader, train_loader
from custom_datasets.masking_generator import MaskingGenerator
from custom_datasets.mlm_collator import MLMCollator
from custom_datasets.pair_collator import PairCollator
from custom_datasets.pair_dataset import build_pair_dataset, is_shard_path
from custom_datasets.text_dataset import CaptionDataset


@dataclass
class PretrainData:
    train_loader: object
    train_sampler: object        # set_epoch(epoch, start=<samples already consumed on this rank>)
    val_loader: object
    batches_per_epoch: int
    num_train: int
    num_val: int
    val_dataset: object = None


def build_text_mlm(args, tokenizer, rank, world_size, image_state=None, grid=None):
    train_set = CaptionDataset(args.data_path, flag="--data_path")
    val_set = CaptionDataset(args.val_data_path, flag="--val_data_path") if args.val_data_path else None
    collate = MLMCollator(tokenizer, seed=args.seed, mask_prob=args.mlm_prob)
    loader, sampler = train_loader(train_set, collate, args.batch_size, rank, world_size, args.seed,
                                   args.num_workers, args.pin_mem, "--data_path")
    val = None
    if val_set is not None:
        val = eval_loader(val_set, MLMCollator(tokenizer, seed=args.seed + 1, mask_prob=args.mlm_prob),
                          args.batch_size, rank, world_size, min(args.num_workers, 2), args.pin_mem)
    return PretrainData(loader, sampler, val, batches_per_epoch(sampler, args.batch_size), len(train_set),
                        len(val_set) if val_set is not None else 0, val_set)


def masking_for(args, grid):
    return MaskingGenerator(grid, num_masking_patches=args.num_mask_patches, min_num_patches=args.min_mask_patches,
                            min_aspect=1 / args.max_mask_aspect, max_aspect=args.max_mask_aspect)


def build_image_mim(args, tokenizer, rank, world_size, image_state, grid):
    masking = masking_for(args, grid)
    transform = build_two_view_transform(image_state, masking=masking, color_jitter=args.color_jitter)
    train_set = ImageFolderDataset(args.data_path, transform, seed=args.seed)
    loader, sampler = train_loader(train_set, collate_image_batch, args.batch_size, rank, world_size, args.seed,
                                   args.num_workers, args.pin_mem, "--data_path")
    val, val_set = None, None
    if args.val_data_path:
        # Held-out views: no colour jitter, full-image crop, masks keyed by a fixed epoch.
        val_tf = build_two_view_transform(image_state, masking=masking, color_jitter=0.0, scale=(1.0, 1.0))
        val_set = ImageFolderDataset(args.val_data_path, val_tf, seed=args.seed + 1)
        val = eval_loader(val_set, collate_image_batch, args.batch_size, rank, world_size,
                          min(args.num_workers, 2), args.pin_mem)
    return PretrainData(loader, sampler, val, batches_per_epoch(sampler, args.batch_size), len(train_set),
                        len(val_set) if val_set is not None else 0, val_set)


class ImageView:
    """transform(pil, rng) -> normalised tensor: one random resized crop (+ flip) for contrastive training."""

    def __init__(self, image_state, scale):
        self.two_view = build_two_view_transform(image_state, color_jitter=0.0, scale=scale)

    def __call__(self, img, rng):
        return self.two_view(img, rng)["images"]


class _ShardEpochs:
    """`set_epoch(epoch, start=samples)` for a WebDataset pair stream (which counts in steps)."""

    def __init__(self, dataset, batch_size):
        self.dataset, self.batch_size = dataset, batch_size

    def set_epoch(self, epoch, start=0):
        self.dataset.set_epoch(epoch, start // self.batch_size)


def build_image_text_itc(args, tokenizer, rank, world_size, image_state, grid=None):
    collate = PairCollator(tokenizer)
    train_set = build_pair_dataset(args.data_path, ImageView(image_state, (args.itc_crop_min_scale, 1.0)),
                                   seed=args.seed, batch_size=args.batch_size, rank=rank, world_size=world_size)
    if is_shard_path(args.data_path):
        loader = DataLoader(train_set, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers,
                            pin_memory=args.pin_mem and torch.cuda.is_available(),
                            persistent_workers=args.num_workers > 0)
        sampler, steps = _ShardEpochs(train_set, args.batch_size), train_set.steps_per_epoch
        num_train = steps * args.batch_size * world_size
    else:
        loader, sampler = train_loader(train_set, collate, args.batch_size, rank, world_size, args.seed,
                                       args.num_workers, args.pin_mem, "--data_path")
        steps, num_train = batches_per_epoch(sampler, args.batch_size), len(train_set)
    val, val_set = None, None
    if args.val_data_path:
        val_set = build_pair_dataset(args.val_data_path, build_eval_transform(image_state), seed=args.seed,
                                     flag="--val_data_path", split="valid")
        val = eval_loader(val_set, collate, args.batch_size, rank, world_size, min(args.num_workers, 2), args.pin_mem)
    return PretrainData(loader, sampler, val, steps, num_train, len(val_set) if val_set is not None else 0, val_set)


BUILDERS = {"text_mlm": build_text_mlm, "image_mim": build_image_mim, "image_text_itc": build_image_text_itc}


def build_pretrain_data(args, tokenizer, rank, world_size, image_state=None, grid=None):
    """image_state: the image preprocessing record (custom_datasets.image_dataset.image_preprocess_state);
    grid: the model's patch grid (h, w), for masking."""
    return BUILDERS[args.mode](args, tokenizer, rank, world_size, image_state, grid)
