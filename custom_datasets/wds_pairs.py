"""WebDataset tar shards of image-text pairs (`<key>.jpg|.png` + `<key>.txt`) as an IterableDataset.

The epoch length is fixed up front: each rank yields exactly steps_per_epoch * batch_size samples,
steps_per_epoch = (samples_per_epoch // world_size) // batch_size, so every rank takes the same
number of steps whatever the shard sizes. Within a rank, worker w yields whole batches only (the
rank's batches dealt round-robin to workers, the order in which DataLoader collects them), so
DataLoader(dataset, batch_size=batch_size) never forms a short batch.

Shards are dealt to the world_size * num_workers reading slots; when there are fewer shards than
slots, slots share a shard and take every g-th sample of it. A slot cycles over its shards (in a
new order each cycle) until it has its quota, so small or uneven shards are resampled rather than
starving a rank. Sample order comes from a shuffle buffer; all randomness is keyed by (seed,
epoch, slot), so it depends on world size and worker count but not on timing. Corrupt samples
(undecodable image, missing member, corrupt tar) are skipped, the next good one takes their place,
and they are reported in the "bad" list of the next item, as in pair_dataset.
"""
import glob
import itertools
import json
import multiprocessing
import os
import tarfile

import braceexpand
import numpy as np
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from custom_datasets.pair_dataset import BadSample, check_caption, decode_image
from util.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_CYCLE_END = object()  # marks the end of one pass over a slot's shards


def expand_shards(path: str) -> list:
    """A brace pattern (shard-{000000..000009}.tar), a glob, a folder of .tar files or one .tar."""
    if "{" in path:
        shards = list(braceexpand.braceexpand(path))
    elif os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, "*.tar")))
    elif any(c in path for c in "*?["):
        shards = sorted(glob.glob(path))
    else:
        shards = [path]
    missing = [s for s in shards if not os.path.isfile(s)]
    if not shards or missing:
        raise UserError(f"--data_path {path}: {len(missing)} of {len(shards)} shards not found "
                        f"(first: {missing[0] if missing else path})")
    return shards


def _key_and_ext(name: str):
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower() if dot else ""


def count_samples(shards: list) -> int:
    """Samples (keys with an image member) over all shards; uses the `sizes.json` that
    util/make_pair_shards.py writes next to the shards and scans tar headers otherwise."""
    known = {}
    for folder in {os.path.dirname(os.path.abspath(s)) for s in shards}:
        sizes = os.path.join(folder, "sizes.json")
        if os.path.isfile(sizes):
            with open(sizes, encoding="utf-8") as f:
                known.update({os.path.join(folder, k): int(v) for k, v in json.load(f).items()})
    total = 0
    for shard in shards:
        n = known.get(os.path.abspath(shard))
        if n is None:
            keys = set()
            try:
                with tarfile.open(shard) as tar:
                    for name in tar.getnames():
                        key, ext = _key_and_ext(name)
                        if ext in IMAGE_EXTS:
                            keys.add(key)
            except (tarfile.TarError, OSError):
                pass  # a corrupt shard counts what could be listed; reading reports it
            n = len(keys)
        total += n
    return total


def _shuffled(stream, size: int, rng):
    """Shuffle buffer. At the end of each pass over a slot's shards the buffer is drained, so a
    pass yields each of its samples exactly once (an epoch that is one pass sees all data)."""
    buf = []
    for item in stream:
        if item is _CYCLE_END:
            for k in rng.permutation(len(buf)):
                yield buf[k]
            buf = []
            yield item
        elif size <= 1:
            yield item
        elif len(buf) < size:
            buf.append(item)
        else:
            k = int(rng.integers(size))
            yield buf[k]
            buf[k] = item


class WdsPairDataset(IterableDataset):
    """Args:
        urls: shard pattern, folder of .tar, glob or one .tar.
        transform: callable(pil_image, rng) -> FloatTensor[3, H, W].
        batch_size: the per-rank batch size the DataLoader will use.
        samples_per_epoch: global samples per epoch; counted from the shards when None.
        rank, world_size: default to the initialised process group (0, 1 without one).
    Call set_epoch(epoch, start_step) before each epoch; the values live in shared memory so
    persistent workers see them. start_step > 0 resumes mid-epoch: the skipped samples are read
    and decoded (to know which are good) but not transformed.
    Items: {"image", "raw_text", "epoch", "index", "bad"} as in pair_dataset, index being
    rank * len(self) + position in this rank's epoch.
    """

    def __init__(self, urls: str, transform=None, *, batch_size: int, samples_per_epoch=None,
                 seed: int = 0, shuffle_buffer: int = 1000, rank=None, world_size=None):
        initialised = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        self.world_size = world_size if world_size is not None else (
            dist.get_world_size() if initialised else 1)
        self.urls, self.shards = urls, expand_shards(urls)
        self.transform, self.seed, self.batch_size = transform, seed, batch_size
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch or count_samples(self.shards)
        self.steps_per_epoch = self.samples_per_epoch // self.world_size // batch_size
        if self.steps_per_epoch < 1:
            raise UserError(f"--data_path {urls}: {self.samples_per_epoch} samples are fewer than "
                            f"one batch of {batch_size} on each of {self.world_size} ranks")
        self._epoch = multiprocessing.RawValue("q", 0)
        self._start_step = multiprocessing.RawValue("q", 0)

    def set_epoch(self, epoch: int, start_step: int = 0):
        self._epoch.value, self._start_step.value = epoch, start_step

    def __len__(self):
        return self.steps_per_epoch * self.batch_size

    def _plan(self, epoch, slot, n_slots):
        """[(shard, stride, offset)]: the slot reads the samples j % stride == offset of shard."""
        n = len(self.shards)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        if n >= n_slots:
            return [(self.shards[k], 1, 0) for k in perm[slot::n_slots]]
        sharing = len(range(slot % n, n_slots, n))  # slots reading the same shard
        return [(self.shards[perm[slot % n]], sharing, slot // n)]

    def _raw(self, epoch, slot, n_slots, pending):
        plan, current = self._plan(epoch, slot, n_slots), [""]

        def handler(exn):  # a missing or corrupt shard: report it and go on with the next
            reason = exn.args[0] if exn.args else exn
            pending.append((os.path.basename(current[0]), f"shard error: {reason}"))
            return True

        for cycle in itertools.count():
            order = np.random.default_rng([self.seed, epoch, slot, cycle]).permutation(len(plan))
            for k in order:
                url, stride, offset = plan[k]
                current[0] = url
                samples = wds.tarfile_samples([{"url": url}], handler=handler)
                for j, sample in enumerate(samples):
                    if j % stride == offset:
                        yield sample
            yield _CYCLE_END

    @staticmethod
    def _decode(sample):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise BadSample("no image member")
        if "txt" not in sample:
            raise BadSample("no .txt member")
        try:
            text = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadSample("text is not UTF-8") from None
        return decode_image(sample[ext]), check_caption(text)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start_step = self._epoch.value, self._start_step.value
        steps, bsz = self.steps_per_epoch, self.batch_size
        # Batch g of a rank's epoch comes from reading role g % workers. DataLoader asks worker 0
        # first, so after resuming at start_step worker w plays role (w + start_step) % workers:
        # the resumed run yields exactly the batches start_step, start_step + 1, ... of a full one.
        role = (worker + start_step) % workers
        my_batches = steps // workers + (role < steps % workers)
        skip_batches = max(0, -(-(start_step - role) // workers))  # role's batches < start_step
        slot, n_slots = self.rank * workers + role, self.world_size * workers
        pending, good, cycles = [], 0, 0
        rng = np.random.default_rng([self.seed, epoch, slot, 0xB0F])
        stream = _shuffled(self._raw(epoch, slot, n_slots, pending), self.shuffle_buffer, rng)
        produced = 0
        while produced < my_batches * bsz:
            sample = next(stream)
            if sample is _CYCLE_END:
                cycles += 1
                if cycles >= 2 and good == 0:
                    raise UserError(f"--data_path {self.urls}: no readable sample in shards "
                                    f"{[p[0] for p in self._plan(epoch, slot, n_slots)]}")
                continue
            ident = f"{os.path.basename(sample.get('__url__', '?'))}:{sample.get('__key__', '?')}"
            try:
                image, text = self._decode(sample)
            except BadSample as e:
                pending.append((ident, e.args[0]))
                continue
            good += 1
            batch, pos = divmod(produced, bsz)
            produced += 1
            if batch < skip_batches:
                pending.clear()
                continue
            index = self.rank * len(self) + (batch * workers + role) * bsz + pos
            rng_t = np.random.default_rng([self.seed, epoch, index])
            out = self.transform(image, rng_t) if self.transform is not None else image
            bad = list(pending)
            pending.clear()
            yield {"image": out, "raw_text": text, "epoch": epoch, "index": index, "bad": bad}
