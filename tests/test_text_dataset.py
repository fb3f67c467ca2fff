import gc
import json
import pickle
import tracemalloc

import numpy as np
import pytest

from custom_datasets.text_dataset import CaptionDataset, PackedStrings
from util.errors import UserError

CAPTIONS = ["a small red circle above a large blue square", "Hà Nội vào mùa thu", "我爱北京天安门",
            'quotes " and \\ backslashes, commas', "emoji 🙂 and tabs\tinside", "Ünïcödé façade"]


def write(path, fmt, captions=CAPTIONS):
    if fmt == "json":
        path.write_text(json.dumps([{"caption": c, "image_id": i} for i, c in enumerate(captions)],
                                   ensure_ascii=False, indent=1), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"caption": c}) + "\n" for c in captions), encoding="utf-8")
    else:
        path.write_text("".join(c + "\n" for c in captions), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "txt"])
def test_formats_give_identical_captions(tmp_path, fmt):
    ds = CaptionDataset(write(tmp_path / f"caps.{fmt}", fmt))
    assert ds.format == fmt
    assert len(ds) == len(CAPTIONS)
    assert [ds[i]["raw_text"] for i in range(len(ds))] == CAPTIONS
    assert list(ds.iter_captions()) == CAPTIONS


def test_format_detected_from_content(tmp_path):
    assert CaptionDataset(write(tmp_path / "a.data", "json")).format == "json"
    assert CaptionDataset(write(tmp_path / "b.data", "jsonl")).format == "jsonl"
    assert CaptionDataset(write(tmp_path / "c.json", "jsonl")).format == "jsonl"  # JSONL named .json
    assert CaptionDataset(write(tmp_path / "d", "txt")).format == "txt"


def test_coco_style_annotations(tmp_path):
    path = tmp_path / "coco.json"
    path.write_text(json.dumps({"images": [], "annotations": [{"id": 1, "caption": c} for c in CAPTIONS]}))
    assert list(CaptionDataset(path).iter_captions()) == CAPTIONS


def test_keys_epoch_and_whitespace(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_text("\ufeff  first caption \r\n\n   \nsecond\n", encoding="utf-8")
    ds = CaptionDataset(path)
    assert len(ds) == 2 and ds.num_empty_skipped == 0  # blank text lines are not items
    assert ds[0] == {"raw_text": "first caption", "epoch": 0, "index": 0}
    assert ds[(7, np.int64(1))] == {"raw_text": "second", "epoch": 7, "index": 1}
    with pytest.raises(IndexError):
        ds[2]
    clone = pickle.loads(pickle.dumps(ds))  # spawn-started workers receive a pickled copy
    assert clone[(3, 1)] == ds[(3, 1)]


def test_empty_json_captions_are_skipped(tmp_path):
    path = tmp_path / "caps.json"
    path.write_text(json.dumps([{"caption": "one"}, {"caption": "  "}, {"caption": "two"}]))
    ds = CaptionDataset(path)
    assert list(ds.iter_captions()) == ["one", "two"] and ds.num_empty_skipped == 1


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="--data_path: file not found: .*nope.json"):
        CaptionDataset(tmp_path / "nope.json")


@pytest.mark.parametrize("text, where", [
    ('[{"caption": "a"},\n {"caption": "b"\n]', "line 3, column 1"),
    ('[{"caption": "a"},\n {"caption": "b"}, ]', "line 2"),
    ('[{"caption": "a"}\n {"caption": "b"}]', "line 2"),
    ('[{"caption": "a"}] trailing', "line 1"),
    ('{"caption": "a"', "line 1"),
])
def test_malformed_json_names_file_and_position(tmp_path, text, where):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserError, match="bad.json") as err:
        CaptionDataset(path)
    assert "malformed JSON" in str(err.value) and where in str(err.value)


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"caption": "a"}\n{"caption": "b"}\n{"caption": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl: malformed JSON at line 3"):
        CaptionDataset(path)


@pytest.mark.parametrize("fmt, text", [
    ("json", '[{"caption": "a"},\n{"text": "b"}]'),
    ("json", '[{"caption": "a"},\n "just a string"]'),
    ("jsonl", '{"caption": "a"}\n{"text": "b"}\n'),
])
def test_items_without_caption(tmp_path, fmt, text):
    path = tmp_path / f"nocap.{fmt}"
    path.write_text(text)
    with pytest.raises(UserError, match='nocap.*(item 1 \\(line 2\\)|line 2).*no "caption" key'):
        CaptionDataset(path)


def test_non_string_caption(tmp_path):
    path = tmp_path / "num.json"
    path.write_text('[{"caption": 3}]')
    with pytest.raises(UserError, match="not a string"):
        CaptionDataset(path)


@pytest.mark.parametrize("name, text", [("e.json", "[]"), ("e.jsonl", "\n\n"), ("e.txt", ""),
                                        ("f.json", '[{"caption": ""}]')])
def test_empty_dataset(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match="contains no captions"):
        CaptionDataset(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt:2: not UTF-8 text \(byte 0xe9 at column 4\)"):
        CaptionDataset(path)


def test_memory_is_compact(tmp_path):
    """200k ten-word captions: buffer + offsets and everything the dataset retains < 2x the UTF-8 text."""
    rng = np.random.default_rng(0)
    words = np.array(["red", "circle", "über", "blue", "square", "a", "small", "large", "above", "下"])
    picks = rng.integers(0, len(words), size=(200_000, 10))
    captions = [" ".join(row) for row in words[picks]]
    utf8_bytes = sum(len(c.encode("utf-8")) for c in captions)
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"caption": c}, ensure_ascii=False) + "\n" for c in captions)
    del captions
    gc.collect()
    tracemalloc.start()
    try:
        ds = CaptionDataset(path)
        gc.collect()
        retained, _ = tracemalloc.get_traced_memory()  # numpy reports its buffers to tracemalloc
    finally:
        tracemalloc.stop()
    assert len(ds) == 200_000
    assert ds.caption_memory_bytes() < 2 * utf8_bytes
    assert retained < 2 * utf8_bytes, (retained, utf8_bytes)
    assert ds[123_456]["raw_text"] == " ".join(words[picks[123_456]])


def test_packed_strings():
    packed = PackedStrings()
    for text in ["héllo", "", "下雨"]:
        packed.append(text)
    packed.finish()
    clone = pickle.loads(pickle.dumps(packed))
    assert [clone.get(i) for i in range(len(clone))] == ["héllo", "", "下雨"]
    assert packed.offsets.tolist() == [0, 6, 6, 12] and packed.nbytes() == 12 + 4 * 8
    assert len(PackedStrings().finish()) == 0
