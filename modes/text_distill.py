"""text_distill: cross-lingual distillation of a text tower (multilingual CLIP, mCLIP-style).

A frozen teacher (`--distill_teacher`: any checkpoint of this project with a text tower and contrastive heads,
the multiway model or a dual encoder) embeds the SOURCE side of parallel sentences
(custom_datasets/parallel_text.py: `source,target` CSV/TSV/JSONL/parquet) with its own tokenizer; the student
embeds the TARGET side with the run's tokenizer (`--tokenizer`, the new language's vocabulary, or a Hugging
Face `--text_tower` folder's own) and learns to match: `--distill_loss mse` (sum over rows of the squared
distance between the two L2-normalised embeddings, divided by the global row count), `contrastive` (CLIP's
loss between student and teacher embeddings at the teacher's temperature, features gathered across ranks with
gradients like ITC, so N ranks equal one process on the global batch) or `both` (their sum).

The student is the teacher's model: unless `--resume` gives other weights, the run starts from the teacher's
checkpoint (its image path, projections and temperature; a text vocabulary of another size gets fresh word
embeddings; an HF student tower is new), with the teacher's architecture (the run's `--model` must be the
teacher's). The image path stays frozen (the mode locks the image tower: on the multiway model the shared
attention too, which then adapts to the new language only through text-only LoRA, `--lora_rank`), so the saved
model is the teacher's image path plus the student text tower: one registry model that the embedding API
(inference.py), util/zero_shot.py and util/retrieve.py use with the new language's tokenizer.
Evaluation: on `--val_data_path` pairs, student-to-teacher retrieval R@1 (each target's student embedding
against all sources' teacher embeddings) and the MSE; zero-shot on `--zeroshot_data_path` with class names and
templates in the new language (`--zeroshot_classnames`, `--zeroshot_templates`).
"""
import math
import os

import torch

from custom_datasets.hf_tokenizer import tokenizer_from_any_state
from custom_datasets.loaders import batches_per_epoch, eval_loader, train_loader
from custom_datasets.parallel_text import ParallelCollator, ParallelTextDataset
from models.contrastive import clip_loss
from models.dual_encoder import OURS, is_dual_encoder_config
from models.loading import load_weights
from models.registry import ARCHITECTURE_KEYS, LEGACY_DEFAULTS, model_from_config, recorded_config
from modes import register_mode
from modes.base import PretrainData, PretrainMode
from util.checkpoint import extract_state_dict, load_file
from util.errors import UserError
from util.evaluation import EvalSet
from util.logger import LOG
from util.resume import ResumePlan

DISTILL_LOSSES = ("mse", "contrastive", "both")
# Architecture keys of a multiway teacher the student keeps (its vocabulary and text length are the run's).
_KEEP = ARCHITECTURE_KEYS + tuple(LEGACY_DEFAULTS) + ("img_size", "itc_loss", "itc_pool", "layer_scale_init")


@register_mode
class TextDistill(PretrainMode):
    name = "text_distill"
    towers = ("text",)
    heads = (r"itc_text_proj\.",)
    model_kinds = (None, "dual_encoder")

    @staticmethod
    def add_args(group):
        group.add_argument("--distill_teacher", default=None,
                           help="text_distill: the frozen teacher checkpoint (text tower + contrastive heads)")
        group.add_argument("--distill_loss", default="mse", choices=DISTILL_LOSSES,
                           help="text_distill: match the teacher's embeddings by MSE, a contrastive loss over the "
                                "(global) batch, or both")

    @staticmethod
    def resolve_defaults(args):
        if args.mode != "text_distill":
            return
        args.lock_image = True  # the saved model keeps the teacher's image path as it is

    @staticmethod
    def check_inputs(args, grid):
        if not args.distill_teacher:
            raise UserError("--mode text_distill needs --distill_teacher <checkpoint with a text tower>")
        if not os.path.isfile(args.distill_teacher):
            raise UserError(f"--distill_teacher {args.distill_teacher}: file not found")
        if args.distill_loss != "mse" and args.accum_iter > 1:
            raise UserError(f"--distill_loss {args.distill_loss} with --accum_iter {args.accum_iter}: a contrastive "
                            "loss over micro-batches would see fewer negatives; use --distill_loss mse or a larger "
                            "--batch_size")

    def __init__(self, args):
        super().__init__(args)
        self.teacher = self.teacher_ckpt = self.teacher_tokenizer = None

    def _load_teacher_file(self):
        if self.teacher_ckpt is None:
            path = self.args.distill_teacher
            ckpt = load_file(path, "--distill_teacher")
            config = ckpt.get("model_config") if isinstance(ckpt, dict) else None
            if not config or extract_state_dict(ckpt) is None or not ckpt.get("tokenizer"):
                raise UserError(f"--distill_teacher {path}: not a checkpoint of this project with its model_config "
                                "and tokenizer (train or convert the teacher with this project first)")
            if config.get("name") != self.args.model:
                raise UserError(f"--distill_teacher {path}: holds a {config.get('name')} model; the student is the "
                                f"teacher's model, so pass --model {config.get('name')}")
            self.teacher_ckpt = ckpt
        return self.teacher_ckpt

    def starting_point(self, plan, tokenizer):
        """Without --resume (or this run's own checkpoint), the student starts from the teacher's weights,
        less the text tensors another vocabulary or an HF text tower replaces."""
        if plan.kind != "none":
            return plan
        ckpt = self._load_teacher_file()
        config, state = ckpt["model_config"], extract_state_dict(ckpt)
        own_text = not is_dual_encoder_config(config) or self.student_text_tower() == OURS
        if is_dual_encoder_config(config) and not own_text:
            state = {k: v for k, v in state.items() if not k.startswith(("text_tower.", "itc_text_proj."))}
            LOG.info(f"student: the teacher {self.args.distill_teacher}'s image tower, a new text tower")
        elif _vocabulary(tokenizer.to_state()) != _vocabulary(ckpt["tokenizer"]):  # rows would mean other tokens
            state = {k: v for k, v in state.items() if "word_embeddings" not in k and not k.startswith("mlm_head.")}
            LOG.info(f"student starts from the teacher {self.args.distill_teacher} with new word embeddings for its "
                     f"vocabulary of {tokenizer.vocab_size} tokens")
        else:
            LOG.info(f"student starts from the teacher {self.args.distill_teacher} (same vocabulary)")
        # no model_config: the student's architecture is the teacher's by model_overrides, less its text tower
        return ResumePlan("weights", self.args.distill_teacher, {"model": state},
                          f"text_distill: starting from the teacher {self.args.distill_teacher}")

    def student_text_tower(self):
        return self.args.model_kwargs.get("text_tower", self.args.text_tower)

    def model_overrides(self):
        """The teacher's architecture, with the run's vocabulary (and, for a dual encoder, text tower)."""
        config = self._load_teacher_file()["model_config"]
        if not is_dual_encoder_config(config):
            if self.student_text_tower() != OURS:
                raise UserError(f"--text_tower {self.student_text_tower()}: a Hugging Face student needs a dual-"
                                "encoder teacher; the multiway teacher's student is its own text path")
            return {k: v for k, v in recorded_config(config).items() if k in _KEEP}
        image, text = config["image"], config["text"]
        out = {"image_tower": image["name"], "image_tower_kwargs": image["kwargs"], "img_size": image["img_size"],
               "embed_dim": config["embed_dim"], "itc_loss": config["itc_loss"], "image_tower_weights": None}
        if self.student_text_tower() == OURS and text["kind"] == OURS:
            out["text_tower_kwargs"] = {k: text[k] for k in ("width", "depth", "heads", "mlp_ratio",
                                                             "layer_scale_init")}
        return out

    def setup(self, device):
        ckpt = self._load_teacher_file()
        teacher = model_from_config(ckpt["model_config"])
        load_weights(teacher, extract_state_dict(ckpt), self.args.distill_teacher, "--distill_teacher",
                     ckpt["model_config"])
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.teacher_tokenizer = tokenizer_from_any_state(ckpt["tokenizer"])
        self.teacher_scale = float(teacher.logit_scale.exp())
        self.teacher_ckpt = {k: v for k, v in ckpt.items() if k != "model"}  # its weights now live in the teacher
        LOG.info(f"teacher: {self.args.distill_teacher} ({ckpt['model_config']['name']}, tokenizer of "
                 f"{self.teacher_tokenizer.vocab_size} tokens), loss {self.args.distill_loss}")

    def build_data(self, tokenizer, image_state, rank, world_size, grid):
        a = self.args
        collate = ParallelCollator(tokenizer, self.teacher_tokenizer)
        train_set = ParallelTextDataset(a.data_path)
        loader, sampler = train_loader(train_set, collate, a.batch_size, rank, world_size, a.seed, a.num_workers,
                                       a.pin_mem, "--data_path")
        val = val_set = None
        if a.val_data_path:
            val_set = ParallelTextDataset(a.val_data_path, "--val_data_path")
            val = eval_loader(val_set, collate, a.batch_size, rank, world_size, min(a.num_workers, 2), a.pin_mem)
        return PretrainData(loader, sampler, val, batches_per_epoch(sampler, a.batch_size), len(train_set),
                            len(val_set) if val_set is not None else 0, val_set)

    def prepare_batch(self, batch):
        with torch.no_grad():
            batch["teacher_emb"] = self.teacher.encode_text(batch["teacher_ids"], batch["teacher_masks"]).float()

    def loss_units(self, batch):
        return batch["text_ids"].new_full((), batch["text_ids"].shape[0])

    def loss(self, backbone, batch):
        student = backbone.encode_text(batch["text_ids"], batch["text_masks"]).float()
        out = distill_terms(student, batch["teacher_emb"], self.args.distill_loss, self.teacher_scale)
        rows = self.loss_units(batch)
        total = sum(v for k, v in out.items() if k.endswith("_loss")) * rows  # per-row means -> sums
        return {"loss": total, **{k: v.detach() for k, v in out.items()}}

    def eval_sets(self, data, tokenizer, image_state, rank, world_size):
        sets = []
        if data.val_loader is not None:
            sets.append(EvalSet(loader=data.val_loader, num_items=len(data.val_dataset), predict=self._embed_pair,
                                metrics=_agreement))
        if self.args.zeroshot_data_path:
            from modes.image_text_itc import build_zero_shot

            sets.append(build_zero_shot(self.args, tokenizer, image_state, rank, world_size))
        return sets

    def eval_towers(self):
        return ("image",) if self.args.zeroshot_data_path else ()  # zero-shot embeds the held-out images

    def _embed_pair(self, backbone, batch, prepared=None):
        return {"student": backbone.encode_text(batch["text_ids"], batch["text_masks"]).float(),
                "teacher": self.teacher.encode_text(batch["teacher_ids"], batch["teacher_masks"]).float()}


def distill_terms(student, teacher, which, scale):
    """{"mse_loss" and/or "contrastive_loss": per-row means; "cos": mean cosine of each pair}; student and
    teacher [B, D] L2-normalised."""
    out = {"cos": (student * teacher).sum(-1).mean().detach()}
    if which in ("mse", "both"):
        out["mse_loss"] = (student - teacher).pow(2).sum(-1).mean()
    if which in ("contrastive", "both"):
        out["contrastive_loss"] = clip_loss(teacher, student, student.new_full((), math.log(scale)))["loss"]
    return out


def _vocabulary(state):
    """What fixes the meaning of each embedding row: the token list (ours) or the tokenizer.json (HF)."""
    return state.get("vocab", state.get("tokenizer_json"))


def _agreement(outputs):
    """Held-out metrics from the gathered embeddings: student->teacher R@1 and the mean squared distance."""
    s, t = outputs["student"], outputs["teacher"]
    hits = (s @ t.T).argmax(1) == torch.arange(s.shape[0], device=s.device)
    return {"distill_r1": hits.float().mean().item(), "distill_mse": (s - t).pow(2).sum(-1).mean().item()}
