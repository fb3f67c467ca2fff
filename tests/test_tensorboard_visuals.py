"""TensorBoard gets pictures where a person would rather look: image_mim panels (input, masked input, and the
reconstruction or the dVAE token maps) and retrieval examples (images and their top-3 captions)."""
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main_pretrain_cook
from models.embeddings import patchify
from modes.image_mim import mim_panels
from util.eval_visuals import SHOWN


def _events(out):
    acc = EventAccumulator(str(out), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _run(demo_data, out, mode, data, val, extra=()):
    argv = ["--exp_name", mode, "--model", "vlmo_tiny_patch16", "--data_path", str(data), "--val_data_path",
            str(val), "--tokenizer", str(demo_data["tokenizer"]), "--batch_size", "8", "--epochs", "1",
            "--warmup_epochs", "0", "--num_workers", "0", "--output_dir", str(out), *extra]
    assert main_pretrain_cook.main(argv) == 0


def test_image_mim_writes_input_masked_and_reconstruction_panels(demo_data, tmp_path):
    _run(demo_data, tmp_path, "image_mim", demo_data["images_train"], demo_data["images_val"],
         ["--mim_target", "pixel"])
    acc = _events(tmp_path)
    (tag,) = acc.Tags()["images"]
    assert tag.startswith("val/mim/input_masked_reconstruction")
    image = acc.Images(tag)[-1]
    assert (image.width, image.height) == (SHOWN * (3 * 32 + 2 * 2), 32)  # the panels side by side


def test_image_text_itc_writes_retrieval_images_and_top3_captions(demo_data, tmp_path, capsys):
    _run(demo_data, tmp_path, "image_text_itc", demo_data["pairs_train"], demo_data["pairs_val"])
    printed = capsys.readouterr().out
    assert "evaluating 16 held-out items: batch 1/2" in printed and "evaluated 16 held-out items" in printed
    acc = _events(tmp_path)
    assert any(t.startswith("val/retrieval/images") for t in acc.Tags()["images"])
    (text_tag,) = [t for t in acc.Tags()["tensors"] if "top3_captions" in t]
    text = acc.Tensors(text_tag)[-1].tensor_proto.string_val[0].decode()
    assert text.count("**image") == SHOWN and text.count("1. ") == SHOWN


def test_dvae_panels_show_target_and_predicted_token_maps():
    torch.manual_seed(0)
    images, patch = torch.randn(6, 3, 32, 32), 8
    mask = torch.rand(6, 16) < 0.5
    targets = torch.randint(0, 8192, (6, 16))
    logits = torch.full((int(mask.sum()), 8192), -10.0)
    logits[torch.arange(len(logits)), targets[mask]] = 10.0  # a perfect prediction
    (panel,) = mim_panels(images, mask, logits, patch, [0.5] * 3, [0.5] * 3, targets, 8192).values()
    assert panel.shape == (SHOWN, 3, 32, 4 * 32 + 3 * 2) and 0 <= panel.min() and panel.max() <= 1
    target_map, predicted_map = panel[..., 2 * 34:2 * 34 + 32], panel[..., 3 * 34:3 * 34 + 32]
    assert torch.equal(target_map, predicted_map)  # perfect predictions: the maps agree
    pixels = mim_panels(images, mask, patchify(images, patch)[mask] * 0, patch, [0.5] * 3, [0.5] * 3)
    assert next(iter(pixels.values())).shape == (SHOWN, 3, 32, 3 * 32 + 2 * 2)
