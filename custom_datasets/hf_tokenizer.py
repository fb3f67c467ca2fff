"""A local Hugging Face tokenizer folder (e.g. chinese-roberta-wwm-ext) behind our tokenizer interface.

`transformers.AutoTokenizer` reads the folder once (offline) and converts it to a fast tokenizer; from
then on the encoding runs on its `tokenizers` backend, whose JSON is kept in the state. So the state
saved with a checkpoint rebuilds the same tokenizer without the folder and without `transformers`, and
data-loader workers unpickle it cheaply.
"""
import os

import torch
from tokenizers import Tokenizer

from custom_datasets.tokenizer import pad_batch
from util.errors import UserError

STATE_KIND = "hf"
_ROLES = ("pad", "unk", "cls", "sep", "mask")


class HFTokenizer:
    """Same interface as custom_datasets.tokenizer.WordPieceTokenizer.

    Attributes: vocab_size (with added tokens), pad_id, cls_id, sep_id, mask_id, unk_id (None where the
    tokenizer has no such token; pad is required), special_ids (frozenset), max_len (includes the special
    tokens), do_lower_case (None if the folder does not say), path.
    """

    def __init__(self, folder, max_len=196):
        folder = str(folder)
        if not os.path.isdir(folder):
            raise UserError(f"--text_tower {folder}: tokenizer folder not found")
        try:
            import transformers
        except ImportError:
            raise UserError("a Hugging Face tokenizer needs the `transformers` package: pip install transformers") \
                from None
        try:
            hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, use_fast=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--text_tower {folder}: cannot load its tokenizer ({first})") from None
        if not getattr(hf, "is_fast", False):
            raise UserError(f"--text_tower {folder}: only tokenizers with a fast (tokenizers) version are supported")
        self._setup({"kind": STATE_KIND, "path": folder, "max_len": int(max_len),
                     "tokenizer_json": hf.backend_tokenizer.to_str(),
                     "special_ids": {r: getattr(hf, f"{r}_token_id") for r in _ROLES},
                     "do_lower_case": hf.init_kwargs.get("do_lower_case")})

    def _setup(self, state):
        self.path, self.max_len, self.do_lower_case = state["path"], int(state["max_len"]), state["do_lower_case"]
        if self.max_len < 2:
            raise UserError(f"tokenizer max_len must be >= 2 (room for the special tokens), got {self.max_len}")
        self._json = state["tokenizer_json"]
        self._ids = {r: (None if i is None else int(i)) for r, i in state["special_ids"].items()}
        if self._ids.get("pad") is None:
            raise UserError(f"--text_tower {self.path}: the tokenizer defines no padding token")
        for role in _ROLES:
            setattr(self, f"{role}_id", self._ids.get(role))
        self.special_ids = frozenset(i for i in self._ids.values() if i is not None)
        tok = Tokenizer.from_str(self._json)
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_len)  # counts the special tokens the post-processor adds
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts):
        """texts: list[str] -> (input_ids LongTensor[B, L], attention_mask LongTensor[B, L]); L is the longest
        encoding in the batch rounded up to a multiple of 8 (<= max_len), 1 marks a real token."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, got one string")
        # One text at a time, as in WordPieceTokenizer: the batch call's thread pool fights the data workers.
        return pad_batch([self._tok.encode(t).ids for t in texts], self.pad_id, self.max_len)

    def tokenize(self, text):
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids, skip_special_tokens=True):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_state(self):
        """Plain dict (str/int/bool/None/dict) for weights_only checkpoints; rebuilds without the folder."""
        return {"kind": STATE_KIND, "path": self.path, "max_len": self.max_len, "tokenizer_json": self._json,
                "special_ids": dict(self._ids), "do_lower_case": self.do_lower_case}

    @classmethod
    def from_state(cls, state):
        if not isinstance(state, dict) or state.get("kind") != STATE_KIND or "tokenizer_json" not in state:
            raise UserError("checkpoint tokenizer state is not a Hugging Face tokenizer state of this codebase")
        tok = cls.__new__(cls)
        tok._setup(state)
        return tok

    def __getstate__(self):
        return self.to_state()

    def __setstate__(self, state):
        self._setup(state)

    def __repr__(self):
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, max_len={self.max_len})"


def tokenizer_from_any_state(state):
    """A checkpoint's tokenizer state -> our WordPieceTokenizer or an HFTokenizer, by its kind."""
    if isinstance(state, dict) and state.get("kind") == STATE_KIND:
        return HFTokenizer.from_state(state)
    from custom_datasets.tokenizer import tokenizer_from_state

    return tokenizer_from_state(state)


def choose_tokenizer(path, default_path, do_lower_case, max_len, hf_folder=None, inherited=None, inherited_from=None,
                     log=print):
    """A run's tokenizer: the `inherited` state (a resumed checkpoint's, from `inherited_from`), else the Hugging
    Face `hf_folder` of a model's text tower, else the file or folder `path` (--tokenizer; `default_path` when
    None); each choice logged with one line, each failure a UserError naming its flag."""
    from custom_datasets.tokenizer import load_tokenizer

    if inherited:
        log(f"tokenizer: inherited from {inherited_from}")
        try:
            return tokenizer_from_any_state(inherited)
        except UserError as e:
            raise UserError(f"--resume {inherited_from}: its tokenizer: {e}") from None
    if hf_folder:
        if path:
            raise UserError("--tokenizer: a Hugging Face --text_tower uses its own folder's tokenizer; drop --tokenizer")
        tok = HFTokenizer(hf_folder, max_len)
        log(f"tokenizer: {hf_folder} ({tok.vocab_size} tokens, Hugging Face)")
        return tok
    path = path or default_path
    try:
        tok = load_tokenizer(path, do_lower_case=do_lower_case, max_len=max_len)
    except UserError as e:
        raise UserError(f"--tokenizer {path}: {e}") from None
    log(f"tokenizer: {path} ({tok.vocab_size} tokens, lower case {tok.do_lower_case})")
    return tok
