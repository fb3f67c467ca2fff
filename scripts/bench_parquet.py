"""Parquet pair reader against the CSV reader on the same pairs: samples/s through a DataLoader (the training
order of each: parquet row groups permuted then rows shuffled within a group; CSV a global permutation), and
the peak memory of the data workers on a parquet file larger than what each worker holds.

    python scripts/bench_parquet.py [--pairs 6000] [--size 256] [--workers 2] [--row_group 256]
"""
import argparse
import io
import os
import resource
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
    base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(np.roll(base, i, axis=0)).resize((size, size), Image.BILINEAR)
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


def collate(items):
    return len(items)


def throughput(dataset, workers, order):
    sampler = KeyedDistributedSampler(len(dataset), 1, 0, seed=0, order=order)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler, num_workers=workers, collate_fn=collate)
    start, seen = time.perf_counter(), 0
    for n in loader:
        seen += n
    return seen / (time.perf_counter() - start)


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
        csv_rate = throughput(CsvPairDataset(csv_path, transform), args.workers, None)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        ds = ParquetPairDataset(pq_path, transform)
        pq_rate = throughput(ds, args.workers, ds.epoch_order)
        workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 10
    print(f"{args.pairs} pairs of {args.size}px JPEGs, {args.workers} workers, batch 64, 224px eval transform")
    print(f"parquet file {size_mb:.0f} MB in row groups of {args.row_group}")
    print(f"CSV reader     {csv_rate:8.1f} samples/s")
    print(f"parquet reader {pq_rate:8.1f} samples/s  ({pq_rate / csv_rate:.2f}x the CSV reader)")
    print(f"peak RSS of a data worker: {workers_peak:.0f} MB (the largest child; before the parquet run "
          f"{before / 2 ** 10:.0f} MB), against a {size_mb:.0f} MB file")


if __name__ == "__main__":
    main()
