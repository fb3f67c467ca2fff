"""Caption dataset for text MLM: JSON list, JSONL or plain text, stored as one packed byte buffer.

Millions of captions are copied into every rank and data worker, so they are held as one numpy
uint8 buffer of UTF-8 plus int64 offsets (about 1.15x the text of CC3M-length captions; see
scripts/bench_caption_memory.py) instead of per-caption Python objects (a str adds ~50 bytes of
header, a dict ~200 more). Numpy buffers also survive fork without copy-on-write churn, because
reading them does not touch per-object reference counts.
"""
import json
import operator
import re
from array import array
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from custom_datasets.records import not_utf8, utf8_lines
from util.errors import UserError

_WHITESPACE = re.compile(r"[ \t\n\r]*")


class PackedStrings:
    """Append-only builder and reader of many strings in one UTF-8 buffer plus offsets.

    After finish(): buffer uint8[total_bytes], offsets int64[n + 1]; string i is
    buffer[offsets[i]:offsets[i + 1]].
    """

    def __init__(self):
        self._chunks = bytearray()
        self._ends = array("q", [0])
        self.buffer = None
        self.offsets = None

    def append(self, text):
        self._chunks += text.encode("utf-8")
        self._ends.append(len(self._chunks))

    def finish(self):
        # Tight copies, then drop the growable builders (their spare capacity is up to ~2x).
        self.buffer = np.frombuffer(self._chunks, dtype=np.uint8).copy()
        self.offsets = np.frombuffer(self._ends, dtype=np.int64).copy()
        self._chunks, self._ends = None, None
        return self

    def __len__(self):
        return len(self.offsets) - 1 if self.offsets is not None else len(self._ends) - 1

    def get(self, i):
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")

    def nbytes(self):
        return self.buffer.nbytes + self.offsets.nbytes


def _detect_format(path):
    """'json' (one document: a list, or a dict with an "annotations" list), 'jsonl' or 'txt'."""
    ext = path.suffix.lower()
    if ext == ".jsonl":
        return "jsonl"
    if ext in (".txt", ".tsv"):
        return "txt"
    with open(path, "rb") as f:
        head = f.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        return "json"
    if head.startswith(b"{"):
        # A first line that is a whole caption object means one object per line; anything else
        # starting with "{" is one document (COCO-style).
        try:
            first = json.loads(head.split(b"\n", 1)[0])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "json"
        return "jsonl" if isinstance(first, dict) and "caption" in first else "json"
    if ext == ".json":
        return "json"  # let the JSON reader report what is wrong
    return "txt"


def _caption_of(item, path, where):
    if not isinstance(item, dict) or "caption" not in item:
        raise UserError(f'{path}: {where} has no "caption" key (expected objects like {{"caption": "..."}})')
    caption = item["caption"]
    if not isinstance(caption, str):
        raise UserError(f'{path}: {where} has a "caption" that is {type(caption).__name__}, not a string')
    return caption


def _read_text(path):
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    for line_no, line in enumerate(data.splitlines(keepends=True), start=1):  # find the line to name it
        try:
            line.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise not_utf8(path, line_no, line, e) from None
    raise UserError(f"{path}: not UTF-8 text")  # a sequence split across lines


def _iter_json(path):
    """Yield captions of a JSON list one item at a time, never building the list of dicts."""
    text = _read_text(path)
    decoder = json.JSONDecoder()

    def fail(e):
        raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None

    pos = _WHITESPACE.match(text, 0).end()
    if text.startswith("{", pos):
        # COCO-style {"annotations": [{"caption": ...}, ...]}: needs the whole document.
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            fail(e)
        items = doc.get("annotations")
        if not isinstance(items, list):
            raise UserError(f'{path}: expected a JSON list of {{"caption": ...}} objects '
                            '(or a COCO-style object with an "annotations" list)')
        del text, doc
        for i, item in enumerate(items):
            yield _caption_of(item, path, f"annotation {i}")
        return
    if not text.startswith("[", pos):
        fail(json.JSONDecodeError('Expecting "[" (a JSON list of {"caption": ...} objects)', text, pos))
    pos = _WHITESPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    index = 0
    while True:
        start = pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(e)
        if not (isinstance(item, dict) and isinstance(item.get("caption"), str)):
            # Only a bad item pays for counting lines; _caption_of raises the precise error.
            _caption_of(item, path, f"item {index} (line {text.count(chr(10), 0, start) + 1})")
        yield item["caption"]
        index += 1
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            rest = _WHITESPACE.match(text, pos + 1).end()
            if rest != len(text):
                fail(json.JSONDecodeError("Extra data after the list", text, rest))
            return
        else:
            fail(json.JSONDecodeError("Expecting ',' or ']'", text, pos))


def _iter_jsonl(path):
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: malformed JSON at line {lineno}, column {e.colno}: {e.msg}") from None
        yield _caption_of(item, path, f"line {lineno}")


def _iter_txt(path):
    for _, line in utf8_lines(path):
        if line.strip():  # blank lines separate nothing; they are not empty captions
            yield line


_READERS = {"json": _iter_json, "jsonl": _iter_jsonl, "txt": _iter_txt}


class CaptionDataset(Dataset):
    """Captions from `path`; item -> {"raw_text": str, "epoch": int, "index": int}.

    Formats: JSON list of {"caption": str} objects (extra keys ignored; a COCO-style object with an
    "annotations" list also works), JSONL with one such object per line, or plain text with one
    caption per line. Captions are whitespace-stripped; empty ones are skipped and counted in
    `num_empty_skipped`. Keys are an int index (epoch 0) or an (epoch, index) tuple.
    """

    def __init__(self, path, flag="--data_path"):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{flag}: file not found: {self.path}")
        self.format = _detect_format(self.path)
        packed = PackedStrings()
        self.num_empty_skipped = 0
        for caption in _READERS[self.format](self.path):
            caption = caption.strip()
            if caption:
                packed.append(caption)
            else:
                self.num_empty_skipped += 1
        self._captions = packed.finish()
        if len(self._captions) == 0:
            raise UserError(f"{flag}: {self.path} contains no captions")

    def __len__(self):
        return len(self._captions)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"caption index {index} out of range for {len(self)} captions")
        return {"raw_text": self._captions.get(index), "epoch": int(epoch), "index": index}

    def iter_captions(self):
        """All captions in order (e.g. to train a tokenizer)."""
        return (self._captions.get(i) for i in range(len(self)))

    def caption_memory_bytes(self):
        """Bytes held by the caption buffer plus offsets."""
        return self._captions.nbytes()
