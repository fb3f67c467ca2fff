"""Contrastive evaluation sets (util.evaluation.EvalSet) for engine_pretrain.evaluate: image<->text
retrieval R@1/5/10 on held-out pairs, and zero-shot classification of an ImageNet-style folder. Each rank
embeds its shard; the rows come back in item order, so every rank computes the same numbers on any world
size. Used by the image_text_itc mode and by util/eval_itc.py."""
import torch

from util.eval_visuals import denormalize, retrieval_examples
from util.evaluation import EvalSet
from util.retrieval_metrics import retrieval_recall, zero_shot_accuracy, zero_shot_classifier


def _embed_pair(model, batch, prepared=None):
    return {"image_emb": model.encode_image(batch["images"]).float(),
            "text_emb": model.encode_text(batch["text_ids"], batch["text_masks"]).float()}


def retrieval_set(loader, dataset, image_state=None):
    """R@k both ways over the pairs of `loader` (over `dataset`); `dataset.image_index[i]`, where the dataset
    has it, is the image of pair i (pairs sharing an image, i.e. several captions of one image, count it
    once); else every pair has its own image. With `image_state` (its mean/std), TensorBoard gets the first
    images and their top-3 captions (util/eval_visuals.retrieval_examples)."""
    image_index = torch.as_tensor(list(getattr(dataset, "image_index", range(len(dataset))))).long()
    unique, txt_to_img = torch.unique(image_index, return_inverse=True)
    first = torch.full((unique.numel(),), -1, dtype=torch.long)
    first.scatter_reduce_(0, txt_to_img, torch.arange(len(image_index)), reduce="amin", include_self=False)

    def metrics(out):
        return retrieval_recall(out["image_emb"][first] @ out["text_emb"].T, txt_to_img)

    def caption(i):
        texts = getattr(dataset, "texts", None)
        return texts.get(i) if texts is not None else dataset[i]["raw_text"]

    def visualize(model, batch, out):
        text, shown = retrieval_examples(out["image_emb"], out["text_emb"], first, caption, txt_to_img)
        images = denormalize(torch.stack([dataset[i]["image"] for i in shown]), image_state["mean"],
                             image_state["std"])
        return {"images": {"retrieval/images": images}, "text": {"retrieval/top3_captions": text}}

    return EvalSet(loader=loader, num_items=len(image_index), predict=_embed_pair, metrics=metrics,
                   visualize=visualize if image_state is not None and hasattr(dataset, "__getitem__") else None)


def zero_shot_set(loader, num_items, classnames, templates, tokenizer):
    """Top-1/top-5 accuracy (zeroshot_*) of classifying the images of `loader` (batches with "images" and
    "targets") against prompts built from `classnames` and `templates`."""
    def prepare(model):
        device = next(model.parameters()).device
        return zero_shot_classifier(model.encode_text, tokenizer, classnames, templates, device)

    def predict(model, batch, weights):
        return {"logits": model.encode_image(batch["images"]).float() @ weights.T.float(),
                "targets": batch["targets"]}

    def metrics(out):
        ks = (1, min(5, len(classnames)))
        return {f"zeroshot_{k}": v for k, v in zero_shot_accuracy(out["logits"], out["targets"], ks=ks).items()}

    return EvalSet(loader=loader, num_items=num_items, predict=predict, metrics=metrics, prepare=prepare)
