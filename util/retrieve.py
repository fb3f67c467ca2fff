"""Top-k retrieval with a trained checkpoint: texts for each image, and images for each text.

    python util/retrieve.py --checkpoint outputs/itc/checkpoint-latest.pth --images photos/ \
        --texts captions.txt [--topk 5] [--direction both|image2text|text2image] [--out results.json|.csv]

`--images`: a folder (its images, recursively) or image files; `--texts`: a file with one text per line (or
texts given directly with `--text`). Prints the top-k of each query and writes them to `--out`.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_datasets.records import utf8_lines  # noqa: E402
from inference import add_command_args, image_sources, load_contrastive_model, write_results  # noqa: E402
from util.errors import UserError, run_cli  # noqa: E402
from util.flag_checks import positive_int  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_command_args(p, "items")
    p.add_argument("--images", required=True, nargs="+", help="a folder of images, or image files")
    p.add_argument("--texts", default=None, help="a UTF-8 file, one text per line")
    p.add_argument("--text", action="append", default=[], help="a text (repeatable), besides --texts")
    p.add_argument("--topk", type=positive_int(), default=5, help="results per query")
    p.add_argument("--direction", default="both", choices=["both", "image2text", "text2image"],
                   help="which queries to answer")
    return p.parse_args(argv)


def read_texts(args):
    texts = list(args.text)
    if args.texts:
        if not os.path.isfile(args.texts):
            raise UserError(f"--texts {args.texts}: not found")
        texts += [line.strip() for _, line in utf8_lines(args.texts) if line.strip()]
    if not texts:
        raise UserError("give --texts FILE and/or --text 'a caption'")
    return texts


def ranked(query_kind, queries, keys, scores, k):
    """Rows {query_kind, query, rank, result, score} of the top-k keys of each query."""
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    return [{"direction": query_kind, "query": queries[i], "rank": r + 1, "result": keys[int(top.indices[i, r])],
             "score": round(float(top.values[i, r]), 5)} for i in range(len(queries)) for r in range(top.indices.shape[1])]


def main(argv=None):
    args = parse_args(argv)
    texts, images = read_texts(args), [s for path in args.images for s in image_sources(path)]
    model = load_contrastive_model(args, "retrieval")
    scores = model.encode_image(images, progress=True) @ model.encode_text(texts, progress=True).T
    rows = []
    if args.direction in ("both", "image2text"):
        rows += ranked("image2text", images, texts, scores, args.topk)
    if args.direction in ("both", "text2image"):
        rows += ranked("text2image", texts, images, scores.T, args.topk)
    if not args.quiet:
        for row in rows:
            print(f"{row['direction']} | {row['query']} | {row['rank']}. {row['result']} ({row['score']:.3f})")
    if args.out:
        write_results(args.out, rows, "results")
    return rows


if __name__ == "__main__":
    run_cli(main)
