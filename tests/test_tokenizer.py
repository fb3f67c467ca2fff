import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from custom_datasets.tokenizer import WordPieceTokenizer, load_tokenizer, tokenizer_from_state, train_wordpiece
from util.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_tokenizer  # noqa: E402

WORDS = ["a", "red", "circle", "Red", "Circle", "hà", "nội", "Hà", "Nội", "ha", "noi", "我", "爱", "北", "京",
         ",", ".", "the", "##s", "square"]


def bert_like_vocab():
    """Specials where bert-base-uncased and chinese-roberta-wwm-ext have them ([UNK] at 100)."""
    return ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def write_vocab(folder, tokens, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def pieces(tok, text):
    ids, mask = tok.encode_batch([text])
    return [tok.tokens[i] for i in ids[0][mask[0] == 1].tolist()]


def test_special_ids_match_bert_layout(tmp_path):
    tok = load_tokenizer(write_vocab(tmp_path / "bert", bert_like_vocab()) / "vocab.txt")
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.special_ids == frozenset({0, 100, 101, 102, 103})
    assert tok.vocab_size == len(bert_like_vocab())
    assert pieces(tok, "a red circle") == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert pieces(tok, "a red squares zzz") == ["[CLS]", "a", "red", "square", "##s", "[UNK]", "[SEP]"]


def test_vocab_txt_tokenizer_json_and_folder_agree(tmp_path):
    folder = write_vocab(tmp_path / "tok", bert_like_vocab())
    WordPieceTokenizer(bert_like_vocab()).save(tmp_path / "saved")
    texts = ["a red circle.", "the red squares, a circle", "我爱北京"]
    ref = load_tokenizer(folder).encode_batch(texts)
    for source in (folder / "vocab.txt", tmp_path / "saved", tmp_path / "saved" / "tokenizer.json",
                   tmp_path / "saved" / "vocab.txt"):
        got = load_tokenizer(source).encode_batch(texts)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), source


def test_folder_prefers_tokenizer_json(tmp_path):
    folder = tmp_path / "both"
    WordPieceTokenizer(bert_like_vocab()).save(folder)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", encoding="utf-8")
    assert load_tokenizer(folder).vocab_size == len(bert_like_vocab())


def test_foreign_tokenizer_json_keeps_ids_and_casing(tmp_path):
    """A tokenizer.json written by HF tokenizers itself, as users download them."""
    vocab = {t: i for i, t in enumerate(bert_like_vocab())}
    hf = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    hf.normalizer = normalizers.BertNormalizer(lowercase=False)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert tok.unk_id == 100 and tok.do_lower_case is False
    assert pieces(tok, "Red Circle") == ["[CLS]", "Red", "Circle", "[SEP]"]


def test_casing_from_config_and_flag(tmp_path):
    cased = write_vocab(tmp_path / "cased", bert_like_vocab(), {"do_lower_case": False})
    uncased = write_vocab(tmp_path / "uncased", bert_like_vocab(), {"do_lower_case": True})
    bare = write_vocab(tmp_path / "bare", bert_like_vocab())
    assert pieces(load_tokenizer(cased), "Red Circle")[1:3] == ["Red", "Circle"]
    assert pieces(load_tokenizer(uncased), "Red Circle")[1:3] == ["red", "circle"]
    assert load_tokenizer(bare).do_lower_case is True
    # The explicit argument wins over the config, in both directions.
    assert pieces(load_tokenizer(cased, do_lower_case=True), "Red Circle")[1:3] == ["red", "circle"]
    assert pieces(load_tokenizer(uncased, do_lower_case=False), "Red Circle")[1:3] == ["Red", "Circle"]


def test_accents_follow_the_source_and_default_to_hfs_rule(tmp_path):
    bare = load_tokenizer(write_vocab(tmp_path / "bare", bert_like_vocab()), do_lower_case=True)
    assert bare.strip_accents and pieces(bare, "Hà Nội")[1:-1] == ["ha", "noi"]  # as BertTokenizer: stripped
    kept = load_tokenizer(write_vocab(tmp_path / "kept", bert_like_vocab(), {"strip_accents": False}))
    assert not kept.strip_accents and pieces(kept, "Hà Nội")[1:-1] == ["hà", "nội"]
    ids, _ = kept.encode_batch(["Hà Nội"])
    assert kept.decode(ids[0]) == "hà nội"
    cased = load_tokenizer(write_vocab(tmp_path / "cased", bert_like_vocab(), {"do_lower_case": False}))
    assert not cased.strip_accents and pieces(cased, "Hà Nội")[1:-1] == ["Hà", "Nội"]
    kept.save(tmp_path / "saved")  # what this project writes says so, in both files
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["strip_accents"] is False
    assert not load_tokenizer(tmp_path / "saved" / "tokenizer.json").strip_accents
    old_state = {k: v for k, v in kept.to_state().items() if k != "strip_accents"}  # saved before the flag
    assert pieces(tokenizer_from_state(old_state), "Hà Nội")[1:-1] == ["hà", "nội"]
    assert tokenizer_from_state(bare.to_state()).strip_accents


def test_chinese_split_per_character(tmp_path):
    tok = load_tokenizer(write_vocab(tmp_path / "v", bert_like_vocab()))
    assert pieces(tok, "我爱北京")[1:-1] == ["我", "爱", "北", "京"]
    assert pieces(tok, "a我red")[1:-1] == ["a", "我", "red"]


def test_truncation_and_padding(tmp_path):
    tok = load_tokenizer(write_vocab(tmp_path / "v", bert_like_vocab()), max_len=5)
    ids, mask = tok.encode_batch(["a red circle the square red", "a"])
    assert ids.shape == (2, 5) and ids.dtype == torch.long and mask.dtype == torch.long
    assert ids[0].tolist() == [tok.cls_id] + [tok.tokens.index(w) for w in ("a", "red", "circle")] + [tok.sep_id]
    assert ids[1].tolist() == [tok.cls_id, tok.tokens.index("a"), tok.sep_id, tok.pad_id, tok.pad_id]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def _plain(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, (str, int, bool, float))


def test_state_round_trip_through_weights_only_checkpoint(tmp_path):
    tok = load_tokenizer(write_vocab(tmp_path / "v", bert_like_vocab(), {"do_lower_case": False}), max_len=12)
    state = tok.to_state()
    assert _plain(state)
    torch.save({"tokenizer": state}, tmp_path / "ckpt.pth")
    restored = tokenizer_from_state(torch.load(tmp_path / "ckpt.pth", weights_only=True)["tokenizer"])
    texts = ["Red Circle hà nội 我爱", "a red squares of the circle again and again and again"]
    for a, b in zip(tok.encode_batch(texts), restored.encode_batch(texts)):
        assert torch.equal(a, b)
    assert (restored.do_lower_case, restored.max_len, restored.tokens) == (False, 12, tok.tokens)


def test_pickle_round_trip(tiny_tokenizer):
    clone = pickle.loads(pickle.dumps(tiny_tokenizer))
    text = ["a small red circle above a large blue square."]
    assert torch.equal(clone.encode_batch(text)[0], tiny_tokenizer.encode_batch(text)[0])


def test_missing_tokenizer_is_user_error(tmp_path):
    with pytest.raises(UserError, match="nope") as err:
        load_tokenizer(tmp_path / "nope")
    assert "train_tokenizer.py" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty.*no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path / "empty")
    write_vocab(tmp_path / "nospecial", ["a", "b"])
    with pytest.raises(UserError, match=r"\[CLS\]"):
        load_tokenizer(tmp_path / "nospecial")


def test_train_wordpiece_with_merges(tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog", "Hà Nội có nhiều hồ", "我爱北京天安门"] * 20
    tok = train_wordpiece(iter(texts), tmp_path / "tok", vocab_size=70, min_frequency=1)
    assert tok.tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.vocab_size <= 70
    assert any(len(t.removeprefix("##")) > 1 for t in tok.tokens[5:]), "expected learned merges"
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.tokens == tok.tokens
    assert "北" in tok.tokens and "[UNK]" not in pieces(loaded, "Hà Nội 北京")
    assert torch.equal(loaded.encode_batch(texts)[0], tok.encode_batch(texts)[0])


def test_train_wordpiece_closed_vocabulary_is_whole_words(tmp_path):
    texts = ["a red circle", "A blue square", "the red square"]
    tok = train_wordpiece(texts, tmp_path / "tok", vocab_size=100)
    assert pieces(tok, "The blue circle")[1:-1] == ["the", "blue", "circle"]
    again = train_wordpiece(texts, tmp_path / "tok2", vocab_size=100)
    assert again.tokens == tok.tokens


def test_train_tokenizer_script(tmp_path, capsys):
    captions = tmp_path / "caps.jsonl"
    captions.write_text("".join(json.dumps({"caption": c}) + "\n" for c in ["Red Circle", "Blue square"] * 5),
                        encoding="utf-8")
    assert train_tokenizer.main(["--captions", str(captions), "--out", str(tmp_path / "out"),
                                 "--vocab_size", "200", "--no_lower_case"]) == 0
    tok = load_tokenizer(tmp_path / "out")
    assert tok.do_lower_case is False and pieces(tok, "Red Circle")[1:-1] == ["Red", "Circle"]
    assert train_tokenizer.main(["--captions", str(tmp_path / "missing.json")]) == 2
    assert "--captions: file not found" in capsys.readouterr().err
