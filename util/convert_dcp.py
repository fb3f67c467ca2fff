"""Convert a training checkpoint between the two formats: the sharded folder an `--fsdp` run writes
(`checkpoint-latest.dcp/`, util/sharded_checkpoint.py) and the single file every other run writes
(`checkpoint-latest.pth`). The direction follows `--src`: a folder becomes a file, a file becomes a folder.

    python util/convert_dcp.py --src out/checkpoint-latest.dcp --dst weights/checkpoint-latest.pth
    python util/convert_dcp.py --src out/checkpoint-latest.pth --dst out/checkpoint-latest.dcp

Both carry the same contents (model, optimizer state, position, RNG states, args, tokenizer, preprocessing),
so either resumes the same run, with or without `--fsdp`, on any number of ranks (the optimizer state is keyed
by parameter name in a folder and numbered in a file; the conversion maps one to the other through the names the
optimizer was built with). The output is written atomically, with its checksums; it runs in one process on the
CPU and holds the whole checkpoint in memory.
"""
import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.checkpoint import CHECKSUM, is_training_checkpoint, load_file, save_atomic  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402
from util.sharded_checkpoint import (ids_to_names, load_sharded, names_to_ids, records, save_sharded,  # noqa: E402
                                     tensors_of)


def to_single_file(src, dst):
    """The sharded folder `src` as one checkpoint file `dst`; returns its contents."""
    state = records(load_sharded(src, "--src"))
    tensors = tensors_of(src)
    state.update(model=tensors["model"], optimizer=names_to_ids(tensors["optimizer"]))
    save_atomic(state, dst)
    return state


def to_sharded(src, dst):
    """The checkpoint file `src` as a sharded folder `dst`; returns its contents."""
    ckpt = load_file(src, "--src")
    if not is_training_checkpoint(ckpt):
        raise UserError(f"--src {src}: not a training checkpoint (a weights-only file needs no conversion: --resume "
                        "reads it with or without --fsdp)")
    try:
        optimizer = ids_to_names(ckpt["optimizer"])
    except UserError as e:
        raise UserError(f"--src {src}: {e}") from None
    state = {**{k: v for k, v in ckpt.items() if k != CHECKSUM}, "optimizer": optimizer}
    save_sharded(state, dst, distributed=False)
    return state


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="a sharded checkpoint folder (*.dcp) or a checkpoint file (*.pth)")
    p.add_argument("--dst", required=True, help="the file (from a folder) or folder (from a file) to write")
    args = p.parse_args(argv)
    if not os.path.exists(args.src):
        raise UserError(f"--src {args.src}: not found")
    if os.path.abspath(args.src) == os.path.abspath(args.dst):
        raise UserError("--dst: must differ from --src")
    if os.path.isdir(args.src):
        if os.path.isdir(args.dst):
            raise UserError(f"--dst {args.dst}: is a folder; a sharded --src becomes one file")
        state = to_single_file(args.src, args.dst)
    else:
        if os.path.isfile(args.dst):
            raise UserError(f"--dst {args.dst}: is a file; a file --src becomes a sharded folder")
        state = to_sharded(args.src, args.dst)
    print(f"wrote {args.dst}: {len(state['model'])} model tensors, optimizer state of "
          f"{len(state['optimizer']['state'])} parameters, global step {state['global_step']} ({state['mode']})")
    return 0


if __name__ == "__main__":
    run_cli(main)
