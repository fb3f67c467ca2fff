"""--compile: each block compiled (after activation checkpointing) gives the eager outputs and gradients; text
batches bucketed to a multiple of 8 tokens do not recompile per step; one inductor smoke run end to end."""
import pytest
import torch
import torch._dynamo

from custom_datasets.masking_generator import masked_positions
from models.checkpointing import apply_block_options
from models.registry import create_model
from modes.base import pretrain_model

TOL = dict(atol=1e-5, rtol=1e-4)  # aot_eager runs the same ops; reordered reductions differ in the last bits


def _mlm_batch(length, b=4, vocab=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    positions, count = masked_positions(labels != -100)
    return {"text_ids": ids, "text_masks": torch.ones_like(ids), "text_labels": labels, "mlm_positions": positions,
            "mlm_count": count}


def _image_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[:, :2] = True
    positions, count = masked_positions(mask)
    return {"images": torch.randn(2, 3, 32, 32, generator=g), "bool_masked_pos": mask, "mim_positions": positions,
            "mim_count": count, "mim_labels": torch.randint(0, 8192, (2, 4), generator=g)}


def _step(mode, batch, checkpointing, backend):
    torch.manual_seed(0)
    m = create_model("vlmo_tiny_patch16", vocab_size=60, drop_path_rate=0.0).train()
    apply_block_options(m, checkpointing, backend, log=lambda *_: None)
    out = pretrain_model(m, mode)(batch)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,checkpointing", [("text_mlm", 0), ("image_mim", 1)])
def test_compiled_blocks_equal_eager(mode, checkpointing):
    torch._dynamo.reset()
    batch = _mlm_batch(16) if mode == "text_mlm" else _image_batch()
    eager_loss, eager = _step(mode, batch, checkpointing, None)
    loss, grads = _step(mode, batch, checkpointing, "aot_eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the blocks did compile
    torch.testing.assert_close(loss, eager_loss, **TOL)
    assert grads.keys() == eager.keys()
    for n in eager:
        torch.testing.assert_close(grads[n], eager[n], **TOL, msg=n)


def test_bucketed_text_lengths_do_not_recompile_per_step():
    """Captions of 9..16 tokens pad to 16: after the first step every step reuses the compiled graphs."""
    from custom_datasets.tokenizer import pad_batch

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = create_model("vlmo_tiny_patch16", vocab_size=60).train()
    apply_block_options(m, 0, "aot_eager", log=lambda *_: None)
    step = pretrain_model(m, "text_mlm")
    compiled = []
    for length in range(9, 17):
        ids, masks = pad_batch([[2] + [7] * (length - 2) + [3]] * 4, 0, 196)
        assert ids.shape[1] == 16
        batch = _mlm_batch(16)
        batch.update(text_ids=ids, text_masks=masks)
        step(batch)["loss"].backward()
        compiled.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert compiled[0] > 0 and compiled[-1] == compiled[0], compiled


def test_inductor_smoke(demo_data, tmp_path):
    """The real entry point with --compile (inductor): a text_mlm epoch runs and logs a finite loss."""
    import main_pretrain_cook
    from run_helpers import read_jsonl

    torch._dynamo.reset()
    argv = ["--mode", "text_mlm", "--model", "vlmo_tiny_patch16", "--data_path", str(demo_data["captions_train"]),
            "--tokenizer", str(demo_data["tokenizer"]), "--batch_size", "64", "--epochs", "1", "--num_workers", "0",
            "--compile", "--output_dir", str(tmp_path / "run")]
    assert main_pretrain_cook.main(argv) == 0
    rows = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["split"] == "train"]
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
