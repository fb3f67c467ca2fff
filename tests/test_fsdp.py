"""--fsdp (FSDP2 on 2 gloo ranks) against DDP on the same global batch; sharded (DCP) checkpoints: a preempted
run resumes bitwise with --resume auto, a sharded checkpoint resumes in one unsharded process, the conversion to
one file and back is exact, a damaged shard falls back to the kept copy, a failed write leaves the previous
checkpoint intact."""
import errno
import os
import shutil
import signal
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.registry import create_model  # noqa: E402
from run_helpers import (finish, load_ckpt, logged_steps, make_caption_data, run_entry, start_entry,  # noqa: E402
                         wait_for)
from util import convert_dcp  # noqa: E402
from util.errors import WriteFailed  # noqa: E402
from util.resume import plan_resume  # noqa: E402
from util.sharded_checkpoint import CHECKSUMS, LATEST_SHARDED, load_sharded, save_sharded  # noqa: E402

# fp32 on CPU: sharding changes the summation order of the reductions (and of the gradient norm), nothing else.
ATOL = 2e-5
STEPS = 16  # 64 captions / global batch 8, 2 epochs
TORCHRUN_SIGNALS = ["--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("fsdp_data"))


def make_data(root):
    """Captions (9 held out: an FSDP evaluation of 3 and 2 batches per rank) and weights for LoRA to adapt."""
    data = make_caption_data(str(root / "captions"), n_train=64, n_val=9)
    from custom_datasets.tokenizer import load_tokenizer
    torch.manual_seed(3)
    weights = create_model("vlmo_tiny_patch16", vocab_size=load_tokenizer(data["tokenizer"]).vocab_size).state_dict()
    data["weights"] = str(root / "pretrained.pth")
    torch.save({"model": {k: v for k, v in weights.items() if not k.startswith("mlm_head")}}, data["weights"])
    return data


def _mlm_args(data, out, batch, accum, extra=()):
    """LoRA on loaded weights (frozen and trainable tensors in one block), a self-regularization weight large
    enough to matter, gradient clipping; drop path off, so runs with other micro-batches can be compared."""
    return ["--exp_name", "text_mlm", "--model", "vlmo_tiny_patch16", "--data_path", data["train"],
            "--val_data_path", data["val"], "--tokenizer", data["tokenizer"], "--batch_size", str(batch),
            "--accum_iter", str(accum), "--epochs", "2", "--warmup_epochs", "0.5", "--lr", "2e-3", "--drop_path", "0",
            "--num_workers", "0", "--log_freq", "2", "--lora_rank", "4", "--self_regularization", "--reg_loss_weight",
            "3e4", "--clip_grad", "1.0", "--resume", data["weights"], "--output_dir", out, *extra]


def _as_file(folder, dst):
    assert convert_dcp.main(["--src", folder, "--dst", dst]) == 0
    return load_ckpt(dst)


def _assert_states(a, b, atol=0.0):
    assert a["global_step"] == b["global_step"] == STEPS and set(a["model"]) == set(b["model"])
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=atol, rtol=0, msg=k)
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"])
    for i, sa in a["optimizer"]["state"].items():
        for k in sa:
            torch.testing.assert_close(sa[k], b["optimizer"]["state"][i][k], atol=atol, rtol=0, msg=f"{i} {k}")


def max_differences(a, b):
    """(largest |a - b| over the model tensors, over the optimizer state tensors) of two single-file checkpoints."""
    model = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in b["model"])
    opt = max((sa[k].float() - b["optimizer"]["state"][i][k].float()).abs().max().item()
              for i, sa in a["optimizer"]["state"].items() for k in sa)
    return model, opt


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    return mlm_runs(data, tmp_path_factory.mktemp("fsdp_runs"))


def mlm_runs(data, root):
    """DDP at batch 4 per rank, FSDP at 2 x 2 accumulation steps per rank: the same global batch of 8."""
    ddp, fsdp = str(root / "ddp"), str(root / "fsdp")
    merged = ["--save_merged_lora_model"]
    run_entry("main_pretrain_cook.py", _mlm_args(data, ddp, 4, 1, merged), nproc=2)
    proc = run_entry("main_pretrain_cook.py", _mlm_args(data, fsdp, 2, 2, ["--fsdp", "--save_per_epochs", "1", *merged]),
                     nproc=2)
    return {"ddp": load_ckpt(os.path.join(ddp, "checkpoint-latest.pth")), "fsdp_dir": fsdp, "fsdp_log": proc.stdout,
            "fsdp": _as_file(os.path.join(fsdp, LATEST_SHARDED), str(root / "fsdp.pth")), "root": root,
            "merged": [load_ckpt(os.path.join(d, "checkpoint-merged.pth")) for d in (ddp, fsdp)]}


def test_fsdp_equals_ddp_on_the_same_global_batch(runs):
    assert "FSDP: 2 blocks and the root sharded" in runs["fsdp_log"]
    assert sorted(os.listdir(os.path.join(runs["fsdp_dir"], LATEST_SHARDED))) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp", CHECKSUMS, "state.pth"]  # every rank wrote its shards
    _assert_states(runs["fsdp"], runs["ddp"], ATOL)
    lora_b = [k for k in runs["ddp"]["model"] if k.endswith("lora_B")]
    assert lora_b and max(runs["ddp"]["model"][k].abs().max() for k in lora_b) > 100 * ATOL  # training moved them
    ddp_merged, fsdp_merged = runs["merged"]  # --save_merged_lora_model gathers the sharded weights
    assert not any("lora_" in k for k in fsdp_merged["model"]) and set(fsdp_merged["model"]) == set(ddp_merged["model"])
    for k, v in ddp_merged["model"].items():
        torch.testing.assert_close(fsdp_merged["model"][k], v, atol=ATOL, rtol=0, msg=k)


def test_fsdp_itc_with_accumulation_equals_one_process(demo_data, tmp_path):
    """SigLIP: the scalar temperature and bias stay whole (averaged once per step), the accumulation's feature
    cache runs outside the root's forward, clipping is on by default (and must see every gradient after an
    evaluation before the first step); zero-shot evaluation on every rank; FSDP after activation checkpointing
    and compile (aot_eager). The reference is one process on the whole batch (equal to DDP:
    tests/test_itc_accumulation.py)."""
    ddp, fsdp, held = itc_runs(demo_data, tmp_path)
    for k in ddp["model"]:
        torch.testing.assert_close(fsdp["model"][k], ddp["model"][k], atol=ATOL, rtol=0, msg=k)
    assert abs(float(ddp["model"]["logit_bias"]) - float(fsdp["model"]["logit_bias"])) < ATOL
    assert held[0] == held[1] and "zeroshot_top1" in held[0][0]


def itc_runs(d, tmp_path):
    """(1-process checkpoint, FSDP checkpoint as one file, [each run's held-out lines]) of SigLIP at a global batch
    of 8, one epoch."""
    common = ["--exp_name", "image_text_itc", "--model", "vlmo_tiny_patch16", "--data_path", str(d["pairs_train"]),
              "--val_data_path", str(d["pairs_val"]), "--zeroshot_data_path", str(d["images_val"]),
              "--zeroshot_classnames", str(d["classnames"]), "--zeroshot_templates", str(d["templates"]),
              "--tokenizer", str(d["tokenizer"]), "--epochs", "1", "--warmup_epochs", "0.5", "--lr", "1e-3",
              "--drop_path", "0", "--num_workers", "0", "--log_freq", "2", "--itc_loss", "siglip", "--eval_first"]
    run_entry("main_pretrain_cook.py", [*common, "--batch_size", "8", "--output_dir", str(tmp_path / "ddp")])
    run_entry("main_pretrain_cook.py", [*common, "--batch_size", "2", "--accum_iter", "2", "--fsdp", "--grad_checkpointing",
                                        "--compile", "aot_eager", "--output_dir", str(tmp_path / "fsdp")], nproc=2)
    ddp = load_ckpt(str(tmp_path / "ddp" / "checkpoint-latest.pth"))
    fsdp = _as_file(str(tmp_path / "fsdp" / LATEST_SHARDED), str(tmp_path / "fsdp.pth"))
    lines = [(tmp_path / run / "console.log").read_text().splitlines() for run in ("ddp", "fsdp")]
    held = [[ln.split("held-out after epoch 1: ")[1] for ln in log if "held-out after epoch 1" in ln] for log in lines]
    return ddp, fsdp, held


def test_a_preempted_fsdp_run_resumes_bitwise_with_resume_auto(data, runs, tmp_path):
    out = str(tmp_path / "run")
    args = _mlm_args(data, out, 2, 2, ["--fsdp", "--save_per_epochs", "1"])
    args[args.index("--resume") + 1] = "auto"
    args += ["--log_freq", "1"]
    args_weights = [*args[:args.index("--resume")], "--resume", data["weights"], *args[args.index("--resume") + 2:]]
    proc = start_entry("main_pretrain_cook.py", args_weights, nproc=2, launcher=TORCHRUN_SIGNALS)
    assert wait_for(proc, lambda: logged_steps(out) >= 3), "the run ended before the signal"
    os.kill(proc.pid, signal.SIGTERM)
    output = finish(proc, timeout=120)
    assert "checkpoint-latest.dcp holds global step" in output, output[-3000:]
    saved = load_sharded(os.path.join(out, LATEST_SHARDED))
    assert 3 <= saved["global_step"] < STEPS and saved["rng"] and len(saved["rng"]) == 2
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    proc = run_entry("main_pretrain_cook.py", args, nproc=2, launcher=TORCHRUN_SIGNALS)
    assert f"global step {saved['global_step']}" in proc.stdout
    _assert_states(_as_file(os.path.join(out, LATEST_SHARDED), str(tmp_path / "resumed.pth")), runs["fsdp"])


def test_a_sharded_checkpoint_resumes_in_one_unsharded_process(data, runs, tmp_path):
    """Written by 2 FSDP ranks at the end of epoch 1, continued by 1 process without --fsdp (DCP reshards; the
    effective batch is kept through --accum_iter)."""
    continued, log = unsharded_continuation(data, runs, tmp_path)
    assert "--accum_iter 2 -> 4 keeps the effective batch" in log
    _assert_states(continued, runs["fsdp"], ATOL)


def unsharded_continuation(data, runs, tmp_path):
    kept = os.path.join(runs["fsdp_dir"], "checkpoint-1.dcp")
    assert load_sharded(kept)["global_step"] == STEPS // 2
    one = str(tmp_path / "one")
    args = _mlm_args(data, one, 2, 2)
    args[args.index("--resume") + 1] = kept
    proc = run_entry("main_pretrain_cook.py", args)
    return load_ckpt(os.path.join(one, "checkpoint-latest.pth")), proc.stdout


def test_conversion_round_trips_exactly(runs, tmp_path):
    for start in ("ddp", "fsdp"):
        src = str(tmp_path / f"{start}.pth")
        torch.save(runs[start], src)
        folder, back = str(tmp_path / f"{start}.dcp"), str(tmp_path / f"{start}_back.pth")
        assert convert_dcp.main(["--src", src, "--dst", folder]) == 0
        again = _as_file(folder, back)
        _assert_states(again, runs[start])
        for k in runs[start]:
            if k not in ("model", "optimizer", "rng", "checksum"):
                assert again[k] == runs[start][k], k
        assert torch.equal(again["rng"][1]["torch"], runs[start]["rng"][1]["torch"])


def test_a_damaged_shard_falls_back_to_the_kept_copy(runs, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(runs["fsdp_dir"], out)
    shard = os.path.join(out, LATEST_SHARDED, "__1_0.distcp")
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    plan = plan_resume(out, "auto", "text_mlm")
    assert plan.kind == "train" and plan.path == os.path.join(out, "checkpoint-2.dcp")
    os.remove(os.path.join(out, "checkpoint-2.dcp", ".metadata"))
    assert plan_resume(out, "auto", "text_mlm").path == os.path.join(out, "checkpoint-1.dcp")


def test_a_failed_sharded_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / LATEST_SHARDED)
    state = {"model": {"w": torch.arange(6.0)}, "optimizer": {"state": {}, "param_groups": []}, "epoch": 1,
             "global_step": 5}
    save_sharded(state, path, distributed=False)
    import torch.distributed.checkpoint as dcp

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(WriteFailed, match=f"no space left on device writing {path}"):
        save_sharded({**state, "global_step": 6}, path, distributed=False)
    assert sorted(os.listdir(tmp_path)) == [LATEST_SHARDED]  # no partial folder
    assert load_sharded(path)["global_step"] == 5


if __name__ == "__main__":  # the figures: python tests/test_fsdp.py
    import pathlib
    import tempfile

    import conftest

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        made = make_data(root)
        (root / "mlm").mkdir()
        mlm = mlm_runs(made, root / "mlm")
        print("max |FSDP - DDP| (model, optimizer state), 2 gloo ranks, fp32:")
        print("  text_mlm, LoRA + self-regularization + clipping, FSDP 2 x 2 accumulation vs DDP 4: %.2e, %.2e"
              % max_differences(mlm["fsdp"], mlm["ddp"]))
        from custom_datasets.demo_data import make_demo_data
        demo = make_demo_data(root / "demo", **conftest.DEMO_TEST_SIZES)
        (root / "itc").mkdir()
        ddp, fsdp, _ = itc_runs(demo, root / "itc")
        print("  SigLIP image_text_itc, FSDP 2 x 2 accumulation vs 1 process at 8: %.2e, %.2e" % max_differences(fsdp, ddp))
        continued, _ = unsharded_continuation(made, mlm, root)
        print("  epoch 2 continued in 1 unsharded process from the 2-rank sharded epoch-1 folder vs the 2-rank "
              "run: %.2e, %.2e" % max_differences(continued, mlm["fsdp"]))
