"""Retrieval recall and zero-shot classification helpers for image-text models.

Pure tensor code: the caller encodes (on every rank, over exactly the held-out items) and passes
embeddings or a similarity matrix here. Numbers are percentages.
"""
import os

import torch
import torch.nn.functional as F

from util.errors import UserError

# A handful of prompt templates; "{}" is replaced by the class name.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
    "a drawing of a {}.",
    "a photo of the {}.",
)


def retrieval_recall(sim: torch.Tensor, txt_to_img: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Recall@k both ways from a similarity matrix.

    Args:
        sim: [Ni, Nt] image-text similarities.
        txt_to_img: [Nt] index of each text's image (an image may have several texts).
        ks: cut-offs; a k larger than the candidate count counts every candidate.
    Returns: {"i2t_r{k}", "t2i_r{k}", "r_mean"} in percent. An image query is correct at k when
    any of its texts is among its k most similar texts (images with no text are left out); a text
    query is correct when its image is among its k most similar images. Ties go to topk's order.
    """
    sim = sim.float()
    txt_to_img = txt_to_img.to(sim.device).long()
    n_img, n_txt = sim.shape
    if txt_to_img.shape != (n_txt,):
        raise ValueError(f"txt_to_img has shape {tuple(txt_to_img.shape)}, expected ({n_txt},)")
    out = {}
    top_t = sim.topk(min(max(ks), n_txt), dim=1).indices                   # [Ni, k]
    hits_i = txt_to_img[top_t] == torch.arange(n_img, device=sim.device)[:, None]
    has_text = torch.zeros(n_img, dtype=torch.bool, device=sim.device)
    has_text[txt_to_img] = True
    top_i = sim.t().topk(min(max(ks), n_img), dim=1).indices               # [Nt, k]
    hits_t = top_i == txt_to_img[:, None]
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * hits_i[has_text, :k].any(dim=1).float().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * hits_t[:, :k].any(dim=1).float().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def read_classnames(path: str, wnids=None) -> list:
    """Class names, in class-index order.

    - path a folder: its sub-folder names, sorted (the ImageFolder class order), "_" -> " ".
    - path a file: one class per line, `wnid<TAB>name` or just `name`. With `wnids` (e.g. the
      sorted sub-folders of the evaluation folder) the names are returned in that order;
      otherwise in file order.
    """
    if os.path.isdir(path):
        names = sorted(e.name for e in os.scandir(path) if e.is_dir())
        if not names:
            raise UserError(f"{path}: no class folders")
        return [n.replace("_", " ") for n in names]
    if not os.path.isfile(path):
        raise UserError(f"{path}: class-name file or folder not found")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                wnid, tab, name = line.partition("\t")
                pairs.append((wnid.strip(), name.strip()) if tab else (None, line.strip()))
    if not pairs:
        raise UserError(f"{path}: no class names")
    if wnids is None:
        return [name for _, name in pairs]
    table = {wnid: name for wnid, name in pairs if wnid is not None}
    missing = [w for w in wnids if w not in table]
    if missing:
        raise UserError(f"{path}: no name for classes {missing[:5]} (expected wnid<TAB>name lines)")
    return [table[w] for w in wnids]


def read_templates(path=None) -> list:
    """Prompt templates from a file (one per line, each with "{}"; blank and # lines skipped),
    or DEFAULT_TEMPLATES when path is None."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    if not os.path.isfile(path):
        raise UserError(f"{path}: template file not found")
    with open(path, encoding="utf-8") as f:
        templates = [t.strip() for t in f if t.strip() and not t.lstrip().startswith("#")]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise UserError(f"{path}: every template needs a {{}} for the class name"
                        f"{f' (not in {bad[0]!r})' if bad else ' (file is empty)'}")
    return templates


@torch.no_grad()
def zero_shot_classifier(encode_text_fn, tokenizer, classnames, templates, device=None):
    """[C, D] class embeddings: per class, the mean of the L2-normalised embeddings of its
    templates, normalised again.

    encode_text_fn(ids [N, L], mask [N, L]) -> [N, D]; tokenizer.encode_batch(texts) -> (ids, mask).
    """
    weights = []
    for name in classnames:
        ids, mask = tokenizer.encode_batch([t.format(name) for t in templates])
        if device is not None:
            ids, mask = ids.to(device), mask.to(device)
        emb = F.normalize(encode_text_fn(ids, mask).float(), dim=-1)
        weights.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(weights)


def zero_shot_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> dict:
    """Top-k accuracy in percent: {"top1": .., "top5": ..}; logits [N, C], targets [N]; a k
    larger than C counts every class."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == targets.to(top.device).long()[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}
