"""Image-text retrieval: fine-tune both towers with the image-text contrastive loss (CLIP or SigLIP, as the
checkpoint's `itc_loss`; features gathered across ranks with gradients), evaluate recall@1/5/10 both ways.

Data: `--data_path` (training) and `--val_data_path` pair files read by custom_datasets.pair_dataset
(CSV/TSV `text,image_path`, or the MUGE layout). Uses the pretrained ITC projections and temperature.
Evaluation: every pair's image and text embedding; images that occur in several pairs are counted once
(one image may have several correct captions); the main metric is r_mean, the mean of the six recalls.
"""
import numpy as np
import torch

from custom_datasets.finetune_data import timm_train_transform
from custom_datasets.image_dataset import build_eval_transform
from custom_datasets.loaders import batches_per_epoch, eval_loader, train_loader
from custom_datasets.pair_collator import PairCollator
from custom_datasets.pair_dataset import build_pair_dataset, is_shard_path
from models.contrastive import clamp_logit_scale_, contrastive_loss
from tasks import register_task
from tasks.base import FinetuneData, Task
from util.errors import UserError
from util.retrieval_metrics import retrieval_recall


@register_task("image_text_retrieval")
class ImageTextRetrieval(Task):
    mode = "image_text_itc"
    main_metric = "r_mean"
    keep_heads = ("itc_image_proj", "itc_text_proj", "logit_scale", "logit_bias")
    needs_tokenizer = True

    @staticmethod
    def add_args(parser):
        g = parser.add_argument_group("image_text_retrieval")
        g.add_argument("--retrieval_crop_scale", type=float, nargs=2, default=[0.5, 1.0],
                       help="random resized crop scale of training images")

    def _dataset(self, path, transform, flag, split):
        if not path:
            raise UserError(f"{flag} is required for image_text_retrieval: a pair file (CSV/TSV text,image_path "
                            "or MUGE)")
        if is_shard_path(path):
            raise UserError(f"{flag} {path}: fine-tuning reads CSV/TSV or MUGE pair files, not WebDataset shards")
        return build_pair_dataset(path, transform, seed=self.args.seed, split=split, flag=flag)

    def build_data(self, tokenizer, preprocess, rank, world_size, train=True):
        a = self.args
        val_set = self._dataset(a.val_data_path, build_eval_transform(preprocess), "--val_data_path", "valid")
        self.val_image_index = np.asarray(val_set.image_index, dtype=np.int64)
        collate = PairCollator(tokenizer)
        val = eval_loader(val_set, collate, a.batch_size, rank, world_size, min(a.num_workers, 2), a.pin_mem)
        if not train:
            return FinetuneData(None, None, val, 0, len(val_set), 0)
        tf = timm_train_transform(preprocess, scale=a.retrieval_crop_scale, auto_augment=None, re_prob=0.0,
                                  color_jitter=None)
        train_set = self._dataset(a.data_path, tf, "--data_path", "train")
        loader, sampler = train_loader(train_set, collate, a.batch_size, rank, world_size, a.seed, a.num_workers,
                                       a.pin_mem, "--data_path")
        return FinetuneData(loader, sampler, val, len(train_set), len(val_set),
                            batches_per_epoch(sampler, a.batch_size))

    def loss(self, backbone, head, batch):
        img = backbone.encode_image(batch["images"])
        txt = backbone.encode_text(batch["text_ids"], batch["text_masks"])
        out = contrastive_loss(backbone, img, txt)
        return {"loss": out["loss"], "i2t_acc": out["i2t_acc"], "t2i_acc": out["t2i_acc"],
                "temperature": out["temperature"]}

    def predict(self, backbone, head, batch):
        return {"index": batch["index"], "image_emb": backbone.encode_image(batch["images"]).float(),
                "text_emb": backbone.encode_text(batch["text_ids"], batch["text_masks"]).float()}

    def metrics(self, outputs):
        image_ids = self.val_image_index[outputs["index"].numpy()]
        distinct, first = np.unique(image_ids, return_index=True)
        txt_to_img = torch.from_numpy(np.searchsorted(distinct, image_ids))
        sim = outputs["image_emb"][torch.from_numpy(first)].double() @ outputs["text_emb"].double().t()
        return retrieval_recall(sim, txt_to_img)

    def post_step(self, backbone):
        if backbone.config["itc_loss"] != "clip":
            return None
        return lambda: clamp_logit_scale_(backbone.logit_scale)
