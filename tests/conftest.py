"""Shared pytest setup: thread limits for the 2-core CI box and a small generated demo dataset."""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # lets plain `pytest` (not only `python -m pytest`) import the repo
    sys.path.insert(0, str(REPO_ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# Small enough to generate in about a second, big enough for a few batches of every kind.
DEMO_TEST_SIZES = dict(num_train_captions=256, num_val_captions=32, images_per_class_train=4,
                       images_per_class_val=2, num_train_pairs=48, num_val_pairs=16, img_size=32, seed=0)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """dict of pathlib.Path from make_demo_data (keys: root, captions_train, captions_val, tokenizer,
    images_train, images_val, pairs_train, pairs_val, classnames, templates); generated once per
    session with DEMO_TEST_SIZES. Treat it as read-only."""
    from custom_datasets.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo"), **DEMO_TEST_SIZES)


@pytest.fixture(scope="session")
def tiny_tokenizer(demo_data):
    """WordPieceTokenizer trained on the demo captions (about 100 tokens, max_len 196)."""
    from custom_datasets.tokenizer import load_tokenizer

    return load_tokenizer(demo_data["tokenizer"])
