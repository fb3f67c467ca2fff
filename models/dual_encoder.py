"""CLIP-family dual encoder: any timm ViT as the image tower, and our text tower or a local Hugging Face
BERT/RoBERTa folder as the text tower, each followed by a projection (Linear, no bias) to a shared space.

It offers VLMo's contrastive interface (`config`, `encode_image`, `encode_text`, `logit_scale`/`logit_bias`,
`locked_towers`, `lora_modalities`, `reg_loss_weight`, `itc_image_proj`, `configure_trainable`), so the
image_text_itc mode (modes/image_text_itc.py), the training loop and the evaluation run it unchanged; it is
built through the registry as `create_model("dual_encoder", image_tower=..., text_tower=..., ...)`. CLIP,
SigLIP, LiT/SigLiT (`lock_image`) and Chinese CLIP (a BERT-style Chinese text tower) are configurations of it. `transformers` is only imported for a Hugging Face text tower.
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.embeddings import TextEmbeddings
from models.image_tower import image_tower as _image_tower
from models.layers import trunc_normal_
from models.lora import LoRALinear, self_regularization_loss, swap_in_lora_linears
from models.multiway_block import LayerNorm, MultiwayBlock
from models.vlmo import ITC_LOSSES
from util.errors import UserError

KIND = "dual_encoder"
MODE = "image_text_itc"
# What each mode the dual encoder serves trains (tower_of's names): text_distill's loss uses the text tower and
# its projection only (the temperature would get no gradient, which DDP refuses).
TRAINED_TOWERS = {MODE: ("image", "text", "head"), "text_distill": ("text",)}
OURS = "ours"
# CLIP's text transformer dimensions; tests and small runs override them (text_tower_kwargs).
OUR_TEXT_DEFAULTS = dict(width=512, depth=12, heads=8, mlp_ratio=4.0, layer_scale_init=1.0)
# Families whose attention and MLP call their nn.Linear modules (so LoRALinear in their place is used).
_HF_LORA_TYPES = ("bert", "roberta", "xlm-roberta")


class OurTextTower(nn.Module):
    """BERT-style embeddings + pre-LN blocks with one shared FFN (models/multiway_block.py) + final LayerNorm."""

    def __init__(self, vocab_size, width, depth, heads, mlp_ratio=4.0, max_len=196, drop_path=0.0,
                 layer_scale_init=1.0):
        super().__init__()
        self.width = width
        self.embeddings = TextEmbeddings(vocab_size, width, max_len)
        dpr = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([MultiwayBlock(width, heads, mlp_ratio, "shared", drop_path=dpr[i],
                                                   layer_scale_init=layer_scale_init) for i in range(depth)])
        self.norm = LayerNorm(width)
        # As VLMo._init_weights (models/vlmo.py): embeddings std 0.02; the blocks' Linear layers
        # trunc-normal(fan_in^-0.5), the MLP outputs (mlp.fc2) further / sqrt(2 * depth), so each
        # block moves the (LayerNorm-ed, unit-scale) token stream by O(1) and the [CLS] feature depends on the
        # text at init (std 0.02 everywhere with layer scale 0.1 left it constant: cosine 1.0000 across texts).
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                std = layer.in_features ** -0.5
                trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            block.mlp.fc2.weight.data.mul_((2.0 * depth) ** -0.5)  # MLP outputs only, as models/vlmo.py

    def forward(self, ids, masks):
        """ids, masks [B, L] (mask 1 = token) -> [B, width], the first ([CLS]) token after the final norm."""
        attn_mask = masks.bool()[:, None, None, :]
        x = self.embeddings(ids)
        for block in self.blocks:
            x = block(x, "text", attn_mask=attn_mask)
        return self.norm(x)[:, 0]


class HFTextTower(nn.Module):
    """A Hugging Face encoder (BERT/RoBERTa); features are the first token of last_hidden_state."""

    def __init__(self, hf_model):
        super().__init__()
        if getattr(hf_model, "pooler", None) is not None:
            hf_model.pooler = None  # unused by CLS pooling; trainable-but-unused tensors would break DDP
        self.model = hf_model
        self.width = hf_model.config.hidden_size

    def forward(self, ids, masks):
        return self.model(input_ids=ids, attention_mask=masks).last_hidden_state[:, 0]


def tower_of(name):
    """'image', 'text' or 'head' (temperature, bias) for a parameter or module name."""
    if name.startswith(("image_tower.", "itc_image_proj.")):
        return "image"
    if name.startswith(("text_tower.", "itc_text_proj.")):
        return "text"
    return "head"


class DualEncoder(nn.Module):
    """config: plain dict (kind, name, embed_dim, itc_loss, img_size, patch_size, drop_path_rate, image, text);
    see build_dual_encoder. Towers are passed in built (weights loaded by the builders below)."""

    def __init__(self, config, image_tower, text_tower, pretrained_keys=()):
        super().__init__()
        self.config = dict(config)
        if self.config["itc_loss"] not in ITC_LOSSES:
            raise UserError(f"--itc_loss must be one of {ITC_LOSSES}, got {self.config['itc_loss']!r}")
        self.image_tower, self.text_tower = image_tower, text_tower
        dim = self.config["embed_dim"]
        self.itc_image_proj = nn.Linear(self.config["image"]["width"], dim, bias=False)
        self.itc_text_proj = nn.Linear(self.config["text"]["width"], dim, bias=False)
        for proj in (self.itc_image_proj, self.itc_text_proj):  # CLIP's init: std = width^-0.5
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        if self.config["itc_loss"] == "clip":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        else:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            # The paper's b; a fresh run starts it at the prior of its global batch (modes/image_text_itc.py).
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        # Names loaded from --image_tower_weights or the HF folder: pretrained, so LoRA adapts them.
        self.pretrained_keys = sorted(pretrained_keys)
        self.locked_towers = set()
        self.lora_modalities = {"image", "text"}
        self.reg_loss_weight = 0.0

    def train(self, mode=True):
        """A locked tower stays in eval mode (no dropout or drop path), so its embeddings are deterministic."""
        super().train(mode)
        for tower in self.locked_towers:
            getattr(self, f"{tower}_tower").eval()
        return self

    def pooled_image(self, images):
        """[B, 3, H, W] -> the timm tower's pooled features [B, width]."""
        return self.image_tower(images)

    def pooled_text(self, text_ids, text_masks):
        """[B, L] ids and mask -> the text tower's first ([CLS]) token [B, width]."""
        return self.text_tower(text_ids, text_masks)

    def encode_image(self, images):
        """[B, 3, H, W] -> L2-normalised [B, embed_dim]: pooled_image through the contrastive projection."""
        return F.normalize(self.itc_image_proj(self.pooled_image(images)), dim=-1)

    def encode_text(self, text_ids, text_masks):
        """[B, L] ids and mask -> L2-normalised [B, embed_dim]: pooled_text through the contrastive projection."""
        return F.normalize(self.itc_text_proj(self.pooled_text(text_ids, text_masks)), dim=-1)

    def self_regularization_loss(self):
        """reg_loss_weight * sum over adapted layers of sum((W0 * delta)^2)."""
        return self_regularization_loss(self)

    def configure_trainable(self, mode, lora_rank=0, lora_alpha=1.0, provided_keys=(), lock_image=False,
                            lock_text=False, reg_loss_weight=0.0):
        """Freeze/adapt parameters for a run (before the optimizer and DDP); returns {group: [names]}.

        lock_image / lock_text (LiT): the tower and its projection are frozen and run under no_grad.
        lora_rank > 0: every weight that was pretrained (pretrained_keys) or that the resumed checkpoint
        provided is frozen; the unlocked towers' pretrained Linear layers get LoRA adapters; everything
        else (projections, temperature, a tower trained from scratch) trains fully.
        """
        if mode not in TRAINED_TOWERS:
            raise UserError(f"--model {KIND} trains only the {' and '.join(TRAINED_TOWERS)} modes, not {mode}")
        if lock_image and lock_text:
            raise UserError("--lock_image and --lock_text together leave nothing to train")
        locked = {t for t, on in (("image", lock_image), ("text", lock_text)) if on}
        self.locked_towers = locked
        self.lora_modalities = {"image", "text"} - locked
        provided = set(provided_keys) | set(self.pretrained_keys)
        for name, p in self.named_parameters():
            p.requires_grad_(tower_of(name) in TRAINED_TOWERS[mode] and tower_of(name) not in locked)
        if lora_rank > 0:
            for tower in sorted(self.lora_modalities):
                self._enable_lora(tower, provided, lora_rank, lora_alpha)
            for name, p in self.named_parameters():
                if name in provided:
                    p.requires_grad_(False)
        self.reg_loss_weight = reg_loss_weight
        self.train(self.training)  # put a newly locked tower in eval mode
        groups = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups.setdefault("lora" if ".lora_" in name else tower_of(name), []).append(name)
        return groups

    def _enable_lora(self, tower, provided, rank, alpha):
        capable = [(n, m) for n, m in self.named_modules() if isinstance(m, LoRALinear) and tower_of(n) == tower]
        targets = [m for n, m in capable if f"{n}.weight" in provided and not m.has_lora]
        if any(tower_of(k) == tower for k in provided) and not capable:
            what = self.config[tower].get("name") or self.config[tower].get("model_type")
            raise UserError(f"--lora_rank: LoRA is not supported on this {tower} tower ({what}); use --lora_rank 0 "
                            f"or lock it (--lock_{tower})")
        for m in targets:
            m.enable_lora(rank, alpha)


# ---------------------------------------------------------------- builders


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("a Hugging Face text tower needs the `transformers` package: pip install transformers") \
            from None
    return transformers


def _hf_text_tower(cfg, load_weights):
    transformers = _transformers()
    if load_weights:
        folder = cfg["path"]
        if not os.path.isdir(folder):
            raise UserError(f"--text_tower {folder}: not a folder (expected a local Hugging Face model folder "
                            f"with config.json and weights, or '{OURS}')")
        try:
            hf = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--text_tower {folder}: cannot load a Hugging Face model "
                            f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    else:  # rebuilt from a checkpoint's config: the weights come from the checkpoint
        conf = dict(cfg["hf_config"])
        hf = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(conf.pop("model_type"), **conf))
    hf = hf.float()  # a half-precision checkpoint must not train in half precision
    if hf.config.model_type in _HF_LORA_TYPES and hasattr(hf, "encoder"):
        swap_in_lora_linears(hf.encoder)
    tower = HFTextTower(hf)
    loaded = [f"text_tower.{k}" for k in tower.state_dict()] if load_weights else []
    return tower, loaded


def _max_positions(hf_config):
    limit = getattr(hf_config, "max_position_embeddings", None)
    if limit is not None and "roberta" in hf_config.model_type:
        limit -= (hf_config.pad_token_id or 0) + 1  # RoBERTa numbers positions from padding_idx + 1
    return limit


def build_dual_encoder(image_tower, text_tower, embed_dim=512, itc_loss="clip", img_size=224, vocab_size=None,
                       image_tower_weights=None, image_tower_kwargs=None, text_tower_kwargs=None, max_text_len=196,
                       drop_path_rate=0.0):
    """A DualEncoder from flags-level choices.

    image_tower: timm model name (random init, or `image_tower_weights`: a timm state dict file);
    image_tower_kwargs: extra timm kwargs (e.g. depth, embed_dim for tiny tests).
    text_tower: "ours" (needs vocab_size; text_tower_kwargs override OUR_TEXT_DEFAULTS) or a local Hugging
    Face BERT/RoBERTa folder (weights loaded offline; vocab_size, if given, is checked against it).
    max_text_len: the longest tokenized text (position table of our tower; checked for an HF tower).
    """
    drop_path = drop_path_rate
    image_kwargs = dict(image_tower_kwargs or {})
    if drop_path:
        image_kwargs.setdefault("drop_path_rate", drop_path)
    image_cfg = {"name": image_tower, "img_size": int(img_size), "kwargs": image_kwargs,
                 "weights": str(image_tower_weights) if image_tower_weights else None}
    image, image_keys = _image_tower(image_cfg, image_tower_weights)
    image_cfg["width"] = int(getattr(image, "head_hidden_size", image.num_features))
    if text_tower == OURS:
        if vocab_size is None:
            raise ValueError("our text tower needs vocab_size (the tokenizer's)")
        text_cfg = {"kind": OURS, "vocab_size": int(vocab_size), "max_len": int(max_text_len),
                    "drop_path": float(drop_path), **OUR_TEXT_DEFAULTS, **(text_tower_kwargs or {})}
        text, text_keys = _our_text_tower(text_cfg), []
    else:
        text_cfg = {"kind": "hf", "path": str(text_tower)}
        text, text_keys = _hf_text_tower(text_cfg, load_weights=True)
        hf_config = text.model.config
        text_cfg.update(hf_config=json.loads(hf_config.to_json_string()), model_type=hf_config.model_type,
                        width=text.width)
        if vocab_size is not None and vocab_size > hf_config.vocab_size:
            raise UserError(f"--text_tower {text_tower}: the tokenizer has {vocab_size} tokens but the model's "
                            f"embedding table only {hf_config.vocab_size}; use the folder's own tokenizer")
        limit = _max_positions(hf_config)
        if limit is not None and max_text_len > limit:
            raise UserError(f"--max_text_len {max_text_len} exceeds the {limit} positions of --text_tower "
                            f"{text_tower}")
    patch = getattr(getattr(image, "patch_embed", None), "patch_size", None)
    config = {"kind": KIND, "name": KIND, "embed_dim": int(embed_dim), "itc_loss": itc_loss,
              "img_size": int(img_size), "patch_size": int(patch[0]) if patch else None,
              "drop_path_rate": float(drop_path), "image": image_cfg, "text": text_cfg}
    return DualEncoder(config, image, text, image_keys + text_keys)


def _our_text_tower(cfg):
    return OurTextTower(cfg["vocab_size"], cfg["width"], cfg["depth"], cfg["heads"], cfg["mlp_ratio"],
                        cfg["max_len"], cfg["drop_path"], cfg["layer_scale_init"])


def is_dual_encoder_config(config):
    return isinstance(config, dict) and config.get("kind") == KIND


def dual_encoder_from_config(config):
    """Rebuild the architecture saved as a checkpoint's model_config (random weights: load the checkpoint's
    state dict next). Neither the image weights file nor the HF folder is read; an HF tower needs
    `transformers`. pretrained_keys is kept empty: on resume the checkpoint's provided_keys say it."""
    if not is_dual_encoder_config(config):
        raise UserError(f"model_config of kind {config.get('kind') if isinstance(config, dict) else None!r} is not "
                        f"a {KIND}")
    image, _ = _image_tower(config["image"])
    text = _our_text_tower(config["text"]) if config["text"]["kind"] == OURS else \
        _hf_text_tower(config["text"], load_weights=False)[0]
    return DualEncoder(config, image, text)


def same_architecture(a, b):
    """True if two dual-encoder configs describe the same tensors (paths of weights may differ)."""
    def arch(c):
        text = {k: v for k, v in c["text"].items() if k not in ("path", "drop_path", "hf_config")}
        if "hf_config" in c["text"]:  # file metadata (_name_or_path, versions) aside
            text["hf_config"] = {k: v for k, v in c["text"]["hf_config"].items()
                                 if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
        image = {k: v for k, v in c["image"].items() if k != "weights"}
        image["kwargs"] = {k: v for k, v in image["kwargs"].items() if k != "drop_path_rate"}
        return c["embed_dim"], c["itc_loss"], image, text
    return arch(a) == arch(b)


def load_dual_encoder_weights(model, state_dict, path, flag="--resume", ckpt_config=None):
    """Weights-only initialisation (e.g. a previous dual-encoder run): copy tensors of matching names and shapes.
    Projections of another embed dim are dropped; any other shape mismatch is refused. Returns a report like
    models.loading.load_pretrained_weights: {"loaded", "resized" (always empty), "dropped", "unused", "missing"}."""
    if is_dual_encoder_config(ckpt_config) and not same_architecture(ckpt_config, model.config):
        raise UserError(f"{flag} {path}: a dual encoder of another architecture (image "
                        f"{ckpt_config['image']['name']}, text {ckpt_config['text']['kind']}); check --image_tower, "
                        "--text_tower and their kwargs")
    lora = sorted(k for k in state_dict if ".lora_" in k)
    if lora:
        raise UserError(f"{flag} {path}: holds unmerged LoRA adapters ({lora[0]}, ...); merge them first with "
                        "`python util/merge_lora.py`")
    own = model.state_dict()
    report = {"loaded": [], "resized": [], "dropped": [], "unused": sorted(k for k in state_dict if k not in own)}
    to_load = {}
    for k in sorted(set(state_dict) & set(own)):
        if state_dict[k].shape == own[k].shape:
            to_load[k] = state_dict[k]
        elif k.startswith(("itc_image_proj.", "itc_text_proj.")):
            report["dropped"].append(k)
        else:
            raise UserError(f"{flag} {path}: tensor {k} has shape {tuple(state_dict[k].shape)} but the model expects "
                            f"{tuple(own[k].shape)}")
    if not to_load:
        raise UserError(f"{flag} {path}: none of its {len(state_dict)} tensors belong to this dual encoder")
    model.load_state_dict(to_load, strict=False)
    report["loaded"] = sorted(to_load)
    report["missing"] = sorted(k for k in own if k not in to_load)
    return report
