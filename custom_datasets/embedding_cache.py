"""LiT without image I/O: a folder of a locked image tower's embeddings of every training pair, computed once.

Layout of the folder (`--lit_cache DIR`):
  meta.json                 {"fingerprint", "num_items", "chunk", "source"}: written first; a run whose
                            fingerprint (image-tower weights and pooling, view, precision, data file) differs
                            is refused; its chunk size is the folder's, whatever --lit_cache_chunk says
  emb-<start>.npy           float32 [n, dim]: the embeddings of items start .. start+n-1 (the chunk's index)
  bad-<start>.json          {item: reason} of the chunk's unreadable images (written before emb-<start>.npy)
Each chunk file is written to a temporary name and renamed, so a chunk exists whole or not at all: a killed
build resumes with the missing chunks, dealt round-robin over the ranks of the new run.

`CachedPairs` serves training items from the cache and the pair file's captions, with no image decoding: an
item whose image was unreadable raises BadSample, so the replacement sequence (keyed by seed, epoch and index)
is the online run's. Only pair files that hold their captions in memory (CSV/TSV, MUGE) are supported.
"""
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from custom_datasets.pair_collator import caption_hashes
from custom_datasets.pair_dataset import BadSample, check_caption, load_with_replacement, parse_key
from util.checkpoint import replace_atomically
from util.errors import UserError

META = "meta.json"


def _write_text(path, body):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(body)
    replace_atomically(path, write)


class EmbeddingCache:
    def __init__(self, folder, num_items, chunk=4096):
        self.folder, self.num_items, self.chunk = folder, int(num_items), int(chunk)

    def starts(self):
        return list(range(0, self.num_items, self.chunk))

    def _emb(self, start):
        return os.path.join(self.folder, f"emb-{start:010d}.npy")

    def _bad(self, start):
        return os.path.join(self.folder, f"bad-{start:010d}.json")

    def read_meta(self):
        path = os.path.join(self.folder, META)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def check_or_start(self, fingerprint, source, is_main):
        """Refuse a cache of other weights, preprocessing or data (one line); start a new one (rank 0 writes its
        meta.json). Returns True if it already held every chunk."""
        meta = self.read_meta()
        if meta is not None:
            self.adopt_layout()  # the files' layout, not this run's flag
            if meta.get("fingerprint") != fingerprint or meta.get("num_items") != self.num_items:
                raise UserError(f"--lit_cache {self.folder}: built for other image-tower weights, preprocessing or "
                                f"data ({meta.get('source')}, {meta.get('num_items')} items, fingerprint "
                                f"{str(meta.get('fingerprint'))[:12]}; this run: {source}, {self.num_items} items, "
                                f"{fingerprint[:12]}); delete the folder or pass another one")
            return not self.missing()
        if is_main:
            os.makedirs(self.folder, exist_ok=True)
            body = json.dumps({"fingerprint": fingerprint, "num_items": self.num_items, "chunk": self.chunk,
                               "source": source}, indent=1)
            _write_text(os.path.join(self.folder, META), body)
        return False

    def adopt_layout(self):
        """Take the chunk size of the folder's meta.json (after rank 0 wrote it), whatever the flag said."""
        self.chunk = int(self.read_meta().get("chunk", self.chunk))

    def missing(self, rank=0, world_size=1):
        """This rank's share (round-robin) of the chunk starts that do not exist yet."""
        return [s for s in self.starts() if not os.path.isfile(self._emb(s))][rank::world_size]

    def write_chunk(self, start, embeddings, bad):
        """embeddings float32 [n, dim]; bad {item: reason}."""
        _write_text(self._bad(start), json.dumps({str(k): v for k, v in bad.items()}))
        array = np.ascontiguousarray(embeddings, dtype=np.float32)

        def write(tmp):  # a file object: np.save would append ".npy" to the temporary name
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
        replace_atomically(self._emb(start), write)

    def open(self):
        """(list of memory-mapped chunks, {item: reason} of unreadable images)."""
        chunks, bad = [], {}
        for s in self.starts():
            if not os.path.isfile(self._emb(s)):
                raise UserError(f"--lit_cache {self.folder}: chunk {os.path.basename(self._emb(s))} is missing")
            chunks.append(np.load(self._emb(s), mmap_mode="r"))
            with open(self._bad(s), encoding="utf-8") as f:
                bad.update({int(k): v for k, v in json.load(f).items()})
        return chunks, bad


class CachedPairs(Dataset):
    """Training items from the cache: {"image_emb": FloatTensor[dim], "raw_text", "epoch", "index", "bad"}.
    `pairs` is the pair dataset (its captions in memory), `cache` a complete EmbeddingCache."""

    def __init__(self, pairs, cache, seed=0):
        if getattr(pairs, "texts", None) is None:
            raise UserError("--lit_cache needs a pair file that holds its captions (CSV/TSV or MUGE), not parquet "
                            "or WebDataset shards")
        self.pairs, self.cache, self.seed = pairs, cache, seed
        self._chunks = self._bad = None  # opened in each process on first use (after the cache is built)

    def __len__(self):
        return len(self.pairs)

    def _load(self, i):
        if i in self._bad:
            raise BadSample(self._bad[i])
        row = self._chunks[i // self.cache.chunk][i % self.cache.chunk]
        return torch.from_numpy(np.array(row)), check_caption(self.pairs.texts.get(i))

    def __getitem__(self, key):
        if self._chunks is None:
            self._chunks, self._bad = self.cache.open()
        epoch, index = parse_key(key)
        (emb, text), _, bad = load_with_replacement(self._load, self.pairs.ident, len(self), self.seed, epoch,
                                                    index, f"--lit_cache {self.cache.folder}")
        return {"image_emb": emb, "raw_text": text, "epoch": epoch, "index": index, "bad": bad}


class CachedPairCollator:
    """CachedPairs items -> PairCollator's batch with "image_emb" [B, dim] in place of "images"."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items):
        ids, masks = self.tokenizer.encode_batch([it["raw_text"] for it in items])
        return {"image_emb": torch.stack([it["image_emb"] for it in items]), "text_ids": ids, "text_masks": masks,
                "bad": [b for it in items for b in it["bad"]],
                "epoch": torch.tensor([it["epoch"] for it in items], dtype=torch.long),
                "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
                "caption_hash": caption_hashes(ids, masks)}


def fingerprint(tensors, extra):
    """sha256 over named tensors (the image path's weights) and a JSON-able `extra` (preprocessing, data)."""
    import hashlib

    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def build_chunks(cache, source, encode, rank, world_size, batch_size, num_workers, log):
    """Embed this rank's missing chunks: `source[i]` -> {"image": FloatTensor[3, H, W]} decoded without
    replacement (an unreadable image is recorded as bad), `encode(images [B, 3, H, W]) -> [B, dim]`."""
    from torch.utils.data import DataLoader, Subset

    todo = cache.missing(rank, world_size)
    for n, start in enumerate(todo, 1):
        items = range(start, min(start + cache.chunk, cache.num_items))
        loader = DataLoader(Subset(_Decoded(source), items), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=list)
        embedded, bad, item = {}, {}, start
        for batch in loader:
            keep = []
            for entry in batch:
                if isinstance(entry, str):
                    bad[item] = entry
                else:
                    keep.append((item, entry))
                item += 1
            if keep:
                embs = encode(torch.stack([img for _, img in keep])).float().cpu().numpy()
                embedded.update({i: e for (i, _), e in zip(keep, embs)})
        dim = len(next(iter(embedded.values()))) if embedded else 1
        cache.write_chunk(start, np.stack([embedded.get(i, np.zeros(dim, np.float32)) for i in items]), bad)
        log(f"lit cache: chunk {n}/{len(todo)} of this rank ({len(items)} images, {len(bad)} unreadable) -> "
            f"{cache.folder}")


class _Decoded(Dataset):
    """source item i -> its transformed image, or the reason it cannot be read (str)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        try:
            image, _ = self.source.load(i)
        except BadSample as e:
            return e.args[0]
        return self.source.transform(image, np.random.default_rng([self.source.seed, 0, i]))
