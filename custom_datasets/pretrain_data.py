"""Build the training and held-out loaders of a pretraining mode from resolved args."""
from dataclasses import dataclass

from custom_datasets.loaders import batches_per_epoch, eval_loader, train_loader
from custom_datasets.mlm_collator import MLMCollator
from custom_datasets.text_dataset import CaptionDataset


@dataclass
class PretrainData:
    train_loader: object
    train_sampler: object
    val_loader: object
    batches_per_epoch: int
    num_train: int
    num_val: int


def build_text_mlm(args, tokenizer, rank, world_size):
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
                        len(val_set) if val_set is not None else 0)


BUILDERS = {"text_mlm": build_text_mlm}


def build_pretrain_data(args, tokenizer, rank, world_size):
    return BUILDERS[args.mode](args, tokenizer, rank, world_size)
