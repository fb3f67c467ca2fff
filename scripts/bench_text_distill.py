"""Cross-lingual distillation end to end on real data (a benchmark, not a test): does a student text tower in a
new language reach the teacher's zero-shot accuracy?

Data: scikit-learn's bundled handwritten digits (1797 real 8x8 scans, offline), written as 64 px PNGs; a fixed
stratified held-out split (30%) as an ImageNet-style folder for zero-shot evaluation. English captions from a few
templates ("a photo of the digit seven", ...). The "new language" is mechanical: every English word maps to a
fixed pseudo-word of random syllables and the word order is reversed ("a photo of the digit seven" ->
"<seven'> <digit'> <the'> <of'> <photo'> <a'>"), with its own WordPiece vocabulary (no word in common).

Steps, all through the real entry points (main_pretrain_cook.main):
  1. the teacher: image_text_itc from random init on the English pairs, zero-shot in English;
  2. the student: text_distill from the teacher on (English caption, translation) pairs of the training images,
     zero-shot with the translated class names and prompt; `--eval_first` gives the student before distillation
     (the teacher's text path with fresh word embeddings) as the baseline.
Prints the teacher's English zero-shot, the student's before and after, and the ratio student / teacher.

  OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_text_distill.py            # about 5 minutes on 2 cores
"""
import argparse
import csv
import json
import os
import random
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}", "a handwritten {}", "the number {}", "a scan of a handwritten {}",
             "a picture of a {}", "the digit {} written by hand"]
PROMPT = "a photo of the digit {}"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SYLLABLES = ["ba", "ko", "ri", "tu", "me", "sa", "ln", "vo", "qe", "zi", "ha", "pu", "do", "xe"]


def make_language(words, seed=0):
    """English word -> a pseudo-word of 2-3 random syllables (distinct)."""
    rng, out = random.Random(seed), {}
    for w in sorted(words):
        while True:
            cand = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))
            if cand not in out.values() and cand not in words:
                out[w] = cand
                break
    return out


def translate(text, lang):
    return " ".join(lang.get(w, w) for w in reversed(text.split()))  # "{}" (a prompt slot) stays


def write_vocab(path, texts):
    words = sorted({w for t in texts for w in t.replace("{}", " ").split()})
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(SPECIALS + words) + "\n")


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def build_files(root, img_size, captions_per_image, seed):
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.3, random_state=0, stratify=d.target)
    rng = random.Random(seed)

    def save(i, folder):
        os.makedirs(folder, exist_ok=True)
        img = Image.fromarray((d.images[i] / 16.0 * 255).astype(np.uint8)).resize((img_size, img_size),
                                                                                  Image.BILINEAR).convert("RGB")
        path = os.path.join(folder, f"{i}.png")
        img.save(path)
        return path

    pairs = []
    for i in tr:
        path = os.path.relpath(save(i, os.path.join(root, "train")), root)
        pairs += [(rng.choice(TEMPLATES).format(NAMES[d.target[i]]), path) for _ in range(captions_per_image)]
    for i in te:
        save(i, os.path.join(root, "heldout", str(d.target[i])))
    english = [t.format(n) for t in TEMPLATES for n in NAMES]
    lang = make_language({w for t in english for w in t.split()}, seed)
    f = {"pairs": write_csv(os.path.join(root, "pairs_en.csv"), ["text", "image_path"], pairs),
         "heldout": os.path.join(root, "heldout"), "vocab_en": os.path.join(root, "vocab_en.txt"),
         "vocab_xx": os.path.join(root, "vocab_xx.txt")}
    write_vocab(f["vocab_en"], english)
    write_vocab(f["vocab_xx"], [translate(t, lang) for t in english])
    held = [(rng.choice(TEMPLATES).format(NAMES[d.target[i]]),) for i in te]
    f["parallel_train"] = write_csv(os.path.join(root, "parallel_train.csv"), ["source", "target"],
                                    [(t, translate(t, lang)) for t, _ in pairs])
    f["parallel_val"] = write_csv(os.path.join(root, "parallel_val.csv"), ["source", "target"],
                                  [(t, translate(t, lang)) for (t,) in held])
    for key, names, prompt in (("en", NAMES, PROMPT), ("xx", [lang[n] for n in NAMES], translate(PROMPT, lang))):
        f[f"classnames_{key}"] = os.path.join(root, f"classnames_{key}.txt")
        f[f"templates_{key}"] = os.path.join(root, f"templates_{key}.txt")
        open(f[f"classnames_{key}"], "w", encoding="utf-8").write("".join(f"{c}\t{n}\n" for c, n in enumerate(names)))
        open(f[f"templates_{key}"], "w", encoding="utf-8").write(prompt + "\n")
    return f


def val_rows(out):
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as fh:
        return [r for r in map(json.loads, fh) if r.get("split") == "val"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None, help="where the files and runs go (default: a temporary folder)")
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--teacher_epochs", type=int, default=12)
    p.add_argument("--student_epochs", type=int, default=6)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--distill_loss", default="both", choices=("mse", "contrastive", "both"))
    p.add_argument("--lora_rank", type=int, default=4, help="student: text-only LoRA on the frozen shared attention")
    p.add_argument("--model_kwargs", default='{"embed_dim": 64, "depth": 2, "num_heads": 2}')
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import main_pretrain_cook

    root = a.workdir or tempfile.mkdtemp(prefix="bench_distill_")
    f = build_files(root, a.img_size, 2, a.seed)
    common = ["--model", "vlmo_tiny_patch16", "--model_kwargs", a.model_kwargs, "--img_size", str(a.img_size),
              "--batch_size", str(a.batch_size), "--lr", "1e-3", "--warmup_epochs", "1", "--drop_path", "0",
              "--num_workers", "2", "--log_freq", "50", "--seed", str(a.seed), "--zeroshot_data_path", f["heldout"]]
    teacher = os.path.join(root, "teacher")
    main_pretrain_cook.main(["--mode", "image_text_itc", "--data_path", f["pairs"], "--tokenizer", f["vocab_en"],
                             "--zeroshot_classnames", f["classnames_en"], "--zeroshot_templates", f["templates_en"],
                             "--epochs", str(a.teacher_epochs), "--output_dir", teacher, *common])
    student = os.path.join(root, "student")
    main_pretrain_cook.main(["--mode", "text_distill", "--distill_teacher",
                             os.path.join(teacher, "checkpoint-latest.pth"), "--tokenizer", f["vocab_xx"],
                             "--data_path", f["parallel_train"], "--val_data_path", f["parallel_val"],
                             "--distill_loss", a.distill_loss, "--lora_rank", str(a.lora_rank), "--eval_first",
                             "--zeroshot_classnames", f["classnames_xx"], "--zeroshot_templates", f["templates_xx"],
                             "--epochs", str(a.student_epochs), "--output_dir", student, *common])
    t, s = val_rows(teacher)[-1], val_rows(student)
    steps = {n: json.load(open(os.path.join(n, "args.json")))["steps_per_epoch"] for n in (teacher, student)}
    print(f"data: sklearn digits, {a.img_size} px, {sum(1 for _ in open(f['pairs'])) - 1} English pairs of 1257 "
          f"training images, 540 held-out images; batch {a.batch_size}")
    print(f"teacher: image_text_itc {a.teacher_epochs} epochs x {steps[teacher]} steps; zero-shot top-1 (English) "
          f"{t['zeroshot_top1']:.2f}")
    print(f"student: text_distill ({a.distill_loss}, LoRA {a.lora_rank}) {a.student_epochs} epochs x "
          f"{steps[student]} steps; zero-shot top-1 (new language) before {s[0]['zeroshot_top1']:.2f}, after "
          f"{s[-1]['zeroshot_top1']:.2f}; held-out student->teacher R@1 {s[-1]['distill_r1']:.3f}")
    print(f"ratio student / teacher zero-shot: {s[-1]['zeroshot_top1'] / max(t['zeroshot_top1'], 1e-9):.3f}")
    print(f"files and runs in {root}")


if __name__ == "__main__":
    main()
