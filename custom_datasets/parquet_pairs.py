"""Image-text pairs in parquet (pyarrow): a `.parquet` file or a folder of them, read a row group at a time.

Columns (names matched case-insensitively): the caption (`caption` or `text`), the image (`image`, or
`image_path`/`filepath`): either bytes (a binary column, or a struct with a `bytes` field as Hugging Face
datasets write it) or a path relative to the parquet file's folder; optionally `image_id` (rows with the same
id are captions of one image, for retrieval) and `text_id` (kept for the user, unused).

Only the row-group layout (and the `image_id` column, when there is one) is read at start-up; images and
captions are read by the data workers one row group at a time, and each worker keeps the last two groups it
read. For locality the training order (`epoch_order`) permutes the row groups per (seed, epoch) and shuffles
the rows within each group; KeyedDistributedSampler deals it to the ranks (every world-th row), so each rank
walks through the groups in that order. Items are
keyed by (epoch, index) like the other pair datasets, so a resumed run reads exactly what an uninterrupted
one would, and a bad row (undecodable image, missing file, empty caption) is replaced the same way.
"""
import collections
import os

import numpy as np

from custom_datasets.pair_dataset import BadSample, PairDatasetBase, read_file_bytes
from util.errors import UserError

CAPTION_COLUMNS = ("caption", "text", "title")
IMAGE_COLUMNS = ("image", "image_path", "filepath", "image_bytes")
CACHED_GROUPS = 2


def parquet_files(path):
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
        if not files:
            raise UserError(f"{path}: no .parquet files in this folder")
        return files
    return [path]


def is_parquet_path(path):
    return path.lower().endswith(".parquet") or (
        os.path.isdir(path) and any(f.endswith(".parquet") for f in os.listdir(path)))


def _pick(names, wanted, path, what):
    lowered = {n.lower(): n for n in names}
    for w in wanted:
        if w in lowered:
            return lowered[w]
    raise UserError(f"{path}: no {what} column (one of {', '.join(wanted)}); columns: {', '.join(names)}")


class ParquetPairDataset(PairDatasetBase):
    def __init__(self, path, transform=None, seed=0):
        import pyarrow.parquet as pq

        super().__init__(transform, seed)
        self.path, self.files, self.groups = path, parquet_files(path), []  # groups: (file, group, rows)
        self.columns = {}  # file -> (caption column, image column): files of a folder may name them differently
        image_ids = []
        for file in self.files:
            try:
                meta = pq.ParquetFile(file)
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise UserError(f"{file}: not a readable parquet file ({e})") from None
            names = meta.schema_arrow.names
            self.columns[file] = (_pick(names, CAPTION_COLUMNS, file, "caption"),
                                  _pick(names, IMAGE_COLUMNS, file, "image"))
            self.groups += [(file, g, meta.metadata.row_group(g).num_rows) for g in range(meta.num_row_groups)]
            id_col = next((n for n in names if n.lower() == "image_id"), None)
            if id_col is not None:
                image_ids += meta.read(columns=[id_col]).column(0).to_pylist()
            else:
                image_ids += [None] * meta.metadata.num_rows
        self.starts = np.cumsum([0] + [rows for _, _, rows in self.groups])
        if self.starts[-1] == 0:
            raise UserError(f"{path}: no rows")
        distinct = {}
        self.image_index = np.asarray([distinct.setdefault(i if i is not None else ("row", k), len(distinct))
                                       for k, i in enumerate(image_ids)], dtype=np.int64)
        self.texts = None  # captions stay in the file (see the module docstring)
        self._cache = collections.OrderedDict()

    def __len__(self):
        return int(self.starts[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = collections.OrderedDict()  # workers read their own groups
        return state

    def epoch_order(self, seed, epoch):
        """All indices: row groups in a (seed, epoch) permutation, rows shuffled within each group."""
        rng = np.random.default_rng([seed, epoch, 0x9A7])
        parts = []
        for g in rng.permutation(len(self.groups)):
            parts.append(self.starts[g] + np.random.default_rng([seed, epoch, int(g)]).permutation(self.groups[g][2]))
        return np.concatenate(parts).tolist()

    def _row(self, i):
        g = int(np.searchsorted(self.starts, i, side="right") - 1)
        if g in self._cache:
            self._cache.move_to_end(g)
        else:
            import pyarrow.parquet as pq

            file, group, _ = self.groups[g]
            try:
                table = pq.ParquetFile(file).read_row_group(group, columns=list(self.columns[file]))
            except Exception as e:  # noqa: BLE001 - a damaged row group: its rows are bad samples
                raise BadSample(f"unreadable row group {group} of {os.path.basename(file)}: {e}") from None
            self._cache[g] = (table.column(0), table.column(1), os.path.dirname(file))  # arrow: no copy per row
            while len(self._cache) > CACHED_GROUPS:
                self._cache.popitem(last=False)
        captions, images, folder = self._cache[g]
        k = i - int(self.starts[g])
        file, group, _ = self.groups[g]
        return captions[k].as_py(), images[k].as_py(), folder, f"{os.path.basename(file)}:group{group}:row{k}"

    def ident(self, i):
        """The image path of row i when the file stores paths, else `file:groupG:rowR` (also for a row of an
        unreadable group)."""
        try:
            _, image, _, where = self._row(i)
        except BadSample:
            g = int(np.searchsorted(self.starts, i, side="right") - 1)
            return f"{os.path.basename(self.groups[g][0])}:group{self.groups[g][1]}:row{i - int(self.starts[g])}"
        return image if isinstance(image, str) else where

    def raw(self, i):
        caption, image, folder, where = self._row(i)
        ident = image if isinstance(image, str) else where  # as ident(i), without converting the row twice
        if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            image = image.get("bytes") or image.get("path")
        if isinstance(image, str):
            data = read_file_bytes(os.path.join(folder, image))
        elif isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        else:
            raise BadSample("no image in this row")
        if not isinstance(caption, str):
            raise BadSample("caption is not text")
        return data, caption, ident
