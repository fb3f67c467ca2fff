"""Contrastive evaluation on every rank: image<->text retrieval R@1/5/10 on held-out pairs and zero-shot
classification on an ImageNet-style folder. Each rank embeds its shard (ShardedEvalSampler), the rows are
gathered back into item order, and every rank computes the same numbers, equal on any world size."""
import torch

from util import dist as du
from util.retrieval_metrics import retrieval_recall, zero_shot_accuracy, zero_shot_classifier
from util.run_common import autocast_context


@torch.no_grad()
def embed_pairs(model, loader, device, autocast_dtype=None):
    imgs, txts = [], []
    for batch in loader:
        with autocast_context(device, autocast_dtype):
            imgs.append(model.encode_image(batch["images"].to(device)).float())
            txts.append(model.encode_text(batch["text_ids"].to(device), batch["text_masks"].to(device)).float())
    dim = model.itc_image_proj.out_features
    empty = torch.zeros(0, dim, device=device)
    img = du.gather_rows_in_index_order(torch.cat(imgs) if imgs else empty)
    txt = du.gather_rows_in_index_order(torch.cat(txts) if txts else empty)
    return img, txt


@torch.no_grad()
def retrieval_metrics(model, loader, dataset, device, autocast_dtype=None):
    """R@k both ways; pairs sharing an image (several captions) count as one image."""
    was_training = model.training
    model.eval()
    img, txt = embed_pairs(model, loader, device, autocast_dtype)
    image_index = torch.as_tensor(getattr(dataset, "image_index", range(len(dataset))), device=device).long()
    unique, txt_to_img = torch.unique(image_index, return_inverse=True)
    first = torch.full((unique.numel(),), -1, dtype=torch.long, device=device)
    first.scatter_reduce_(0, txt_to_img, torch.arange(len(image_index), device=device), reduce="amin",
                          include_self=False)
    out = retrieval_recall(img[first] @ txt.T, txt_to_img)
    model.train(was_training)
    return out


class ZeroShot:
    """Zero-shot classification of an image folder with prompts built from class names and templates."""

    def __init__(self, loader, classnames, templates, tokenizer):
        self.loader, self.classnames, self.templates, self.tokenizer = loader, classnames, templates, tokenizer

    @torch.no_grad()
    def __call__(self, model, device, autocast_dtype=None):
        was_training = model.training
        model.eval()
        with autocast_context(device, autocast_dtype):
            weights = zero_shot_classifier(model.encode_text, self.tokenizer, self.classnames, self.templates, device)
        logits, targets = [], []
        for images, target in self.loader:
            with autocast_context(device, autocast_dtype):
                logits.append(model.encode_image(images["images"].to(device)).float() @ weights.T.float())
            targets.append(target.to(device))
        c = len(self.classnames)
        logits = du.gather_rows_in_index_order(torch.cat(logits) if logits else torch.zeros(0, c, device=device))
        targets = du.gather_rows_in_index_order(torch.cat(targets) if targets else
                                                torch.zeros(0, dtype=torch.long, device=device))
        model.train(was_training)
        return {f"zeroshot_{k}": v for k, v in zero_shot_accuracy(logits, targets, ks=(1, min(5, c))).items()}
