"""LiT with --lit_cache through the real entry point: the locked tower's embeddings are computed once, and the
run then equals the online LiT run (whole, unflipped images: a deterministic training view; the locked tower in
eval mode, so drop path elsewhere does not vary its embeddings);
a stale cache is refused with one line; a killed build resumes at its missing chunks and a resumed run equals
the uninterrupted one bitwise."""
import os
import shutil

import pytest
import torch

import main_pretrain_cook
from models.registry import create_model
from run_helpers import load_ckpt, read_jsonl

TOLERANCE = 1e-4  # weights: batched matmuls of other batch compositions differ in the last bits (fp32 CPU)


@pytest.fixture(scope="module")
def weights(demo_data, tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("lit")
    paths = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = create_model("vlmo_tiny_patch16", vocab_size=tiny_tokenizer.vocab_size)
        paths[seed] = str(root / f"init{seed}.pth")
        torch.save({"model": m.state_dict(), "model_config": m.config}, paths[seed])
    return paths


def _argv(demo, out, weights, extra=()):
    return ["--mode", "image_text_itc", "--model", "vlmo_tiny_patch16", "--data_path", str(demo["pairs_train"]),
            "--val_data_path", str(demo["pairs_val"]), "--tokenizer", str(demo["tokenizer"]), "--resume", weights,
            "--lock_image", "--itc_crop_min_scale", "1", "--batch_size", "8", "--epochs", "2", "--lr", "1e-3",
            "--warmup_epochs", "0.5", "--drop_path", "0.1", "--num_workers", "0", "--log_freq", "2",
            "--lit_cache_chunk", "16", "--output_dir", str(out), *extra]  # 48 pairs: 3 chunks


def _final(out, epoch=2):
    ckpt = load_ckpt(out / f"checkpoint-{epoch}.pth")
    return ckpt["model"], [r for r in read_jsonl(out / "log.jsonl") if r["split"] == "val"][-1]


def test_cached_run_equals_the_online_run(demo_data, weights, tmp_path):
    cache = tmp_path / "cache"
    assert main_pretrain_cook.main(_argv(demo_data, tmp_path / "online", weights[0])) == 0
    assert main_pretrain_cook.main(_argv(demo_data, tmp_path / "cached", weights[0], ["--lit_cache", str(cache)])) == 0
    (online, m_online), (cached, m_cached) = _final(tmp_path / "online"), _final(tmp_path / "cached")
    worst = max((online[k] - cached[k]).abs().max().item() for k in online)
    assert worst < TOLERANCE, worst
    print(f"online vs cached: max weight difference {worst:.2e}")
    for k in ("i2t_r1", "t2i_r1", "i2t_r10", "r_mean"):
        assert abs(m_online[k] - m_cached[k]) < 1e-3, (k, m_online[k], m_cached[k])
    assert sorted(os.listdir(cache)) == ["bad-0000000000.json", "bad-0000000016.json", "bad-0000000032.json",
                                         "emb-0000000000.npy", "emb-0000000016.npy", "emb-0000000032.npy", "meta.json"]

    # a killed build (one chunk missing) resumes: only that chunk is rebuilt, the run is the same bitwise
    os.remove(cache / "emb-0000000016.npy")
    stamp = os.path.getmtime(cache / "emb-0000000000.npy")
    assert main_pretrain_cook.main(_argv(demo_data, tmp_path / "rebuilt", weights[0],
                                         ["--lit_cache", str(cache), "--save_per_epochs", "1"])) == 0
    assert os.path.getmtime(cache / "emb-0000000000.npy") == stamp and (cache / "emb-0000000016.npy").exists()
    rebuilt, _ = _final(tmp_path / "rebuilt")
    assert all(torch.equal(rebuilt[k], cached[k]) for k in cached)

    # a run killed after epoch 1 (its epoch-1 checkpoint as the latest) resumes to the uninterrupted result bitwise
    part = tmp_path / "resumed"
    part.mkdir()
    shutil.copy(tmp_path / "rebuilt" / "checkpoint-1.pth", part / "checkpoint-latest.pth")
    assert main_pretrain_cook.main(_argv(demo_data, part, weights[0], ["--lit_cache", str(cache)])) == 0
    resumed, _ = _final(part)
    assert all(torch.equal(resumed[k], cached[k]) for k in cached)


def test_stale_cache_and_bad_settings_are_one_line(demo_data, weights, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main_pretrain_cook.main(_argv(demo_data, tmp_path / "a", weights[0],
                                         ["--lit_cache", str(cache), "--epochs", "1"])) == 0
    capsys.readouterr()
    cases = {"other weights": (["--resume", weights[1]], "built for other image-tower weights"),
             "other preprocessing": (["--image_norm", "imagenet"], "built for other image-tower weights"),
             "no lock": (["--lock_image_off"], "needs --lock_image"),
             "random crop": (["--itc_crop_min_scale", "0.5"], "--itc_crop_min_scale 1")}
    for name, (extra, message) in cases.items():
        argv = _argv(demo_data, tmp_path / name.replace(" ", "_"), weights[0], ["--lit_cache", str(cache), *extra])
        if extra == ["--lock_image_off"]:
            argv = [a for a in argv if a not in ("--lock_image", "--lock_image_off")]
        with pytest.raises(SystemExit) as e:
            main_pretrain_cook.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, (name, err)


def test_two_ranks_build_the_cache_together_and_train_as_one(demo_data, weights, tmp_path):
    """Sharded build (chunks dealt over 2 gloo ranks, then a barrier) and training on 2 ranks x 4 = 1 rank x 8."""
    from run_helpers import run_entry

    same = ["--epochs", "1", "--drop_path", "0"]  # drop path draws per-rank masks: off to compare world sizes
    one = _argv(demo_data, tmp_path / "one", weights[0], ["--lit_cache", str(tmp_path / "c1"), *same])
    two = _argv(demo_data, tmp_path / "two", weights[0], ["--lit_cache", str(tmp_path / "c2"), *same,
                                                           "--batch_size", "4"])
    assert main_pretrain_cook.main(one) == 0
    proc = run_entry("main_pretrain_cook.py", two, nproc=2)
    log = proc.stdout + proc.stderr
    assert "lit cache: 48 embeddings written" in log and "chunk 2/2 of this rank" in log  # rank 0: chunks 0 and 2
    for name in ("emb-0000000000.npy", "emb-0000000016.npy", "emb-0000000032.npy", "meta.json"):
        assert (tmp_path / "c2" / name).exists()
    a, b = _final(tmp_path / "one", 1)[0], _final(tmp_path / "two", 1)[0]
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < TOLERANCE, worst
