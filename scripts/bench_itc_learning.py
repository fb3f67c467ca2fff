"""Does image_text_itc learn from random initialisation like open_clip's CLIP of the same size? (a benchmark,
not a test).

Data: scikit-learn's bundled handwritten digits (1797 real 8x8 scans, offline), upscaled to --img_size RGB,
captioned with a few templates ("a photo of the digit seven", "a handwritten seven", ...); a fixed stratified
held-out split (30%). Both models are trained in the same run on the same batches and captions (same word-level
token ids: [CLS]=1 first, [EOT] = highest id last, so open_clip's argmax pooling finds it), with the same loss
code (models/contrastive.py), optimizer (AdamW with each codebase's own weight-decay groups, cosine schedule
with warmup), steps, batch and lr, and the CLIP temperature clamped to [0, ln 100] after each step for both.

Prints, per seed and averaged over --seeds:
  spread at init: 1 - mean off-diagonal cosine similarity of a training batch's normalised image (text)
                  embeddings (0 = every input gets the same embedding);
  zero-shot top-1 on the held-out digits (one prompt per class: "a photo of the digit {name}");
  retrieval R@1 (image->text, text->image) on the held-out digits with one caption each, a hit being a retrieved
                  item of the same digit (captions repeat across items, so exact-pair recall is ill-defined);
  and the ratio ours / open_clip.

Example (2 layers x 64 wide, patch 16, 64 px, batch 64, 330 steps; about a minute per seed on one core):
  OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_itc_learning.py --pool cls --loss clip --seeds 0 1 2
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.contrastive import clamp_logit_scale_, clip_loss, contrastive_loss, siglip_loss  # noqa: E402
from models.registry import create_model, model_options  # noqa: E402
from models.trainable import configure_trainable  # noqa: E402
from modes.image_text_itc import ImageTextITC  # noqa: E402
from util.optim_factory import param_groups  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}", "a handwritten {}", "the number {}", "a scan of a handwritten {}",
             "a picture of a {}", "the digit {} written by hand"]
PROMPT = "a photo of the digit {}"


class WordTokenizer:
    """Word-level ids: 0 pad, 1 [CLS] (first), words, and [EOT] (last, the highest id of the vocabulary)."""

    def __init__(self, texts):
        words = sorted({w for t in texts for w in t.split()})
        self.ids = {w: i + 2 for i, w in enumerate(words)}
        self.eot = len(words) + 2
        self.vocab_size = self.eot + 1
        self.max_len = max(len(t.split()) for t in texts) + 2

    def __call__(self, texts):
        ids = torch.zeros(len(texts), self.max_len, dtype=torch.long)
        for r, t in enumerate(texts):
            seq = [1] + [self.ids[w] for w in t.split()] + [self.eot]
            ids[r, :len(seq)] = torch.tensor(seq)
        return ids, (ids > 0).long()


def build_data(img_size):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0            # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)                                        # RGB, [-1, 1]
    y = torch.tensor(d.target)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.3, random_state=0, stratify=d.target)
    return x[tr], y[tr], x[te], y[te]


def captions(labels, gen):
    t = torch.randint(len(TEMPLATES), (len(labels),), generator=gen)
    return [TEMPLATES[int(k)].format(NAMES[int(c)]) for k, c in zip(t, labels)]


# ------------------------------------------------------------------ models


def build_ours(a, vocab_size, max_len):
    # what main_pretrain_cook does for a fresh model: the mode's fresh overrides, the SigLIP bias at the prior
    mode = ImageTextITC(argparse.Namespace(siglip_bias_init=a.siglip_bias_init, lr=a.lr))
    explicit = {k: v for k, v in (("layer_scale_init", a.layer_scale_init), ("image_pos_gain", a.image_pos_gain),
                                  ("image_pre_norm", None if a.image_pre_norm is None else bool(a.image_pre_norm)),
                                  ("image_rel_pos_init", a.image_rel_pos_init)) if v is not None}
    if a.arch == "dual_encoder":
        m = create_model("dual_encoder", image_tower="vit_tiny_patch16_224", text_tower="ours",
                         embed_dim=a.width, itc_loss=a.loss, img_size=a.img_size, vocab_size=vocab_size,
                         max_text_len=max_len,
                         image_tower_kwargs=dict(patch_size=a.patch, embed_dim=a.width, depth=a.depth,
                                                 num_heads=a.heads, **json.loads(a.image_tower_kwargs)),
                         text_tower_kwargs=dict(width=a.width, depth=a.depth, heads=a.heads))
    else:
        m = create_model("vlmo_tiny_patch16", embed_dim=a.width, depth=a.depth, num_heads=a.heads,
                         patch_size=a.patch, img_size=a.img_size, vocab_size=vocab_size, max_text_len=max_len,
                         vl_start=a.depth, itc_pool=a.pool, itc_loss=a.loss,
                         **mode.fresh_model_overrides(set(model_options("vlmo_tiny_patch16")) - set(explicit)),
                         **explicit)
    configure_trainable(m, "image_text_itc")
    mode.init_fresh(m, set(), a.batch)
    return m


class OpenCLIP(torch.nn.Module):
    """open_clip's CLIP with our encode_image/encode_text/loss interface. --open_clip_text ours swaps its text
    transformer for our dual encoder's text tower (models/dual_encoder.py:OurTextTower, our init, its [CLS]
    through a width^-0.5 projection), built after the rest so the image tower starts from the same draws as
    the plain open_clip run of the seed: a diagnostic of which tower carries a difference."""

    def __init__(self, a, vocab_size, max_len):
        super().__init__()
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        siglip = a.loss == "siglip"
        self.clip = CLIP(a.width,
                         vision_cfg=CLIPVisionCfg(layers=a.depth, width=a.width, head_width=a.width // a.heads,
                                                  patch_size=a.patch, image_size=a.img_size),
                         text_cfg=CLIPTextCfg(context_length=max_len, vocab_size=vocab_size, width=a.width,
                                              heads=a.heads, layers=a.depth),
                         init_logit_scale=math.log(10) if siglip else math.log(1 / 0.07),
                         init_logit_bias=a.oc_siglip_bias if siglip else None)
        self.loss = a.loss
        self.our_text = None
        if a.open_clip_text == "ours":
            from models.dual_encoder import OurTextTower

            del self.clip.transformer, self.clip.token_embedding, self.clip.ln_final
            self.clip.positional_embedding = self.clip.text_projection = None
            self.our_text = OurTextTower(vocab_size, a.width, a.depth, a.heads, max_len=max_len)
            self.our_text_proj = torch.nn.Linear(a.width, a.width, bias=False)
            torch.nn.init.normal_(self.our_text_proj.weight, std=a.width ** -0.5)

    def encode_image(self, images):
        return self.clip.encode_image(images, normalize=True)

    def encode_text(self, ids, masks):
        if self.our_text is not None:
            return F.normalize(self.our_text_proj(self.our_text(ids, masks)), dim=-1)
        return self.clip.encode_text(ids, normalize=True)

    @property
    def logit_scale(self):
        return self.clip.logit_scale

    def contrastive(self, img, txt):
        if self.loss == "clip":
            return clip_loss(img, txt, self.clip.logit_scale, gather=False)
        return siglip_loss(img, txt, self.clip.logit_scale, self.clip.logit_bias, gather=False)


def loss_of(model, img, txt):
    return model.contrastive(img, txt) if isinstance(model, OpenCLIP) else contrastive_loss(model, img, txt)


def optimizer(model, a):
    """AdamW with each codebase's own weight-decay groups: ours as main_pretrain_cook builds them
    (util/optim_factory.py), open_clip's as its training script does (no decay on tensors under 2-D, norms,
    biases and the logit scale)."""
    if isinstance(model, OpenCLIP):
        skip = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in trainable if not skip(n, p)], "weight_decay": a.wd},
                  {"params": [p for n, p in trainable if skip(n, p)], "weight_decay": 0.0}]
    else:
        groups = param_groups(model, a.wd)
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(step, a):
    warm = max(1, int(a.warmup * a.steps))
    if step < warm:
        return a.lr * (step + 1) / warm
    return 0.5 * a.lr * (1 + math.cos(math.pi * (step - warm) / max(1, a.steps - warm)))


# ------------------------------------------------------------------ measurements


def spread(x):
    """1 - mean off-diagonal cosine similarity of L2-normalised rows."""
    s = x @ x.t()
    n = x.shape[0]
    return 1.0 - ((s.sum() - s.diagonal().sum()) / (n * (n - 1))).item()


@torch.no_grad()
def evaluate(model, tok, xte, yte, gen):
    model.eval()
    img = torch.cat([model.encode_image(xte[i:i + 256]) for i in range(0, len(xte), 256)])
    cls_txt = model.encode_text(*tok([PROMPT.format(n) for n in NAMES]))
    zs = ((img @ cls_txt.t()).argmax(1) == yte).float().mean().item()
    caps = captions(yte, gen)
    txt = torch.cat([model.encode_text(*tok(caps[i:i + 256])) for i in range(0, len(caps), 256)])
    sim = img @ txt.t()
    i2t = (yte[sim.argmax(1)] == yte).float().mean().item()
    t2i = (yte[sim.argmax(0)] == yte).float().mean().item()
    model.train()
    return {"zero_shot": zs, "i2t_r1": i2t, "t2i_r1": t2i}


def train_pair(a, seed, data, tok):
    xtr, ytr, xte, yte = data
    models = {}
    torch.manual_seed(seed)
    models["ours"] = build_ours(a, tok.vocab_size, tok.max_len)
    if not a.skip_open_clip:
        torch.manual_seed(seed)
        models["open_clip"] = OpenCLIP(a, tok.vocab_size, tok.max_len)
    out = {k: {} for k in models}
    gen = torch.Generator().manual_seed(1000 + seed)
    probe = torch.randperm(len(xtr), generator=gen)[:a.batch]
    probe_ids = tok(captions(ytr[probe], gen))
    for k, m in models.items():
        m.eval()
        with torch.no_grad():
            out[k]["img_spread0"] = spread(m.encode_image(xtr[probe]))
            out[k]["txt_spread0"] = spread(m.encode_text(*probe_ids))
        m.train()
    opts = {k: optimizer(m, a) for k, m in models.items()}
    chance = math.log(a.batch)
    first_left = {k: None for k in models}
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(xtr), generator=gen), 0
    losses = {k: [] for k in models}
    max_gn = {k: 0.0 for k in models}
    for step in range(a.steps):
        if pos + a.batch > len(perm):
            perm, pos = torch.randperm(len(xtr), generator=gen), 0
        idx = perm[pos:pos + a.batch]
        pos += a.batch
        ids, masks = tok(captions(ytr[idx], gen))
        for k, m in models.items():
            for g in opts[k].param_groups:
                g["lr"] = lr_at(step, a)
            res = loss_of(m, m.encode_image(xtr[idx]), m.encode_text(ids, masks))
            opts[k].zero_grad(set_to_none=True)
            res["loss"].backward()
            params = [p for p in m.parameters() if p.requires_grad]
            gn = torch.nn.utils.clip_grad_norm_(params, a.clip_grad if a.clip_grad > 0 else float("inf")).item()
            max_gn[k] = max(max_gn[k], gn)
            opts[k].step()
            if a.loss == "clip":
                clamp_logit_scale_(m.logit_scale.data)
            loss = res["loss"].item()
            losses[k].append(loss)
            if a.loss == "clip" and first_left[k] is None and loss < 0.99 * chance:
                first_left[k] = step
            if a.log_every and (step % a.log_every == 0 or step == a.steps - 1):
                extra = f" bias {res['logit_bias'].item():.2f}" if "logit_bias" in res else ""
                print(f"  seed {seed} step {step:4d} {k:9s} loss {loss:.4f} gnorm {gn:.3f} "
                      f"T {res['temperature'].item():.2f}{extra}", flush=True)
    for k, m in models.items():
        out[k].update(evaluate(m, tok, xte, yte, torch.Generator().manual_seed(7)))
        out[k]["final_loss"] = float(np.mean(losses[k][-10:]))
        out[k]["left_chance_at"] = first_left[k]
        out[k]["max_grad_norm"] = max_gn[k]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="vlmo", choices=["vlmo", "dual_encoder"],
                   help="ours: the multiway model, or the dual encoder (timm ViT + our text tower)")
    p.add_argument("--pool", default="cls", choices=["cls", "mean"])
    p.add_argument("--loss", default="clip", choices=["clip", "siglip"])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--img_size", type=int, default=64)
    p.add_argument("--steps", type=int, default=330)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.1, help="warmup share of the steps")
    p.add_argument("--clip_grad", type=float, default=1.0,
                   help="max global grad norm (0: off), both models (1.0: image_text_itc's default)")
    p.add_argument("--siglip_bias_init", default="prior", help="ours: as image_text_itc's --siglip_bias_init")
    p.add_argument("--oc_siglip_bias", type=float, default=-10.0,
                   help="open_clip's SigLIP bias init (the paper's -10)")
    p.add_argument("--layer_scale_init", type=float, default=None,
                   help="ours (multiway model): layer scale init override (default: the registry's)")
    p.add_argument("--image_pos_gain", type=float, default=None,
                   help="ours (multiway model): image_pos_gain override (default: what a fresh run at --lr takes, "
                        "modes/image_text_itc.py:fresh_image_pos_gain)")
    p.add_argument("--image_pre_norm", type=int, default=None, choices=[0, 1],
                   help="ours (multiway model): 1/0 turns the LayerNorm before the first block on/off (default: what "
                        "a fresh run takes, modes/image_text_itc.py:FRESH_IMAGE_PATH)")
    p.add_argument("--image_rel_pos_init", default=None, choices=["zero", "local"],
                   help="ours (multiway model): the image relative position tables' init (default: what a fresh "
                        "run takes, modes/image_text_itc.py:FRESH_IMAGE_PATH)")
    p.add_argument("--image_tower_kwargs", default="{}", help="dual_encoder: extra timm kwargs (JSON)")
    p.add_argument("--skip_open_clip", action="store_true", help="train ours only (quick experiments)")
    p.add_argument("--open_clip_text", default="open_clip", choices=["open_clip", "ours"],
                   help="the open_clip model's text tower: its own, or (a diagnostic) our dual encoder's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--log_every", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data = build_data(a.img_size)
    tok = WordTokenizer([t.format(n) for t in TEMPLATES + [PROMPT] for n in NAMES])
    print(f"config: arch {a.arch} pool {a.pool} loss {a.loss} {a.depth}x{a.width} heads {a.heads} patch {a.patch} "
          f"img {a.img_size} steps {a.steps} batch {a.batch} lr {a.lr} wd {a.wd} clip_grad {a.clip_grad} "
          f"seeds {a.seeds} open_clip_text {a.open_clip_text}; train {len(data[0])} / held-out {len(data[2])} "
          f"digits; chance ln(B) {math.log(a.batch):.4f}", flush=True)
    keys = ["img_spread0", "txt_spread0", "final_loss", "zero_shot", "i2t_r1", "t2i_r1"]
    runs = []
    for seed in a.seeds:
        t0 = time.time()
        out = train_pair(a, seed, data, tok)
        runs.append(out)
        for k, r in out.items():
            print(f"seed {seed} {k:9s} " + " ".join(f"{m} {r[m]:.4f}" for m in keys) +
                  f" left_chance_at {r['left_chance_at']} max_gnorm {r['max_grad_norm']:.2f}", flush=True)
        if "open_clip" in out:
            print(f"seed {seed} ratio zero-shot ours/open_clip "
                  f"{out['ours']['zero_shot'] / max(out['open_clip']['zero_shot'], 1e-9):.3f}", flush=True)
        print(f"seed {seed} done in {time.time() - t0:.0f}s", flush=True)
    names = list(runs[0])
    mean = {k: {m: float(np.mean([r[k][m] for r in runs])) for m in keys} for k in names}
    for k in names:
        print(f"MEAN {k:9s} " + " ".join(f"{m} {mean[k][m]:.4f}" for m in keys))
    if "open_clip" not in mean:
        return
    print(f"MEAN ratio ours/open_clip: zero-shot {mean['ours']['zero_shot'] / max(mean['open_clip']['zero_shot'], 1e-9):.3f} "
          f"i2t {mean['ours']['i2t_r1'] / max(mean['open_clip']['i2t_r1'], 1e-9):.3f} "
          f"t2i {mean['ours']['t2i_r1'] / max(mean['open_clip']['t2i_r1'], 1e-9):.3f}")


if __name__ == "__main__":
    main()
