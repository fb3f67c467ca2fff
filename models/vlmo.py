"""VLMo-style multiway transformer: one stack of shared attention blocks, FFN routed by modality."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.embeddings import PatchEmbed, TextEmbeddings
from models.heads import MLMHead
from models.layers import trunc_normal_
from models.lora import LoRALinear, self_regularization_loss
from models.multiway_block import LayerNorm, MultiwayBlock
from models.relative_position import locality_prior

ITC_LOSSES = ("clip", "siglip")
ITC_POOLS = ("cls", "mean")
REL_POS_INITS = ("zero", "local")
# image_pos_embed is added to the patch tokens as config["image_pos_gain"] * parameter: the parameter starts at zero
# (a model loaded from BEiT, which has none, computes exactly BEiT's function) and learns at that multiple of the
# base rate (Adam moves a parameter ~lr per step whatever its gradient's scale; a zero start at the base rate
# stays ~0.1 against unit-scale patch tokens for hundreds of steps). The registry's default, 10, is also what a
# checkpoint without the key was made with; a fresh image_text_itc run takes its own
# (modes/image_text_itc.py:fresh_image_pos_gain).
MIM_TARGETS = ("dalle", "pixel")


class VLMo(nn.Module):
    """`config` is a plain dict (saved with checkpoints); see models/registry.py for the keys."""

    def __init__(self, config):
        super().__init__()
        self.config = dict(config)
        c = self.config
        if c["itc_loss"] not in ITC_LOSSES:
            raise ValueError(f"itc_loss must be one of {ITC_LOSSES}, got {c['itc_loss']!r}")
        if c["itc_pool"] not in ITC_POOLS:
            raise ValueError(f"itc_pool must be one of {ITC_POOLS}, got {c['itc_pool']!r}")
        if c["image_rel_pos_init"] not in REL_POS_INITS:
            raise ValueError(f"image_rel_pos_init must be one of {REL_POS_INITS}, got {c['image_rel_pos_init']!r}")
        if c["mim_target"] not in MIM_TARGETS:
            raise ValueError(f"mim_target must be one of {MIM_TARGETS}, got {c['mim_target']!r}")
        dim = c["embed_dim"]
        self.patch_size = c["patch_size"]
        self.patch_embed = PatchEmbed(c["img_size"], c["patch_size"], 3, dim)
        self.grid_hw = self.patch_embed.grid_hw
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Absolute position of each patch (config image_pos_embed; off in checkpoints that predate it): without it
        # the image path's only position signal is the zero-initialised relative bias, and a fresh model pools a
        # bag of patches (scripts/bench_itc_learning.py: 0.91 -> 0.97 zero-shot, open_clip 0.97).
        self.image_pos_embed = (nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, dim))
                                if c["image_pos_embed"] else None)
        # A LayerNorm over the image tokens (CLS and patches, positions added) before the first block (config
        # image_pre_norm, open_clip's ln_pre). Off in the registry and in BEiT/VLMo weights (which have none: a
        # loaded model keeps their function); a fresh image_text_itc model turns it on (ImageTextITC.
        # fresh_model_overrides), see there for the measurements.
        self.image_pre_norm = LayerNorm(dim) if c["image_pre_norm"] else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.text_embeddings = TextEmbeddings(c["vocab_size"], dim, c["max_text_len"], drop=c["drop_rate"],
                                              positions=c["text_pos"])
        # VLMo's modality embedding (config token_type_embed): row 0 added to every text token, row 1 to every
        # image token (CLS included), in the single-modality paths as in the fused one.
        self.token_type_embeddings = nn.Embedding(2, dim) if c["token_type_embed"] else None
        text_max_len = c["max_text_len"] if c["text_pos"] == "relative" else None
        dpr = [c["drop_path_rate"] * i / max(c["depth"] - 1, 1) for i in range(c["depth"])]
        self.blocks = nn.ModuleList([
            MultiwayBlock(dim, c["num_heads"], c["mlp_ratio"], c["ffn_layout"], has_vl_expert=i >= c["vl_start"],
                          grid_hw=self.grid_hw, drop=c["drop_rate"], drop_path=dpr[i],
                          layer_scale_init=c["layer_scale_init"], text_max_len=text_max_len)
            for i in range(c["depth"])])
        self.norm = LayerNorm(dim)
        self.mlm_head = MLMHead(dim, c["vocab_size"])
        mim_out = c["mim_vocab_size"] if c["mim_target"] == "dalle" else self.patch_size ** 2 * 3
        self.mim_head = nn.Linear(dim, mim_out)
        self.itc_image_proj = nn.Linear(dim, dim, bias=False)
        self.itc_text_proj = nn.Linear(dim, dim, bias=False)
        if c["itc_loss"] == "clip":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        else:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
            # The paper's b; a fresh run starts it at the prior of its global batch (modes/image_text_itc.py).
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        # Which modalities the LoRA adapters act on (LiT locks a tower: adapters then serve the other one only).
        self.lora_modalities = {"image", "text", "vl"}
        self.locked_towers = set()  # LiT: towers whose embeddings must not change (run under no_grad)
        self.reg_loss_weight = 0.0
        self.math_attention = False  # test oracle switch: plain softmax(QK^T)V instead of SDPA
        self._init_weights()

    def _init_weights(self):
        """Initialisation of a freshly built model (converted BEiT weights are loaded over it afterwards).

        Scaled so that every block changes the residual stream by O(1) at any width: the blocks' Linear layers
        (qkv, proj, fc1, fc2) draw from trunc-normal(std = fan_in^-0.5); the MLP outputs (every expert's fc2) are
        further divided by sqrt(2 * depth), the attention outputs (attn.proj) are not. Attention is what makes
        the CLS token depend on the other tokens: with attn.proj also divided (GPT-2's rule), a text [CLS]
        (a LayerNorm-ed, unit-scale constant, unlike the image's std-0.02 CLS token) barely moves at init (text
        spread 0.017 at 4 x 128), and a fresh SigLIP run could collapse to the constant-logit point in its first
        steps (scripts/bench_itc_learning.py, 4 x 128 SigLIP CLS, seed 2: zero-shot 0.537, step-0 gradient
        norm 406; with attn.proj at fan-in scale: 0.974, spread 0.086, gradient norm 70). The patch embedding is
        fan-in scaled too (patch tokens of unit scale, like the LayerNorm-ed text tokens); the ITC projections use
        CLIP's width^-0.5. Tokens, embedding tables and the MLM/MIM heads keep std 0.02; the image relative
        position tables start at zero (BEiT's) or, config image_rel_pos_init "local" (a fresh image_text_itc
        model), at models/relative_position.py:locality_prior; the text tables stay zero. BEiT's own init
        (std 0.02 everywhere, proj/fc2 divided by sqrt(2(i+1)), layer scale 0.1) leaves a 64-512 wide model's
        blocks adding ~1e-3 to a constant CLS token, so the CLS embedding is input-independent at init (mean
        cosine similarity of a batch's embeddings 0.9996 image, 1.0000 text) and CLS-pooled ITC sits at ln(batch)
        with zero gradient.
        The layer scale gammas start at config["layer_scale_init"] (set by MultiwayBlock), 1.0 in the registry:
        a fresh model learns best without attenuation (0.1, BEiT's value, cost ~10 points of zero-shot accuracy
        in scripts/bench_itc_learning.py); converted BEiT weights bring their own trained gammas.
        """
        fan_in_std = lambda w: w[0].numel() ** -0.5  # noqa: E731
        for p in (self.cls_token, self.mask_token):
            trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, LoRALinear)):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                trunc_normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        residual_scale = (2.0 * len(self.blocks)) ** -0.5
        for block in self.blocks:
            experts = [getattr(block, n) for n in ("mlp", "mlp_imag", "mlp_text", "mlp_vl") if hasattr(block, n)]
            for layer in [block.attn.qkv, block.attn.proj] + [e.fc1 for e in experts] + [e.fc2 for e in experts]:
                std = fan_in_std(layer.weight)
                trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            for layer in [e.fc2 for e in experts]:  # the MLP outputs only: see the docstring
                layer.weight.data.mul_(residual_scale)
        std = fan_in_std(self.patch_embed.proj.weight)
        trunc_normal_(self.patch_embed.proj.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.config["image_rel_pos_init"] == "local":
            prior = locality_prior(self.grid_hw, self.config["num_heads"])
            for block in self.blocks:
                block.attn.relative_position_bias_table.data.copy_(prior)
        for proj in (self.itc_image_proj, self.itc_text_proj):  # CLIP's init: std = width^-0.5
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)

    # ---- feature extractors (last block output, before the final norm) ----
    def _run_blocks(self, x, modality, attn_mask=None, text_len=None):
        use_lora = modality in self.lora_modalities
        for block in self.blocks:
            x = block(x, modality, attn_mask=attn_mask, use_lora=use_lora, text_len=text_len,
                      math_attention=self.math_attention)
        return x

    def _with_token_type(self, x, index):
        if self.token_type_embeddings is None:
            return x
        return x + self.token_type_embeddings.weight[index].type_as(x)

    def embed_image(self, images, bool_masked_pos=None):
        """images [B, 3, H, W] -> [B, 1+N, D] tokens entering the blocks (CLS first)."""
        x = self.patch_embed(images)
        if bool_masked_pos is not None:
            x = torch.where(bool_masked_pos.bool().unsqueeze(-1), self.mask_token.type_as(x), x)
        if self.image_pos_embed is not None:
            x = x + (self.config["image_pos_gain"] * self.image_pos_embed).type_as(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).type_as(x), x], dim=1)
        x = self._with_token_type(x, 1)
        return x if self.image_pre_norm is None else self.image_pre_norm(x)

    def embed_text(self, text_ids):
        """text_ids [B, L] -> [B, L, D] tokens entering the blocks."""
        return self._with_token_type(self.text_embeddings(text_ids), 0)

    def forward_image_features(self, images, bool_masked_pos=None):
        """images [B, 3, H, W], bool_masked_pos [B, N] or None -> [B, 1+N, D] (before the final norm)."""
        return self._run_blocks(self.embed_image(images, bool_masked_pos), "image")

    def forward_text_features(self, text_ids, text_masks):
        """text_ids [B, L], text_masks [B, L] (1 = token, 0 = pad) -> [B, L, D] (before the final norm)."""
        attn_mask = text_masks.bool()[:, None, None, :]
        return self._run_blocks(self.embed_text(text_ids), "text", attn_mask=attn_mask)

    def forward_fused_features(self, text_ids, text_masks, images):
        """One text+image sequence in VLMo's order -> [B, L + 1 + N, D] (before the final norm): the text
        (padded, [CLS] first) then the image's CLS and patches. Layers with a VL expert send every token to
        it; the others route the first L tokens to the text expert and the rest to the image expert."""
        text, image = self.embed_text(text_ids), self.embed_image(images)
        keep = torch.cat([text_masks.bool(), text_masks.new_ones(image.shape[:2]).bool()], dim=1)
        return self._run_blocks(torch.cat([text, image], dim=1), "vl", attn_mask=keep[:, None, None, :],
                                text_len=text.shape[1])

    def pooled_image(self, images):
        """[B, 3, H, W] -> [B, D]: the final-norm image CLS token (or the patch mean, itc_pool="mean")."""
        h = self.norm(self.forward_image_features(images))
        return h[:, 1:].mean(1) if self.config["itc_pool"] == "mean" else h[:, 0]

    def pooled_text(self, text_ids, text_masks):
        """[B, L] ids and mask -> [B, D]: the final-norm text CLS token (or the token mean)."""
        h = self.norm(self.forward_text_features(text_ids, text_masks))
        if self.config["itc_pool"] == "mean":
            w = text_masks.unsqueeze(-1).to(h.dtype)
            return (h * w).sum(1) / w.sum(1).clamp(min=1)
        return h[:, 0]

    def encode_image(self, images):
        """[B, 3, H, W] -> L2-normalised [B, D]: pooled_image through the contrastive projection."""
        return F.normalize(self.itc_image_proj(self.pooled_image(images)), dim=-1)

    def encode_text(self, text_ids, text_masks):
        """[B, L] ids and mask -> L2-normalised [B, D]: pooled_text through the contrastive projection."""
        return F.normalize(self.itc_text_proj(self.pooled_text(text_ids, text_masks)), dim=-1)

    # ---- regularisation (the training entry is modes/: PretrainModel(backbone, mode)) ----
    def self_regularization_loss(self):
        """reg_loss_weight * sum over adapted layers of sum((W0 * delta)^2)."""
        return self_regularization_loss(self)
