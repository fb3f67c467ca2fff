"""Train a BERT-style WordPiece vocabulary on a captions file.

    python scripts/train_tokenizer.py --captions FILE [--vocab_size 30522] [--out DIR] [--no_lower_case]

FILE is any format CaptionDataset reads (JSON list of {"caption": ...}, JSONL, or one caption per
line). DIR receives vocab.txt, tokenizer_config.json and tokenizer.json; pass it to training as the
tokenizer path.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom_datasets.text_dataset import CaptionDataset  # noqa: E402
from custom_datasets.tokenizer import train_wordpiece  # noqa: E402
from util.errors import UserError  # noqa: E402


def build_parser():
    parser = argparse.ArgumentParser(description="Train a WordPiece tokenizer on captions.")
    parser.add_argument("--captions", required=True, help="captions file (.json list, .jsonl or .txt)")
    parser.add_argument("--vocab_size", type=int, default=30522, help="vocabulary size incl. special tokens")
    parser.add_argument("--out", default="tokenizer", help="output folder (default: ./tokenizer)")
    parser.add_argument("--no_lower_case", action="store_true", help="keep case (default: lowercase)")
    parser.add_argument("--min_frequency", type=int, default=2, help="least count of a merged pair")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.vocab_size < 16:
            raise UserError(f"--vocab_size must be at least 16, got {args.vocab_size}")
        t0 = time.perf_counter()
        captions = CaptionDataset(args.captions, flag="--captions")
        tokenizer = train_wordpiece(captions.iter_captions(), args.out, vocab_size=args.vocab_size,
                                    lowercase=not args.no_lower_case, min_frequency=args.min_frequency)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trained on {len(captions)} captions in {time.perf_counter() - t0:.1f}s: "
          f"{tokenizer.vocab_size} tokens, lower_case={tokenizer.do_lower_case} -> {Path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
