"""Image-text pair datasets: CSV/TSV files and the MUGE/Chinese-CLIP layout (map-style).

Items: dataset[key], key an int (epoch 0) or (epoch, index) ->
    {"image": FloatTensor[3, H, W], "raw_text": str, "epoch": int, "index": int,
     "bad": [(path_or_id, reason), ...]}
`transform(pil_image, rng)` is supplied by the caller; rng = np.random.default_rng([seed, epoch,
index]) so the same key always gives the same tensor. A sample that cannot be read or decoded is
replaced by another (drawn from a generator keyed by the same key, retried until one loads), so a
batch keeps its size on every rank; what was replaced is listed in "bad" for the caller to count
and log. Strings are kept in one byte buffer plus offsets: millions of pairs stay compact when
copied into every rank and data worker.
"""
import base64
import binascii
import csv
import os
from array import array

import numpy as np
from torch.utils.data import Dataset

# The decoding half lives in custom_datasets/image_decode.py; its names stay importable from here.
from custom_datasets.image_decode import (DEFAULT_MAX_IMAGE_PIXELS, SIXTEEN_BIT_MODES, BadSample, decode_image,
                                          draft_region, finish_image, open_image, set_max_image_pixels, to_rgb)
from custom_datasets.records import jsonl_records, not_utf8, text_rows
from custom_datasets.text_dataset import PackedStrings
from util.errors import UserError

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "SIXTEEN_BIT_MODES", "BadSample", "decode_image", "draft_region",
           "finish_image", "open_image", "set_max_image_pixels", "to_rgb", "parse_key", "load_view", "check_caption",
           "read_file_bytes", "load_with_replacement", "PairDatasetBase", "CsvPairDataset", "MugePairDataset",
           "decode_base64", "muge_files", "is_shard_path", "build_pair_dataset"]
MAX_REPLACEMENTS = 50  # consecutive failures before the dataset is declared broken


def parse_key(key):
    """int -> (0, int); (epoch, index) -> (epoch, index)."""
    if isinstance(key, (tuple, list)):
        epoch, index = key
        return int(epoch), int(index)
    return 0, int(key)


def load_view(load, transform, ident, num_items, seed, epoch, index, where):
    """(view, source index, bad) of item (epoch, index) with load_with_replacement: `load(source, lazy)` reads an
    entry (lazy: undecoded, for a transform that `decodes_itself`), `transform(item, rng)` makes the view with
    the rng of the requested key, and a decoding failure inside the transform is replaced like one in load."""
    lazy = getattr(transform, "decodes_itself", False)

    def view(source):
        item = load(source, lazy)
        return transform(item, np.random.default_rng([seed, epoch, index])) if transform is not None else item
    return load_with_replacement(view, ident, num_items, seed, epoch, index, where)


def check_caption(text: str) -> str:
    """`text`, or BadSample when it holds nothing but whitespace (a pair without a caption teaches nothing)."""
    if not text.strip():
        raise BadSample("empty caption")
    return text


def read_file_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise BadSample("missing file") from None
    except OSError as e:
        raise BadSample(f"unreadable file: {e.strerror or e}") from None


def load_with_replacement(load, ident, num_items, seed, epoch, index, where):
    """(load(source), source, bad): load entry `index`, or, when it is unreadable (BadSample), other entries
    picked by a generator keyed by (seed, epoch, index), so a key always gets the same replacements. `bad`
    lists (ident, reason) of the entries replaced; MAX_REPLACEMENTS failures in a row raise a UserError
    that starts with `where` (the file or flag to check)."""
    bad, source, picker = [], index, None
    while True:
        try:
            return load(source), source, bad
        except BadSample as e:
            bad.append((ident(source), e.args[0]))
            if len(bad) >= MAX_REPLACEMENTS:
                raise UserError(f"{where}: {len(bad)} samples in a row failed to load (last: {bad[-1][0]}: "
                                f"{bad[-1][1]})") from None
            if picker is None:
                picker = np.random.default_rng([seed, epoch, index, 0x5EED])
            source = int(picker.integers(num_items))


class PairDatasetBase(Dataset):
    """Shared replacement logic; subclasses provide raw(i) -> (image bytes, text, path_or_id)."""

    def __init__(self, transform=None, seed: int = 0):
        self.transform = transform
        self.seed = seed
        self.texts = PackedStrings().finish()
        # image_index[i]: id of the distinct image of pair i (0..num_images-1), for retrieval
        # evaluation where one image has several captions.
        self.image_index = np.zeros(0, dtype=np.int64)

    def __len__(self):
        return len(self.texts)

    def raw(self, i: int):
        raise NotImplementedError

    def ident(self, i: int) -> str:
        raise NotImplementedError

    def load(self, i: int, lazy: bool = False):
        """(RGB PIL image, text) of entry i, or BadSample (an empty caption is one too); `lazy`: the image from
        open_image, for a transform that decodes it itself (`decodes_itself`, e.g. with draft_region)."""
        data, text, _ = self.raw(i)
        return (open_image(data) if lazy else decode_image(data)), check_caption(text)

    def check(self, i: int):
        """None if entry i loads, else (path_or_id, reason). Used by the offline validator."""
        try:
            self.load(i)
            return None
        except BadSample as e:
            return self.ident(i), e.args[0]

    def __getitem__(self, key):
        epoch, index = parse_key(key)
        if not 0 <= index < len(self):
            raise IndexError(index)
        (out, text), _, bad = load_view(self.load, _OnImage(self.transform), self.ident, len(self), self.seed,
                                        epoch, index, "pair dataset (check it with util/validate_pairs.py)")
        return {"image": out, "raw_text": text, "epoch": epoch, "index": index, "bad": bad}


class _OnImage:
    """A transform of (image, text) pairs that applies `transform` to the image (and says what it decodes)."""

    def __init__(self, transform):
        self.transform = transform
        self.decodes_itself = getattr(transform, "decodes_itself", False)

    def __call__(self, pair, rng):
        image, text = pair
        return (self.transform(image, rng) if self.transform is not None else image), text


def _column(header, names, path):
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise UserError(f"{path}: header {header} has no '{names[0]}' column; "
                    f"expected columns named text and image_path")


class CsvPairDataset(PairDatasetBase):
    """Pairs from a CSV (.csv) or TSV (.tsv) file with a header naming `text` and `image_path`
    (any order, other columns ignored; open_clip's `title`/`filepath` also accepted). Relative
    image paths are resolved from the file's folder.
    """

    def __init__(self, path: str, transform=None, seed: int = 0):
        super().__init__(transform, seed)
        if not os.path.isfile(path):
            raise UserError(f"{path}: pair file not found")
        self.path, self.root = path, os.path.dirname(os.path.abspath(path))
        delimiter = "\t" if path.lower().endswith(".tsv") else ","
        texts, paths, image_ids, image_idx = PackedStrings(), PackedStrings(), {}, array("q")
        # TSV captions often hold quote characters that are not CSV quoting
        reader = csv.reader(text_rows(path), delimiter=delimiter,
                            quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            raise UserError(f"{path}: empty file; expected a header with text and image_path")
        t_col = _column(header, ("text", "caption", "title"), path)
        p_col = _column(header, ("image_path", "filepath", "image"), path)
        for row in reader:
            if not row:
                continue
            if len(row) <= max(t_col, p_col):
                raise UserError(f"{path}:{reader.line_num}: expected {len(header)} columns, got {len(row)}")
            texts.append(row[t_col])
            paths.append(row[p_col])
            image_idx.append(image_ids.setdefault(row[p_col], len(image_ids)))
        if not len(texts):
            raise UserError(f"{path}: no pairs after the header")
        self.texts, self.paths = texts.finish(), paths.finish()
        self.image_index = np.asarray(image_idx, dtype=np.int64)

    def ident(self, i):
        return self.paths.get(i)

    def raw(self, i):
        rel = self.paths.get(i)
        return read_file_bytes(os.path.join(self.root, rel)), self.texts.get(i), rel


def decode_base64(b64: bytes) -> bytes:
    """Standard or URL-safe base64 (both occur in MUGE-style files) -> bytes, or BadSample."""
    try:
        return base64.b64decode(b64.strip().replace(b"-", b"+").replace(b"_", b"/"),
                                validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadSample(f"undecodable base64: {e}") from None


class MugePairDataset(PairDatasetBase):
    """MUGE / Chinese-CLIP layout: `*_texts.jsonl` lines {"text_id", "text", "image_ids": [...]}
    and `*_imgs.tsv` lines `image_id<TAB>base64`. One sample per (text, image_id) pair. Images
    stay in the TSV: only each line's byte offset and length are kept, and read with a seek.
    """

    def __init__(self, texts_jsonl: str, imgs_tsv: str, transform=None, seed: int = 0):
        super().__init__(transform, seed)
        for p in (texts_jsonl, imgs_tsv):
            if not os.path.isfile(p):
                raise UserError(f"{p}: MUGE file not found")
        self.texts_jsonl, self.imgs_tsv = texts_jsonl, imgs_tsv
        self._tsv_name = os.path.basename(imgs_tsv)
        lines = self._index_tsv(imgs_tsv)  # image_id -> (offset, length); dropped after init
        texts, offsets, lengths, image_idx = PackedStrings(), array("q"), array("q"), array("q")
        self.missing = {}  # pair index -> image id listed in the jsonl but absent from the TSV
        distinct = {}
        for _, rec in jsonl_records(texts_jsonl, ("text", "image_ids"), texts_jsonl):
            text = rec["text"]
            for image_id in rec["image_ids"]:
                image_id = str(image_id)
                off, length = lines.get(image_id, (-1, 0))
                if off < 0:  # listed but absent: reported (and replaced) when read
                    self.missing[len(texts)] = image_id
                texts.append(text)
                offsets.append(off)
                lengths.append(length)
                image_idx.append(distinct.setdefault(image_id, len(distinct)))
        if not len(texts):
            raise UserError(f"{texts_jsonl}: no (text, image) pairs")
        self.texts = texts.finish()
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.image_index = np.asarray(image_idx, dtype=np.int64)
        self._file, self._pid = None, None  # opened lazily, once per worker process

    @staticmethod
    def _index_tsv(path):
        lines, offset = {}, 0
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                tab = line.find(b"\t")
                if tab > 0:
                    try:
                        lines[line[:tab].decode("utf-8").strip()] = (offset, len(line))
                    except UnicodeDecodeError as e:
                        raise not_utf8(path, line_no, line, e) from None
                offset += len(line)
        return lines

    def __getstate__(self):  # file handles do not cross into worker processes
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def _read_line(self, i):
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.imgs_tsv, "rb"), os.getpid()
        self._file.seek(self.offsets[i])
        return self._file.read(self.lengths[i])

    def ident(self, i):
        if i in self.missing:
            return f"{self._tsv_name}:{self.missing[i]}"
        image_id = self._read_line(i).partition(b"\t")[0].decode("utf-8")
        return f"{self._tsv_name}:{image_id}"

    def raw(self, i):
        if self.offsets[i] < 0:
            raise BadSample("image id not in the image TSV")
        image_id, _, b64 = self._read_line(i).partition(b"\t")
        ident = f"{self._tsv_name}:{image_id.decode('utf-8')}"
        return decode_base64(b64), self.texts.get(i), ident


def muge_files(path: str, split: str = "train"):
    """(texts_jsonl, imgs_tsv) for a MUGE folder (choosing `split`) or a *_texts.jsonl path."""
    if os.path.isdir(path):
        cands = sorted(f for f in os.listdir(path) if f.endswith("_texts.jsonl"))
        name = f"{split}_texts.jsonl"
        if name not in cands:
            if len(cands) != 1:
                raise UserError(f"{path}: no {name} (found {cands or 'no *_texts.jsonl'})")
            name = cands[0]
        texts = os.path.join(path, name)
    else:
        texts = path
    return texts, texts[:-len("_texts.jsonl")] + "_imgs.tsv"


def is_shard_path(path: str) -> bool:
    if "{" in path or path.endswith(".tar"):
        return True
    return os.path.isdir(path) and any(f.endswith(".tar") for f in os.listdir(path))


def build_pair_dataset(path: str, transform=None, *, seed: int = 0, split: str = "train",
                       flag: str = "--data_path", batch_size=None, samples_per_epoch=None,
                       shuffle_buffer: int = 1000, rank=None, world_size=None):
    """Pick the dataset for `path` (`flag` names the option in error messages):
    - a .csv / .tsv file -> CsvPairDataset
    - a .parquet file or a folder of them -> custom_datasets.parquet_pairs.ParquetPairDataset
    - a *_texts.jsonl file or a folder holding *_texts.jsonl -> MugePairDataset (`split` picks
      {split}_texts.jsonl in a folder)
    - a shard pattern (.../shard-{000000..000009}.tar), one .tar, or a folder of .tar files ->
      custom_datasets.wds_pairs.WdsPairDataset, an IterableDataset that needs batch_size (the
      per-rank batch) and takes samples_per_epoch, shuffle_buffer, rank and world_size.
    Map-style datasets ignore batch_size, shuffle_buffer, rank and world_size (the sampler
    splits them), so one call serves every format.
    """
    if is_shard_path(path):
        from custom_datasets.wds_pairs import WdsPairDataset  # imports this module
        if batch_size is None:
            raise TypeError("shard datasets need batch_size (the per-rank batch size)")
        return WdsPairDataset(path, transform, batch_size=batch_size, seed=seed,
                              samples_per_epoch=samples_per_epoch, shuffle_buffer=shuffle_buffer,
                              rank=rank, world_size=world_size)
    if samples_per_epoch is not None:
        raise UserError(f"{flag} {path}: samples_per_epoch applies to WebDataset shards only")
    low = path.lower()
    if os.path.exists(path) and (low.endswith(".parquet") or os.path.isdir(path)):
        from custom_datasets.parquet_pairs import ParquetPairDataset, is_parquet_path  # imports this module
        if is_parquet_path(path):
            return ParquetPairDataset(path, transform, seed)
    if os.path.isfile(path) and (low.endswith(".csv") or low.endswith(".tsv")):
        return CsvPairDataset(path, transform, seed)
    if low.endswith("_texts.jsonl") or (
            os.path.isdir(path) and any(f.endswith("_texts.jsonl") for f in os.listdir(path))):
        texts, imgs = muge_files(path, split)
        return MugePairDataset(texts, imgs, transform, seed)
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: not found")
    raise UserError(f"{flag} {path}: not a pair dataset; expected a .csv/.tsv or .parquet file, a "
                    f"MUGE folder or *_texts.jsonl, or WebDataset .tar shards")
