"""Bad data is survived and counted: non-UTF-8 record files get one line naming the file and line, every PIL
image mode decodes to the right RGB, oversized images decode at reduced size or are replaced, empty captions
are replaced, and one run over pairs with 5% corrupt samples of every kind lists each bad file once.

`python tests/test_bad_data.py` runs the corrupt-data training run and prints the counts per kind."""
import collections
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too
import main_pretrain_cook  # noqa: E402
from custom_datasets.pair_dataset import BadSample, CsvPairDataset, MugePairDataset, decode_image  # noqa: E402
from custom_datasets.records import csv_records  # noqa: E402
from util.bad_samples import BadSampleLog  # noqa: E402
from util.errors import UserError  # noqa: E402


def encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_image(size=(32, 32), seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- text files

@pytest.mark.parametrize("name", ["pairs.csv", "pairs.tsv"])
def test_a_pair_file_that_is_not_utf8_names_the_file_and_line(tmp_path, name):
    sep = "\t" if name.endswith(".tsv") else ","
    path = tmp_path / name
    path.write_bytes(f"text{sep}image_path\na cat{sep}a.jpg\n".encode() + f"caf\xe9{sep}b.jpg\n".encode("latin-1"))
    with pytest.raises(UserError, match=rf"{name}:3: not UTF-8 text \(byte 0xe9 at column 4\); convert the file"):
        CsvPairDataset(str(path))


def test_a_muge_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    texts, imgs = tmp_path / "train_texts.jsonl", tmp_path / "train_imgs.tsv"
    imgs.write_bytes(b"1\taGVsbG8=\n")
    texts.write_bytes(b'{"text_id": 1, "text": "ok", "image_ids": [1]}\n{"text_id": 2, "text": "caf\xe9", "image_ids": [1]}\n')
    with pytest.raises(UserError, match=r"train_texts.jsonl:2: not UTF-8 text"):
        MugePairDataset(str(texts), str(imgs))
    texts.write_bytes(b'{"text_id": 1, "text": "ok", "image_ids": [1]}\n')
    imgs.write_bytes(b"1\taGVsbG8=\n\xff2\taGVsbG8=\n")
    with pytest.raises(UserError, match=r"train_imgs.tsv:2: not UTF-8 text \(byte 0xff at column 1\)"):
        MugePairDataset(str(texts), str(imgs))


def test_csv_records_count_physical_lines_and_accept_a_bom(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b'\xef\xbb\xbftext,label\n"two\nlines",1\nthird,2\n')
    assert [(n, r["text"]) for n, r in csv_records(str(path), ("text", "label"), (), "x")] == [(3, "two\nlines"),
                                                                                            (4, "third")]


# -------------------------------------------------------------------------------------------- image modes

def test_16_bit_grey_is_scaled_not_clipped_to_white():
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    out = np.asarray(decode_image(encoded(Image.fromarray(values), "PNG")))
    assert out.shape == (8, 8, 3) and np.array_equal(out[..., 0], np.rint(values / 257).astype(np.uint8))
    assert np.array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode):
    colour = (200, 20, 20) if mode != "LA" else (90, 90, 90)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = colour
    rgba[:2, ..., 3] = 255  # top half opaque, bottom half transparent
    if mode == "P":  # index 0: the colour, index 1: a transparent green
        img = Image.fromarray(np.repeat([[0], [0], [1], [1]], 4, axis=1).astype(np.uint8), "P")
        img.putpalette([*colour, 0, 255, 0])
        data = encoded(img, "PNG", transparency=1)
        assert Image.open(io.BytesIO(data)).mode == "P"
    else:
        data = encoded(Image.fromarray(rgba, "RGBA").convert(mode), "PNG")
    out = np.asarray(decode_image(data))
    assert (out[2:] == 255).all() and (out[:2] == colour).all()


def _without_adobe_marker(jpeg):
    """The same JPEG with its APP14 'Adobe' segment removed."""
    at = jpeg.find(b"\xff\xee")
    length = int.from_bytes(jpeg[at + 2:at + 4], "big")
    return jpeg[:at] + jpeg[at + 2 + length:]


@pytest.mark.parametrize("adobe", [True, False])
def test_cmyk_jpegs_plain_and_adobe_inverted_decode_to_the_right_colours(adobe):
    rgb = rgb_image((16, 16))
    cmyk = rgb.convert("CMYK")
    data = encoded(cmyk, "JPEG", quality=98)  # as Photoshop writes it: an Adobe marker, inverted values
    assert Image.open(io.BytesIO(data)).info.get("adobe") is not None
    if not adobe:  # plain CMYK, no marker
        data = _without_adobe_marker(data)
        assert Image.open(io.BytesIO(data)).info.get("adobe") is None
    out = np.asarray(decode_image(data), dtype=np.float64)
    assert np.abs(out - np.asarray(rgb, dtype=np.float64)).mean() < 4


def test_an_oversized_jpeg_decodes_at_reduced_size_and_other_formats_are_refused():
    big = rgb_image((400, 200))
    small = decode_image(encoded(big, "JPEG"), max_pixels=30_000)
    assert small.size == (200, 100)  # 1/2: the first scale within the limit
    assert decode_image(encoded(big, "JPEG"), max_pixels=5_000).size == (100, 50)  # 1/4
    assert decode_image(encoded(big, "JPEG"), max_pixels=80_000).size == (400, 200)
    with pytest.raises(BadSample, match=r"400x200 pixels is over --max_image_pixels 30000 and a PNG cannot"):
        decode_image(encoded(big, "PNG"), max_pixels=30_000)
    with pytest.raises(BadSample, match="over --max_image_pixels 100"):
        decode_image(encoded(big, "JPEG"), max_pixels=100)  # even 1/8 does not fit


# ---------------------------------------------------------------------------------------- bad-sample log

def test_the_bad_sample_file_has_one_row_per_file_across_steps_epochs_and_resumes(tmp_path):
    log = BadSampleLog(str(tmp_path), 0)
    log([("a.jpg", "missing file"), ("a.jpg", "missing file"), ("b.jpg", "not an image")], epoch=0)
    log([("a.jpg", "missing file")], epoch=1)
    assert log.epoch_count == 4 and log.epoch_files == 2
    log.end_epoch(0, 10, None, "cpu")
    assert log.total == 4 and log.epoch_count == 0
    resumed = BadSampleLog(str(tmp_path), 0)
    resumed([("b.jpg", "not an image"), ("c.jpg", "empty caption")], epoch=2)
    rows = [line.rstrip("\n").split("\t") for line in open(tmp_path / "bad_samples_rank0.tsv")]
    assert [r[1] for r in rows] == ["a.jpg", "b.jpg", "c.jpg"] and rows[0][0] == "1" and rows[2][0] == "3"


# ------------------------------------------------------------------------------------- corrupt-data run

KINDS = ("truncated JPEG", "zero-byte file", "missing file", "not an image", "empty caption", "oversized PNG")
GOOD_SPECIAL = ("16-bit PNG", "CMYK JPEG", "palette PNG", "LA PNG", "RGBA PNG", "large JPEG")
MAX_PIXELS = 40_000


def make_corrupt_pairs(root, n=100, share=0.05, seed=0):
    """A pairs CSV of `n` pairs with `share` of them bad in every way of KINDS (the rest decode, among them
    every special mode of GOOD_SPECIAL); returns (csv path, {kind: [image path of each bad pair]})."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    per_kind = max(1, round(n * share))
    slots = rng.permutation(n)
    kind_of = {int(slots[k * per_kind + j]): kind for k, kind in enumerate(KINDS) for j in range(per_kind)}
    special = {int(s): GOOD_SPECIAL[j % len(GOOD_SPECIAL)] for j, s in enumerate(slots[len(kind_of):len(kind_of) + 12])}
    rows, bad = [], collections.defaultdict(list)
    for i in range(n):
        name = f"img/{i:04d}"
        kind, look = kind_of.get(i), special.get(i)
        img = rgb_image((32, 32), seed=i)
        caption = f"picture number {i % 7} of a {['red', 'blue', 'green'][i % 3]} thing"
        if kind == "truncated JPEG":
            name += ".jpg"
            data = encoded(img, "JPEG")[:200]
        elif kind == "zero-byte file":
            name, data = name + ".jpg", b""
        elif kind == "missing file":
            name, data = name + ".jpg", None
        elif kind == "not an image":
            name, data = name + ".png", b"this is a text file with an image extension\n" * 4
        elif kind == "oversized PNG":
            name, data = name + ".png", encoded(rgb_image((300, 300), seed=i), "PNG")
        elif look == "16-bit PNG":
            name, data = name + ".png", encoded(Image.fromarray((np.asarray(img.convert("L"), np.uint16) * 257)), "PNG")
        elif look == "CMYK JPEG":
            name, data = name + ".jpg", encoded(img.convert("CMYK"), "JPEG")
        elif look == "palette PNG":
            name, data = name + ".png", encoded(img.convert("P"), "PNG")
        elif look in ("LA PNG", "RGBA PNG"):
            name, data = name + ".png", encoded(img.convert(look.split()[0]), "PNG")
        elif look == "large JPEG":  # decodes at 1/2 scale under MAX_PIXELS
            name, data = name + ".jpg", encoded(rgb_image((400, 400), seed=i), "JPEG")
        else:
            name, data = name + ".jpg", encoded(img, "JPEG")
        if kind == "empty caption":
            caption = "   "
        if data is not None:
            with open(os.path.join(root, name), "wb") as f:
                f.write(data)
        if kind:
            bad[kind].append(name)
        rows.append((caption, name))
    path = os.path.join(root, "pairs.csv")
    with open(path, "w", encoding="utf-8") as f:
        f.write("text,image_path\n" + "".join(f"{c},{p}\n" for c, p in rows))
    return path, dict(bad)


def corrupt_run(root, tokenizer, epochs=2):
    """Train image_text_itc over the corrupt pairs; returns (listed rows, log.jsonl data rows, bad, stdout)."""
    pairs, bad = make_corrupt_pairs(os.path.join(root, "data"))
    out = os.path.join(root, "run")
    argv = ["--exp_name", "image_text_itc", "--model", "vlmo_tiny_patch16", "--data_path", pairs, "--tokenizer",
            str(tokenizer), "--batch_size", "4", "--epochs", str(epochs), "--warmup_epochs", "0", "--num_workers", "1",
            "--device", "cpu", "--output_dir", out, "--max_image_pixels", str(MAX_PIXELS), "--log_freq", "50"]
    assert main_pretrain_cook.main(argv) == 0
    rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(out, "bad_samples_rank0.tsv"))]
    data_rows = [json.loads(x) for x in open(os.path.join(out, "log.jsonl")) if '"split": "data"' in x]
    return rows, data_rows, bad, open(os.path.join(out, "console.log")).read()


def test_a_run_over_corrupt_pairs_completes_and_lists_every_bad_file_once(demo_data, tmp_path):
    rows, data_rows, bad, console = corrupt_run(str(tmp_path), demo_data["tokenizer"])
    listed = [r[1] for r in rows]
    assert len(listed) == len(set(listed))  # one row per bad file
    assert set(listed) == {p for paths in bad.values() for p in paths}  # every bad file, nothing good
    reasons = {r[1]: r[2] for r in rows}
    assert all(reasons[p] == "empty caption" for p in bad["empty caption"])
    assert all(reasons[p] == "missing file" for p in bad["missing file"])
    assert all("over --max_image_pixels" in reasons[p] for p in bad["oversized PNG"])
    first, second = data_rows
    assert first["bad_files_new"] == 30 and second["bad_files_new"] == 0
    assert first["bad_samples_epoch"] >= 30 and second["bad_samples_epoch"] >= 30
    assert second["bad_samples_total"] == first["bad_samples_epoch"] + second["bad_samples_epoch"]
    assert f"epoch 2: {second['bad_samples_epoch']} sample(s) replaced on all ranks" in console


def main():
    import tempfile

    from custom_datasets.demo_data import make_demo_data
    from tests.conftest import DEMO_TEST_SIZES

    with tempfile.TemporaryDirectory() as tmp:
        d = make_demo_data(os.path.join(tmp, "demo"), **DEMO_TEST_SIZES)
        rows, data_rows, bad, _ = corrupt_run(tmp, d["tokenizer"])
    listed = collections.Counter(r[1] for r in rows)
    print("| kind | bad files | listed (rows) | reason |\n|---|---|---|---|")
    for kind, paths in bad.items():
        reasons = sorted({r[2].split(":")[0] for r in rows if r[1] in paths})
        print(f"| {kind} | {len(paths)} | {sum(listed[p] for p in paths)} | {'; '.join(reasons)} |")
    for row in data_rows:
        print(f"epoch {row['epoch']}: {row['bad_samples_epoch']} replaced, {row['bad_files_new']} new files, "
              f"total {row['bad_samples_total']}")


if __name__ == "__main__":
    main()
