"""Measure the memory of a CaptionDataset holding CC3M-sized data (3.3M captions by default).

    python scripts/bench_caption_memory.py [--num 3300000] [--words 10] [--format json|jsonl|txt]

Writes synthetic captions (about `--words` words each) to a temporary file, loads them in a fresh
subprocess (so generation does not pollute the numbers), prints resident memory before/after,
the peak during loading, caption_memory_bytes() and load time, then deletes the file.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _status_kib(field):
    """VmRSS / VmHWM of this process in KiB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def write_captions(path, num, words, fmt, seed=0):
    """Stream `num` synthetic captions of ~`words` words to `path`; returns total UTF-8 bytes."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=n)) for n in rng.integers(2, 10, size=20000)]
    total = 0
    chunk = 100_000
    with open(path, "w", encoding="utf-8") as f:
        if fmt == "json":
            f.write("[\n")
        for start in range(0, num, chunk):
            n = min(chunk, num - start)
            lengths = np.clip(rng.poisson(words, size=n), 3, 40)
            picks = rng.integers(0, len(vocab), size=int(lengths.sum()))
            ends = np.cumsum(lengths)
            lines = []
            for i in range(n):
                caption = " ".join(vocab[j] for j in picks[ends[i] - lengths[i]:ends[i]])
                total += len(caption)
                if fmt == "txt":
                    lines.append(caption)
                else:
                    item = json.dumps({"caption": caption})
                    last = start + i == num - 1
                    lines.append(item + ("" if fmt == "jsonl" or last else ","))
            f.write("\n".join(lines) + "\n")
        if fmt == "json":
            f.write("]\n")
    return total


def measure(path):
    """Runs in a fresh process: load the dataset and report memory as one JSON line."""
    from custom_datasets.text_dataset import CaptionDataset

    rss0, t0 = _status_kib("VmRSS"), time.perf_counter()
    ds = CaptionDataset(path)
    seconds = time.perf_counter() - t0
    rss1, peak = _status_kib("VmRSS"), _status_kib("VmHWM")
    print(json.dumps({"captions": len(ds), "load_s": round(seconds, 2),
                      "rss_before_mib": rss0 / 1024, "rss_after_mib": rss1 / 1024,
                      "rss_delta_mib": (rss1 - rss0) / 1024, "peak_rss_mib": peak / 1024,
                      "caption_memory_mib": ds.caption_memory_bytes() / 2**20,
                      "sample": ds[(3, len(ds) // 2)]}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=3_300_000)
    parser.add_argument("--words", type=int, default=10)
    parser.add_argument("--format", choices=("json", "jsonl", "txt"), default="json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        measure(args.measure)
        return 0
    fd, path = tempfile.mkstemp(suffix="." + args.format, prefix="bench_captions_")
    os.close(fd)
    try:
        t0 = time.perf_counter()
        text_bytes = write_captions(path, args.num, args.words, args.format)
        print(f"wrote {args.num} captions ({text_bytes / 2**20:.1f} MiB of caption text, "
              f"file {os.path.getsize(path) / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, __file__, "--measure", path], env=env,
                             check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        result["caption_text_mib"] = text_bytes / 2**20
        for key, value in result.items():
            print(f"{key:>20}: {value:.1f}" if isinstance(value, float) else f"{key:>20}: {value}")
        print(f"{'rss/text ratio':>20}: {result['rss_delta_mib'] / result['caption_text_mib']:.2f}")
    finally:
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
