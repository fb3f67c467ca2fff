"""Image-text contrastive losses (CLIP softmax, SigLIP sigmoid) across ranks.

Each rank holds a local batch of B pairs; W ranks make a global batch of G = W * B. Features are
gathered with gradients (util.gather) and each rank computes the loss of its OWN rows against
all G columns, with its positives at columns arange(B) + B * rank. Each per-rank loss L_r is
normalised by the local row count B, so that the mean of L_r over ranks is the single-process
loss on the global batch and DDP's gradient averaging gives the single-process gradient.

Features arrive L2-normalised; the similarity matrix is computed in float32 because logits
reach +-100 (CLIP) and bf16 would round them to steps of 0.5.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from util.gather import all_gather_with_grad


def _rank_world(gather: bool):
    if gather and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gathered(x: torch.Tensor, world: int) -> torch.Tensor:
    return all_gather_with_grad(x) if world > 1 else x


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.detach().argmax(dim=1) == labels).float().mean()


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
              gather: bool = True) -> dict:
    """CLIP (InfoNCE) loss of this rank's rows.

    Args:
        img, txt: [B, D] L2-normalised local features, row i of each is a pair.
        logit_scale: scalar log-temperature parameter t; logits are exp(t) * cosine.
        gather: gather features over the process group (when one is initialised).
    Returns dict:
        loss: 0.5 * (mean over local rows i of CE(image i -> all G texts, label i + B*rank)
              + mean over local rows i of CE(text i -> all G images, same label)).
        i2t_acc, t2i_acc: in-batch top-1 accuracy of the local rows over the G columns.
        temperature: exp(t). chance_loss: ln(G), the loss of uniform logits.
    Diagnostics are detached 0-dim tensors (no host sync here).
    """
    rank, world = _rank_world(gather)
    batch = img.shape[0]
    # gather in the features' own dtype (half the traffic under bf16), then compute in fp32
    all_img, all_txt = _gathered(img, world).float(), _gathered(txt, world).float()
    img, txt = img.float(), txt.float()
    scale = logit_scale.float().exp()
    logits_i2t = scale * img @ all_txt.t()          # [B, G]
    logits_t2i = scale * txt @ all_img.t()          # [B, G]
    labels = torch.arange(batch, device=img.device) + batch * rank
    loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
    return {
        "loss": loss,
        "i2t_acc": _accuracy(logits_i2t, labels),
        "t2i_acc": _accuracy(logits_t2i, labels),
        "temperature": scale.detach(),
        "chance_loss": img.new_full((), math.log(batch * world), dtype=torch.float32),
    }


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, gather: bool = True) -> dict:
    """SigLIP (pairwise sigmoid) loss of this rank's rows.

    Args:
        img, txt: [B, D] L2-normalised local features.
        logit_scale: scalar t' (logits are exp(t') * cosine + b); logit_bias: scalar b.
    Returns dict:
        loss: L_r = -(1/B) * sum over local images i and all G texts j of
              log sigmoid(z_ij * (exp(t') * x_i . y_j + b)), z_ij = +1 iff j == i + B*rank.
              Summed over ranks the pairs cover the G x G matrix once, so mean_r L_r equals the
              one-process loss -(1/G) * sum over G x G pairs (a sum per row, not a mean over G^2).
        i2t_acc, t2i_acc, temperature (exp(t')), logit_bias: detached diagnostics.
    Only text features need gradients through the gather; images are gathered detached, for the
    text-to-image accuracy alone.
    """
    rank, world = _rank_world(gather)
    batch = img.shape[0]
    all_txt = _gathered(txt, world).float()
    img, txt = img.float(), txt.float()
    scale, bias = logit_scale.float().exp(), logit_bias.float()
    logits = scale * img @ all_txt.t() + bias       # [B, G]
    labels = torch.arange(batch, device=img.device) + batch * rank
    signs = -torch.ones_like(logits)
    signs[torch.arange(batch, device=img.device), labels] = 1.0
    loss = -F.logsigmoid(signs * logits).sum() / batch
    with torch.no_grad():
        all_img = _gathered(img.detach(), world)  # already fp32 here
        logits_t2i = txt.detach() @ all_img.t()     # ranking only: scale and bias don't change it
    return {
        "loss": loss,
        "i2t_acc": _accuracy(logits, labels),
        "t2i_acc": _accuracy(logits_t2i, labels),
        "temperature": scale.detach(),
        "logit_bias": bias.detach().clone(),  # a copy: detach() alone would show the value after the step
        "chance_loss": img.new_full((), siglip_chance_loss(batch * world), dtype=torch.float32),
    }


def siglip_chance_loss(global_batch: int) -> float:
    """The SigLIP loss (per row, as siglip_loss) of the best input-independent logits, sigmoid = 1/G for
    all G pairs of a row: ln G + (G - 1) ln(G / (G - 1)) (about ln G + 1); where a fresh run starts."""
    g = max(global_batch, 2)
    return math.log(g) + (g - 1) * math.log(g / (g - 1))


def siglip_prior_bias(global_batch: int) -> float:
    """The SigLIP bias at which a fresh model's loss matches the label prior of G pairs: -ln(G - 1).

    Why not the paper's fixed b = -10 (with t' = ln 10): at init the towers are unrelated, so the
    cross-modal cosines are ~0 and every logit is ~b. A row holds 1 positive and G - 1 negatives; the
    loss gradient on b is sum_j sigmoid(l_ij) - 1, zero (b the best constant predictor) where
    sigmoid(b) = 1/G, i.e. b = -ln(G - 1). That is the paper's value at the paper's batches
    (-ln(16383) = -9.7, -ln(32767) = -10.4), but -4.1 at G = 64: there b = -10 is ~6 units too low, the
    positives' term -log sigmoid(~-10) ~ 10 dominates the loss and its gradient (each negative weighs
    e^-10), so the features are only pulled together (every logit rising at once, towards collapse)
    while b moves about lr per Adam step (6 units take ~6000 steps at lr 1e-3): the plateau that
    open_clip's SigLIP shows at batch 64-256. Starting at the prior balances pull and push from the
    first step, at any G (G is the global batch the loss sees: batch x accum_iter x world size).
    """
    return -math.log(max(global_batch - 1, 1))


@torch.no_grad()
def clamp_logit_scale_(param: torch.Tensor, max: float = math.log(100)) -> torch.Tensor:
    """Clamp the CLIP log-temperature in place to [0, max] (call after each optimizer step)."""
    return param.clamp_(0.0, max)


def embedding_spread(x: torch.Tensor) -> torch.Tensor:
    """1 - the mean cosine similarity between distinct rows of L2-normalised x [B, D] (detached): 0 when
    every input gets the same embedding (a model that cannot leave the chance loss), ~1 for unrelated
    directions. O(B * D): ||sum x||^2 holds the B diagonal ones plus every off-diagonal pair."""
    x = x.detach().float()
    b = x.shape[0]
    if b < 2:
        return torch.ones((), device=x.device)
    total = x.sum(0).pow(2).sum()
    return 1.0 - (total - x.pow(2).sum()) / (b * (b - 1))


def contrastive_loss(model, img, txt, live_params=True, spreads=True):
    """The loss a model's config names (`itc_loss`: clip or siglip) with its temperature (and bias), plus (with
    `spreads`) the batch's embedding spread of each tower; with live_params False the temperature and bias
    enter as constants (no gradient reaches them: exact accumulation's cache pass)."""
    def param(p):
        return p if live_params else p.detach()
    if model.config["itc_loss"] == "clip":
        out = clip_loss(img, txt, param(model.logit_scale))
    else:
        out = siglip_loss(img, txt, param(model.logit_scale), param(model.logit_bias))
    if spreads:
        out["image_spread"], out["text_spread"] = embedding_spread(img), embedding_spread(txt)
    return out
