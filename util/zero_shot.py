"""Zero-shot classification of an image folder against class names, with a trained checkpoint.

    python util/zero_shot.py --checkpoint outputs/itc/checkpoint-latest.pth --images data/val/ \
        [--classnames names.txt] [--templates templates.txt] [--topk 5] [--out predictions.csv|.json]

A folder of class sub-folders (ImageNet-style) is labelled: the sub-folder names (or `--classnames`,
`wnid<TAB>name` lines, mapped onto them) are the classes, and top-1/top-k accuracy is printed. A folder of
images without sub-folders needs `--classnames` (one class per line) and gets predictions only. Each image's
top-k classes (cosine similarity to the mean template embedding of each class) are printed and written to
`--out` (CSV or JSON by its extension).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from inference import add_command_args, image_files, load_contrastive_model, write_results  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402
from util.flag_checks import positive_int  # noqa: E402
from util.retrieval_metrics import read_classnames, read_templates, zero_shot_classifier  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_command_args(p, "images")
    p.add_argument("--images", required=True, help="a folder of class sub-folders, or of images")
    p.add_argument("--classnames", default=None, help="one class per line (or wnid<TAB>name); default: the "
                                                      "sub-folder names")
    p.add_argument("--templates", default=None, help="prompt templates, one per line with {} (default: CLIP's)")
    p.add_argument("--topk", type=positive_int(), default=5, help="classes listed per image (and top-k accuracy)")
    return p.parse_args(argv)


def labelled_images(folder, classnames_path):
    """(image paths, targets or None, class names) of `folder`."""
    if not os.path.isdir(folder):
        raise UserError(f"--images {folder}: not a folder")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if classes:
        paths, targets = [], []
        for k, name in enumerate(classes):
            files = image_files(os.path.join(folder, name))
            paths += files
            targets += [k] * len(files)
        names = read_classnames(classnames_path, wnids=classes) if classnames_path else read_classnames(folder)
        return paths, torch.tensor(targets), names
    if not classnames_path:
        raise UserError(f"--images {folder}: no class sub-folders, so the classes must come from --classnames")
    return image_files(folder), None, read_classnames(classnames_path)


def main(argv=None):
    args = parse_args(argv)
    paths, targets, names = labelled_images(args.images, args.classnames)
    if not paths:
        raise UserError(f"--images {args.images}: no images")
    model = load_contrastive_model(args, "zero-shot")
    weights = zero_shot_classifier(model.encode_token_ids, model.tokenizer, names, read_templates(args.templates),
                                   model.device)
    scores = model.encode_image(paths, progress=True) @ weights.T.to(model.device)
    k = min(args.topk, len(names))
    top = scores.topk(k, dim=1)
    rows = []
    for i, path in enumerate(paths):
        row = {"image": os.path.relpath(path, args.images)}
        if targets is not None:
            row["label"] = names[int(targets[i])]
        for r in range(k):
            row[f"top{r + 1}"] = names[int(top.indices[i, r])]
            row[f"score{r + 1}"] = round(float(top.values[i, r]), 5)
        rows.append(row)
        if not args.quiet:
            print(f"{row['image']}: " + ", ".join(f"{row[f'top{r + 1}']} ({row[f'score{r + 1}']:.3f})"
                                                   for r in range(k)))
    if targets is not None:
        hits = top.indices.cpu() == targets[:, None]
        print(f"accuracy over {len(paths)} images, {len(names)} classes: top-1 {100 * hits[:, 0].float().mean():.2f}%"
              f", top-{k} {100 * hits.any(1).float().mean():.2f}%")
    if args.out:
        write_results(args.out, rows, "predictions")
    return rows


if __name__ == "__main__":
    run_cli(main)
