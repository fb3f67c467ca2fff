"""CLIP and SigLIP losses: against plain single-process formulas, and 2 ranks (gloo) against
1 rank on the concatenated batch (gradients of encoder weights, logit scale and bias after
DDP-style averaging; tolerance 1e-5 relative, fp32)."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from models.contrastive import clamp_logit_scale_, clip_loss, siglip_loss
from util.gather import all_gather_with_grad

TOL = dict(rtol=1e-5, atol=1e-6)


def plain_clip(img, txt, t):
    """Mean over rows of -log softmax at the diagonal, both directions, averaged; loops."""
    n, s = img.shape[0], t.exp()
    i2t = t2i = 0.0
    for i in range(n):
        row = torch.stack([s * (img[i] * txt[j]).sum() for j in range(n)])
        col = torch.stack([s * (txt[i] * img[j]).sum() for j in range(n)])
        i2t = i2t - (row[i] - torch.logsumexp(row, 0))
        t2i = t2i - (col[i] - torch.logsumexp(col, 0))
    return 0.5 * (i2t / n + t2i / n)


def plain_siglip(img, txt, t, b):
    """-(1/n) * sum over all n x n pairs of log sigmoid(z * (exp(t) x.y + b)); loops."""
    n, total = img.shape[0], 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = t.exp() * (img[i] * txt[j]).sum() + b
            total = total + torch.log(torch.sigmoid(z * logit))
    return -total / n


def _features(seed, n=6, d=5):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def test_clip_matches_plain_formula_and_gradients():
    img, txt = _features(0)
    t = torch.tensor(math.log(1 / 0.07))
    leaves = [x.clone().requires_grad_() for x in (img, txt, t)]
    ref_leaves = [x.clone().requires_grad_() for x in (img, txt, t)]
    out = clip_loss(*leaves)
    ref = plain_clip(*ref_leaves)
    torch.testing.assert_close(out["loss"], ref, **TOL)
    out["loss"].backward()
    ref.backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, **TOL)
    assert out["chance_loss"].item() == pytest.approx(math.log(6))
    assert out["temperature"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert not any(v.requires_grad for k, v in out.items() if k != "loss")


def test_siglip_matches_plain_formula_and_gradients():
    img, txt = _features(1)
    t, b = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    leaves = [x.clone().requires_grad_() for x in (img, txt, t, b)]
    ref_leaves = [x.clone().requires_grad_() for x in (img, txt, t, b)]
    out = siglip_loss(*leaves)
    ref = plain_siglip(*ref_leaves)
    torch.testing.assert_close(out["loss"], ref, **TOL)
    out["loss"].backward()
    ref.backward()
    for a, b_ in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b_.grad, **TOL)
    assert out["logit_bias"].item() == -10.0
    assert out["temperature"].item() == pytest.approx(10.0)


def test_accuracies_count_matched_pairs():
    # texts 0..3 match their images exactly; texts 4 and 5 are swapped
    img, _ = _features(2)
    txt = img[[0, 1, 2, 3, 5, 4]]
    for out in (clip_loss(img, txt, torch.tensor(2.0)),
                siglip_loss(img, txt, torch.tensor(2.0), torch.tensor(0.0))):
        assert out["i2t_acc"].item() == pytest.approx(4 / 6)
        assert out["t2i_acc"].item() == pytest.approx(4 / 6)


def test_clamp_logit_scale():
    p = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale_(p)
    assert p.item() == pytest.approx(math.log(100))
    p.data.fill_(-1.0)
    clamp_logit_scale_(p)
    assert p.item() == 0.0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grads(loss_name, x_img, x_txt, w_img, w_txt, t, b):
    """Loss and gradients of a tiny dual encoder (one Linear per tower) on the given rows."""
    params = [p.clone().requires_grad_() for p in (w_img, w_txt, t, b)]
    img = F.normalize(x_img @ params[0], dim=-1)
    txt = F.normalize(x_txt @ params[1], dim=-1)
    if loss_name == "clip":
        out = clip_loss(img, txt, params[2])
    else:
        out = siglip_loss(img, txt, params[2], params[3])
    out["loss"].backward()
    return out, [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def _global_problem(world, batch):
    g = torch.Generator().manual_seed(3)
    n = world * batch
    return (torch.randn(n, 7, generator=g), torch.randn(n, 6, generator=g),
            torch.randn(7, 5, generator=g), torch.randn(6, 5, generator=g),
            torch.tensor(math.log(10.0)), torch.tensor(-5.0))


def _worker(rank, world, batch, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        x_img, x_txt, *weights = _global_problem(world, batch)
        rows = slice(rank * batch, (rank + 1) * batch)
        results = {}
        for name in ("clip", "siglip"):
            out, grads = _grads(name, x_img[rows], x_txt[rows], *weights)
            for gr in grads:  # what DDP does to parameter gradients
                dist.all_reduce(gr)
                gr /= world
            means = {k: out[k].detach().clone() for k in ("loss", "i2t_acc", "t2i_acc")}
            for v in means.values():  # the mean over ranks is the global-batch value
                dist.all_reduce(v)
                v /= world
            results[name] = {"grads": grads, **means}
        # the gathered rows are in rank order and carry this rank's own features
        x = torch.full((batch, 2), float(rank), requires_grad=True)
        gathered = all_gather_with_grad(x)
        results["gather_rows"] = gathered.detach()[:, 0]
        (gathered * (rank + 1)).sum().backward()  # d/dx summed over ranks: 1 + 2 = 3
        results["gather_grad"] = x.grad
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_rank_on_concatenated_batch(tmp_path, monkeypatch):
    world, batch = 2, 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(world, batch, _free_port(), str(tmp_path)), nprocs=world)
    x_img, x_txt, *weights = _global_problem(world, batch)
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name in ("clip", "siglip"):
            ref_out, ref_grads = _grads(name, x_img, x_txt, *weights)
            torch.testing.assert_close(res[name]["loss"], ref_out["loss"].detach(), **TOL)
            names = ["w_img", "w_txt", "logit_scale", "logit_bias"][:4 if name == "siglip" else 3]
            for i, pname in enumerate(names):
                torch.testing.assert_close(res[name]["grads"][i], ref_grads[i], **TOL,
                                           msg=f"{name} {pname} gradient differs")
            for acc in ("i2t_acc", "t2i_acc"):
                torch.testing.assert_close(res[name][acc], ref_out[acc], **TOL)
        assert res["gather_rows"].tolist() == [0.0] * batch + [1.0] * batch
        assert torch.equal(res["gather_grad"], torch.full((batch, 2), 3.0))
