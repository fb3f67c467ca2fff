"""BERT-style WordPiece tokenizer built on HF `tokenizers`, plus training and (de)serialisation.

The vocabulary is the only learned part; the rest of the pipeline is rebuilt here from it, a casing
flag and an accent flag, so every source (vocab.txt, tokenizer.json, checkpoint state) tokenizes as
Hugging Face's BertTokenizerFast does for the same files: BertNormalizer (clean text, spaces around CJK
characters so Chinese splits per character, lowercasing, accent stripping), BertPreTokenizer, WordPiece
with "##" continuation and [UNK], and a post-processor producing [CLS] ... [SEP].

Accents follow the source, as in HF: tokenizer_config.json's `strip_accents` when the folder has one (HF
rebuilds the normalizer from it), else tokenizer.json's normalizer, else HF's rule (stripped when
lowercasing; a bare vocab.txt such as bert-base-uncased's turns "café" into "cafe"). Vocabularies this project trains KEEP accents (Vietnamese and French captions
survive lowercasing) and write `"strip_accents": false` into both files. Checkpoint states written before
the flag existed kept accents, and still do.
"""
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from util.errors import UserError

SPECIAL_ROLES = ("pad", "unk", "cls", "sep", "mask")
DEFAULT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
STATE_FORMAT = "wordpiece-v1"
_HOW_TO_GET = ("run `python scripts/train_tokenizer.py --captions FILE --out DIR` "
               "or copy bert-base-uncased's vocab.txt there")


PAD_MULTIPLE = 8  # text batches are padded to a multiple of 8 tokens: a few shapes instead of one per caption length


def pad_batch(encoded, pad_id, max_len):
    """Token id lists -> (ids LongTensor[B, L], mask LongTensor[B, L]) padded with `pad_id` to L = the longest
    rounded up to a multiple of PAD_MULTIPLE, at most max_len (the attention kernels, and a compiler, then see a
    handful of sequence lengths rather than a new one almost every step; the padding is masked out)."""
    longest = max((len(e) for e in encoded), default=0)
    width = min(max(longest, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE), max(max_len, longest))
    ids = np.full((len(encoded), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    for row, e in enumerate(encoded):
        ids[row, :len(e)] = e
        mask[row, :len(e)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


class WordPieceTokenizer:
    """Tokenizes captions into padded id tensors.

    Attributes: vocab_size, pad_id, cls_id, sep_id, mask_id, unk_id, special_ids (frozenset),
    max_len (includes [CLS] and [SEP]), do_lower_case, strip_accents, tokens (list: id -> token string).
    """

    def __init__(self, tokens, do_lower_case=True, max_len=196, special_tokens=None, strip_accents=False):
        self.tokens = list(tokens)
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = bool(strip_accents)
        self.max_len = int(max_len)
        if self.max_len < 2:
            raise UserError(f"tokenizer max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
        self.special_tokens = {**DEFAULT_SPECIALS, **(special_tokens or {})}
        vocab = {}
        for i, tok in enumerate(self.tokens):
            vocab.setdefault(tok, i)  # a duplicated line keeps its first id; ids stay positional
        missing = [t for t in self.special_tokens.values() if t not in vocab]
        if missing:
            raise UserError(f"tokenizer vocabulary lacks special token(s) {missing}; "
                            f"a BERT-style vocab needs {sorted(self.special_tokens.values())}")
        self.vocab_size = len(self.tokens)
        for role in SPECIAL_ROLES:
            setattr(self, f"{role}_id", vocab[self.special_tokens[role]])
        self.special_ids = frozenset(getattr(self, f"{r}_id") for r in SPECIAL_ROLES)
        self._tok = self._build(vocab)

    def _build(self, vocab):
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=self.special_tokens["unk"],
                                         continuing_subword_prefix="##"))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=self.strip_accents,
            lowercase=self.do_lower_case)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        cls, sep = self.special_tokens["cls"], self.special_tokens["sep"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, self.cls_id), (sep, self.sep_id)])
        tok.decoder = decoders.WordPiece(prefix="##")
        # Registered so decode(skip_special_tokens) drops them; they already have vocab ids.
        tok.add_special_tokens([self.special_tokens[r] for r in SPECIAL_ROLES])
        # Truncation counts the [CLS]/[SEP] the post-processor adds.
        tok.enable_truncation(max_length=self.max_len)
        return tok

    def tokenize(self, text):
        """Word pieces of one text, without [CLS]/[SEP] (for inspection)."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode_batch(self, texts):
        """texts: list[str] -> (input_ids LongTensor[B, L], attention_mask LongTensor[B, L]).

        L is the longest encoding in the batch rounded up to a multiple of PAD_MULTIPLE (<= max_len); 1 marks a
        real token.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, got one string")
        # One text at a time: the rayon thread pool of the batch call fights data-loader workers
        # for cores and warns after fork, and captions are short enough that it does not pay.
        return pad_batch([self._tok.encode(t).ids for t in texts], self.pad_id, self.max_len)

    def decode(self, ids, skip_special_tokens=True):
        """ids: sequence or 1-D tensor of token ids -> text (special tokens and padding dropped)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_state(self):
        """Plain dict (str/int/bool/list only) so it can live in a weights_only checkpoint."""
        return {
            "format": STATE_FORMAT,
            "vocab": "\n".join(self.tokens),
            "do_lower_case": self.do_lower_case,
            "strip_accents": self.strip_accents,
            "max_len": self.max_len,
            "special_tokens": [self.special_tokens[r] for r in SPECIAL_ROLES],
        }

    def save(self, out_dir):
        """Write vocab.txt, tokenizer_config.json and tokenizer.json into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "vocab.txt", "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(t + "\n" for t in self.tokens))
        config = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.do_lower_case,
                  "strip_accents": self.strip_accents, "tokenize_chinese_chars": True,
                  "model_max_length": self.max_len}
        config.update({f"{r}_token": self.special_tokens[r] for r in SPECIAL_ROLES})
        with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        self._tok.save(str(out / "tokenizer.json"))
        return out

    # Pickle through the plain state: it is small, version-independent and safe for spawn workers.
    def __getstate__(self):
        return self.to_state()

    def __setstate__(self, state):
        self.__init__(**_init_kwargs_from_state(state))

    def __repr__(self):
        return (f"WordPieceTokenizer(vocab_size={self.vocab_size}, do_lower_case={self.do_lower_case},"
                f" strip_accents={self.strip_accents}, max_len={self.max_len})")


def _init_kwargs_from_state(state):
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"checkpoint tokenizer state is not in format {STATE_FORMAT!r}; "
                        "was it written by this codebase?")
    return {"tokens": state["vocab"].split("\n"), "do_lower_case": state["do_lower_case"],
            "max_len": state["max_len"], "strip_accents": state.get("strip_accents", False),
            "special_tokens": dict(zip(SPECIAL_ROLES, state["special_tokens"]))}


def tokenizer_from_state(state):
    """Inverse of WordPieceTokenizer.to_state()."""
    return WordPieceTokenizer(**_init_kwargs_from_state(state))


def _read_vocab_txt(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    tokens = text.split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()  # trailing newline, not an empty token
    # Windows line endings would otherwise glue "\r" onto every token.
    return [t[:-1] if t.endswith("\r") else t for t in tokens]


def _read_tokenizer_json(path):
    """WordPiece vocab (list by id) and the file's own BertNormalizer flags {"lowercase", "strip_accents"}
    (a flag the file does not set is None)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    model = data.get("model") if isinstance(data, dict) else None
    model = model if isinstance(model, dict) else {}
    if model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{path}: only WordPiece tokenizer.json files are supported "
                        f"(found model type {model.get('type')!r})")
    vocab = model["vocab"]
    if not vocab:
        return [], {}
    tokens = [None] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        if "\n" in tok:
            raise UserError(f"{path}: vocabulary token {tok!r} contains a newline")
        tokens[i] = tok
    # Holes in the id range get unique filler tokens so ids stay positional.
    tokens = [t if t is not None else f"[unused_hole_{i}]" for i, t in enumerate(tokens)]
    norm = data.get("normalizer") or {}
    flags = {k: norm.get(k) for k in ("lowercase", "strip_accents")} if norm.get("type") == "BertNormalizer" else {}
    return tokens, flags


def _read_config(folder):
    cfg_path = Path(folder) / "tokenizer_config.json"
    if not cfg_path.is_file():
        return {}
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    return cfg if isinstance(cfg, dict) else {}


def _special_tokens_from_config(cfg):
    out = {}
    for role in SPECIAL_ROLES:
        value = cfg.get(f"{role}_token")
        if isinstance(value, dict):  # newer HF configs store AddedToken dicts
            value = value.get("content")
        if isinstance(value, str) and value:
            out[role] = value
    return out


def load_tokenizer(path, do_lower_case=None, max_len=196):
    """Load a WordPiece tokenizer from vocab.txt, tokenizer.json, a folder holding either, or a Hugging Face
    hub name (`bert-base-uncased`, `org/name`) found in the local HF cache (custom_datasets.hf_cache).

    A folder prefers tokenizer.json over vocab.txt. As in Hugging Face's BertTokenizerFast: with a
    tokenizer_config.json, its do_lower_case (default True) and strip_accents decide; without one,
    tokenizer.json's normalizer flags do. The explicit `do_lower_case` argument wins over both, and accents
    not set anywhere are stripped when lowercasing (HF's rule, and what it does for a bare vocab.txt).
    """
    from custom_datasets.hf_cache import is_hub_name, snapshot_folder

    p = Path(os.path.expanduser(str(path)))
    if not p.exists() and is_hub_name(str(path)):
        p = snapshot_folder(str(path))
    if p.is_dir():
        folder = p
        candidates = [p / "tokenizer.json", p / "vocab.txt"]
        file = next((c for c in candidates if c.is_file()), None)
        if file is None:
            raise UserError(f"tokenizer folder {p} has no tokenizer.json or vocab.txt; {_HOW_TO_GET}")
    elif p.is_file():
        folder, file = p.parent, p
    else:
        raise UserError(f"tokenizer not found: {p}; {_HOW_TO_GET}")

    json_flags = {}
    if file.suffix == ".json":
        tokens, json_flags = _read_tokenizer_json(file)
    else:
        tokens = _read_vocab_txt(file)
    if not tokens:
        raise UserError(f"tokenizer vocabulary {file} is empty; {_HOW_TO_GET}")
    cfg = _read_config(folder)
    # As BertTokenizerFast.from_pretrained: a tokenizer_config.json decides (its missing keys take HF's
    # defaults) and the normalizer is rebuilt from it; only without one do tokenizer.json's own flags count.
    flags = {"lowercase": cfg.get("do_lower_case", True), "strip_accents": cfg.get("strip_accents")} if cfg \
        else json_flags
    if do_lower_case is None:
        do_lower_case = flags.get("lowercase")
    if do_lower_case is None:
        do_lower_case = True
    strip_accents = flags.get("strip_accents")
    if strip_accents is None:
        strip_accents = do_lower_case
    return WordPieceTokenizer(tokens, do_lower_case=do_lower_case, max_len=max_len,
                              special_tokens=_special_tokens_from_config(cfg), strip_accents=strip_accents)


class _CountingTexts:
    """Passes texts through to the trainer while counting their words, until there are more
    distinct words than `budget` (then a whole-word vocabulary is impossible and counting stops)."""

    def __init__(self, texts, normalizer, pre_tokenizer, budget):
        self.texts, self.normalizer, self.pre_tokenizer = texts, normalizer, pre_tokenizer
        self.budget = budget
        self.counts = Counter()
        self.alphabet = set()

    @property
    def closed(self):
        """True if every word seen fits in the budget alongside its alphabet."""
        return self.counts is not None and len(self.counts) + 2 * len(self.alphabet) <= self.budget

    def __iter__(self):
        for text in self.texts:
            if self.counts is not None:
                words = [w for w, _ in self.pre_tokenizer.pre_tokenize_str(self.normalizer.normalize_str(text))]
                self.counts.update(words)
                self.alphabet.update(*words)
                if not self.closed:
                    self.counts = None
            yield text


def train_wordpiece(texts_iterable, out_dir, vocab_size=30522, lowercase=True, max_len=196,
                    min_frequency=2):
    """Train a WordPiece vocab on texts (an iterable of str), save it to out_dir, return the tokenizer.

    Special tokens come first in BERT's order ([PAD]=0, [UNK], [CLS], [SEP], [MASK]); normalisation
    is the one WordPieceTokenizer applies (CJK split per character, accents kept).

    HF's WordPieceTrainer breaks frequency ties in hash-map order, which differs from run to run.
    Two measures make results reproducible: when every distinct word plus its alphabet (each
    character with and without "##") fits in vocab_size, the vocabulary is exactly those (what
    merging converges to, without the intermediate pieces); otherwise the learned pieces are
    ordered canonically, so equal piece sets get equal ids (on large corpora, ties at the size
    cutoff can still swap a few rare pieces between runs).
    """
    specials = [DEFAULT_SPECIALS[r] for r in SPECIAL_ROLES]
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    model = Tokenizer(models.WordPiece(unk_token=DEFAULT_SPECIALS["unk"], continuing_subword_prefix="##"))
    model.normalizer, model.pre_tokenizer = normalizer, pre_tokenizer
    trainer = trainers.WordPieceTrainer(
        vocab_size=int(vocab_size), min_frequency=min_frequency, show_progress=False,
        special_tokens=specials, continuing_subword_prefix="##")
    counted = _CountingTexts(texts_iterable, normalizer, pre_tokenizer, int(vocab_size) - len(specials))
    model.train_from_iterator(counted, trainer=trainer)
    if counted.closed:
        if not counted.counts:
            raise UserError("tokenizer training saw no text; is the captions file empty?")
        chars = sorted(counted.alphabet)
        words = sorted(counted.counts, key=lambda w: (-counted.counts[w], w))
        pieces = chars + ["##" + c for c in chars] + [w for w in words if len(w) > 1]
    else:
        pieces = sorted(t for t in model.get_vocab() if t not in specials)
    tokenizer = WordPieceTokenizer(specials + pieces, do_lower_case=lowercase, max_len=max_len)
    tokenizer.save(out_dir)
    return tokenizer
