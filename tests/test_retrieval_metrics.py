"""Retrieval recall on hand-made similarity matrices; zero-shot helpers on a tiny hand-made case."""
import pytest
import torch
import torch.nn.functional as F

from util.errors import UserError
from util.retrieval_metrics import (DEFAULT_TEMPLATES, read_classnames, read_templates,
                                    retrieval_recall, zero_shot_accuracy, zero_shot_classifier)


def test_recall_on_hand_made_matrix():
    # 3 images, 5 texts: texts 0,1 describe image 0, text 2 image 1, texts 3,4 image 2
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3],     # image 0: text 0 first        -> r1
                        [0.5, 0.4, 0.3, 0.9, 0.2],     # image 1: its text 2 is 4th    -> r5
                        [0.2, 0.95, 0.1, 0.3, 0.6]])   # image 2: its text 4 is 2nd    -> r2
    txt_to_img = torch.tensor([0, 0, 1, 2, 2])
    r = retrieval_recall(sim, txt_to_img, ks=(1, 2, 5))
    assert r["i2t_r1"] == pytest.approx(100 / 3)
    assert r["i2t_r2"] == pytest.approx(200 / 3)
    assert r["i2t_r5"] == pytest.approx(100.0)
    # text queries: ranks of the right image are 1, 3, 2, 2, 1
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r5"]) == pytest.approx((40.0, 80.0, 100.0))
    assert r["r_mean"] == pytest.approx((100 / 3 + 200 / 3 + 100 + 40 + 80 + 100) / 6)


def test_recall_matches_rank_counting_and_skips_images_without_text():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(7, 12, generator=g)
    txt_to_img = torch.randint(0, 6, (12,), generator=g)  # image 6 never has a text
    txt_to_img[:6] = torch.arange(6)
    r = retrieval_recall(sim, txt_to_img, ks=(1, 3, 10))
    for k in (1, 3, 10):
        i2t = [min(int((sim[i] > sim[i, t]).sum()) for t in range(12) if txt_to_img[t] == i) < k
               for i in range(6)]
        t2i = [int((sim[:, t] > sim[txt_to_img[t], t]).sum()) < k for t in range(12)]
        assert r[f"i2t_r{k}"] == pytest.approx(100 * sum(i2t) / 6)
        assert r[f"t2i_r{k}"] == pytest.approx(100 * sum(t2i) / 12)


class WordTokenizer:
    """encode_batch over a fixed word list (unknown words -> 1), padded with 0."""

    def __init__(self, words):
        self.vocab = {w: i + 2 for i, w in enumerate(words)}

    def encode_batch(self, texts):
        rows = [[self.vocab.get(w.strip("."), 1) for w in t.split()] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return ids, (ids > 0).long()


def test_zero_shot_classifier_and_accuracy():
    tok = WordTokenizer(["cat", "dog", "bird", "a", "photo", "of", "drawing"])
    emb = torch.randn(len(tok.vocab) + 2, 4, generator=torch.Generator().manual_seed(1))

    def encode_text(ids, mask):  # mean of word vectors: a stand-in text tower
        return (emb[ids] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    classes, templates = ["cat", "dog", "bird"], ["a photo of a {}.", "a drawing of a {}."]
    weights = zero_shot_classifier(encode_text, tok, classes, templates)
    assert weights.shape == (3, 4)
    torch.testing.assert_close(weights.norm(dim=1), torch.ones(3))
    ids, mask = tok.encode_batch([t.format("dog") for t in templates])
    expected = F.normalize(F.normalize(encode_text(ids, mask), dim=-1).mean(0), dim=-1)
    torch.testing.assert_close(weights[1], expected)
    # images lying on the class embeddings of classes 2, 0, 1, 0 (the last one nearer class 1)
    images = torch.stack([weights[2], weights[0], weights[1], 0.4 * weights[0] + weights[1]])
    logits = F.normalize(images, dim=-1) @ weights.t()
    acc = zero_shot_accuracy(logits, torch.tensor([2, 0, 1, 0]), ks=(1, 5))
    assert acc["top1"] == pytest.approx(75.0) and acc["top5"] == pytest.approx(100.0)


def test_classnames_and_templates(tmp_path, demo_data):
    folder = tmp_path / "val"
    for name in ("n02_golden_retriever", "n01_tabby_cat"):
        (folder / name).mkdir(parents=True)
    assert read_classnames(str(folder)) == ["n01 tabby cat", "n02 golden retriever"]
    names = tmp_path / "names.txt"
    names.write_text("n02_golden_retriever\tgolden retriever\nn01_tabby_cat\ttabby cat\n")
    assert read_classnames(str(names)) == ["golden retriever", "tabby cat"]
    wnids = sorted(p.name for p in folder.iterdir())
    assert read_classnames(str(names), wnids) == ["tabby cat", "golden retriever"]
    with pytest.raises(UserError, match="no name"):
        read_classnames(str(names), wnids + ["n03"])
    assert read_templates(None) == list(DEFAULT_TEMPLATES)
    (tmp_path / "t.txt").write_text("# prompts\nit is a {}\n\nthe {} again\n")
    assert read_templates(str(tmp_path / "t.txt")) == ["it is a {}", "the {} again"]
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(UserError, match="needs a"):
        read_templates(str(tmp_path / "bad.txt"))
    # the demo's zero-shot files read as real ones would
    demo_wnids = sorted(p.name for p in demo_data["images_val"].iterdir() if p.is_dir())
    demo_names = read_classnames(str(demo_data["classnames"]), demo_wnids)
    assert len(demo_names) == len(demo_wnids) >= 2
    assert all("{}" in t for t in read_templates(str(demo_data["templates"])))
