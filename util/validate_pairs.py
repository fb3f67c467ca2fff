"""Check every entry of a pair dataset before training, without training.

    python util/validate_pairs.py --data_path pairs.csv [--out bad_entries.tsv] [--workers 8]

Every image is read and fully decoded (the same code the loaders use). Prints the counts and the
reasons, writes one `path_or_id<TAB>reason` line per bad entry to --out, and exits 0 whether or
not bad entries exist (the loaders replace them; this tells you how many and which).
"""
import argparse
import collections
import multiprocessing
import os
import sys

import webdataset as wds

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_datasets.pair_dataset import (DEFAULT_MAX_IMAGE_PIXELS, BadSample, build_pair_dataset,  # noqa: E402
                                          is_shard_path, set_max_image_pixels)
from custom_datasets.wds_pairs import WdsPairDataset, expand_shards  # noqa: E402
from util.errors import run_cli  # noqa: E402

_DATASET = None  # set before the worker pool forks, so workers share the parsed index
CHUNK = 256


def _check_range(bounds):
    lo, hi = bounds
    return hi - lo, [bad for i in range(lo, hi) if (bad := _DATASET.check(i)) is not None]


def _check_shard(url):
    name, bad, count = os.path.basename(url), [], 0

    def handler(exn):
        bad.append((name, f"shard error: {exn.args[0] if exn.args else exn}"))
        return True

    for sample in wds.tarfile_samples([{"url": url}], handler=handler):
        count += 1
        try:
            WdsPairDataset._decode(sample)
        except BadSample as e:
            bad.append((f"{name}:{sample.get('__key__', '?')}", e.args[0]))
    return count, bad


def _run(fn, jobs, workers):
    if workers <= 1:
        return [fn(j) for j in jobs]
    # fork shares the already parsed dataset with the workers; elsewhere each child re-imports
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    with multiprocessing.get_context(method).Pool(workers) as pool:
        return pool.map(fn, jobs, chunksize=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_path", required=True,
                   help="CSV/TSV or parquet file, MUGE folder or *_texts.jsonl, or WebDataset shards")
    p.add_argument("--out", default="bad_entries.tsv", help="where to list the bad entries")
    p.add_argument("--split", default="train", help="MUGE split inside a folder")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="as in training: larger JPEGs decode reduced, other larger images count as bad")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Returns the number of bad entries."""
    global _DATASET
    args = parse_args(argv)
    set_max_image_pixels(args.max_image_pixels)
    if is_shard_path(args.data_path):
        results = _run(_check_shard, expand_shards(args.data_path), args.workers)
    else:
        _DATASET = build_pair_dataset(args.data_path, split=args.split)
        n = len(_DATASET)
        if args.workers > 1:
            results = _run(_check_range, [(lo, min(lo + CHUNK, n)) for lo in range(0, n, CHUNK)],
                           args.workers)
        else:
            results = [_check_range((0, n))]
        _DATASET = None
    total = sum(count for count, _ in results)
    bad = [b for _, entries in results for b in entries]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for ident, reason in bad:
            f.write(f"{ident}\t{reason}\n")
    reasons = collections.Counter(reason.split(":")[0] for _, reason in bad)
    broken = sum(1 for _, reason in bad if not reason.startswith("shard error"))
    print(f"{args.data_path}: {total} entries, {total - broken} ok, {len(bad)} bad"
          f" (list: {args.out})")
    for reason, count in reasons.most_common():
        print(f"  {count:8d}  {reason}")
    return len(bad)


if __name__ == "__main__":
    run_cli(main)
