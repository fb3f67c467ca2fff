"""Parquet pair reader against the CSV reader on the same pairs: samples/s through a DataLoader (the training
order of each: parquet row groups permuted then rows shuffled within a group; CSV a global permutation), and
the peak memory of the data workers on a parquet file larger than what each worker holds.

    python scripts/bench_parquet.py [--pairs 6000] [--size 256] [--workers 2] [--row_group 256]
"""
import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from custom_datasets.image_dataset import build_eval_transform, image_preprocess_state  # noqa: E402
from custom_datasets.pair_dataset import CsvPairDataset  # noqa: E402
from custom_datasets.parquet_pairs import ParquetPairDataset  # noqa: E402
from custom_datasets.sampler import KeyedDistributedSampler  # noqa: E402


def make_data(root, n, size, row_group):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "img"))
    images, names, captions = [], [], []
    for i in range(n):  # noise: JPEG cannot shrink it, so the file is large
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        names.append(f"img/{i:06d}.jpg")
        with open(os.path.join(root, names[-1]), "wb") as f:
            f.write(buf.getvalue())
        images.append(buf.getvalue())
        captions.append(f"picture {i} of a pattern")
    with open(os.path.join(root, "pairs.csv"), "w") as f:
        f.write("text,image_path\n" + "".join(f"{c},{p}\n" for c, p in zip(captions, names)))
    pq.write_table(pa.table({"image_id": names, "image": pa.array(images, pa.binary()), "caption": captions}),
                   os.path.join(root, "pairs.parquet"), row_group_size=row_group)
    return os.path.join(root, "pairs.csv"), os.path.join(root, "pairs.parquet")


def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def collate(items):
    return len(items), resident_mb()  # runs in the worker: its own resident memory


def throughput(dataset, workers, order):
    """(samples/s, a worker's resident MB at its first batch, the most any worker reached)."""
    sampler = KeyedDistributedSampler(len(dataset), 1, 0, seed=0, order=order)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler, num_workers=workers, collate_fn=collate)
    start, seen, first, peak = time.perf_counter(), 0, None, 0.0
    for n, rss in loader:
        seen += n
        first = rss if first is None else first
        peak = max(peak, rss)
    return seen / (time.perf_counter() - start), first, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=6000)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--row_group", type=int, default=256)
    args = p.parse_args()
    transform = build_eval_transform(image_preprocess_state(224, crop_pct=1.0))
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, pq_path = make_data(tmp, args.pairs, args.size, args.row_group)
        size_mb = os.path.getsize(pq_path) / 2 ** 20
        csv_rate, csv_first, csv_peak = throughput(CsvPairDataset(csv_path, transform), args.workers, None)
        ds = ParquetPairDataset(pq_path, transform)
        pq_rate, pq_first, pq_peak = throughput(ds, args.workers, ds.epoch_order)
    print(f"{args.pairs} pairs of {args.size}px JPEGs, {args.workers} workers, batch 64, 224px eval transform")
    print(f"parquet file {size_mb:.0f} MB in row groups of {args.row_group}")
    print(f"CSV reader     {csv_rate:8.1f} samples/s")
    print(f"parquet reader {pq_rate:8.1f} samples/s  ({pq_rate / csv_rate:.2f}x the CSV reader)")
    print(f"data worker resident memory, first batch -> peak: CSV {csv_first:.0f} -> {csv_peak:.0f} MB, parquet "
          f"{pq_first:.0f} -> {pq_peak:.0f} MB, against a {size_mb:.0f} MB parquet file")


if __name__ == "__main__":
    main()
