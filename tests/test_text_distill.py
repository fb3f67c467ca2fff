"""text_distill through the real entry point on tiny data: a student in a mechanically translated vocabulary
learns to match a frozen teacher's text embeddings; the image path stays the teacher's bit for bit; the saved
model embeds images and target-language text through the embedding API; 2 ranks equal 1 rank on the same global
batch (contrastive loss, gathered with gradients); bad inputs are one line."""
import csv
import json

import pytest
import torch

from custom_datasets.parallel_text import ParallelTextDataset
from models.registry import create_model
from run_helpers import load_ckpt, read_jsonl, run_entry

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def translate(text):
    """A fixed word mapping into another 'language': every word reversed and suffixed."""
    return " ".join(w[::-1] + "ka" for w in text.lower().strip(".").split())


@pytest.fixture(scope="module")
def distill(demo_data, tiny_tokenizer, tmp_path_factory):
    """Paths: teacher checkpoint, target-language vocab, parallel train/val CSVs, translated zero-shot files."""
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    teacher = create_model("vlmo_tiny_patch16", vocab_size=tiny_tokenizer.vocab_size)
    d = {"teacher": str(root / "teacher.pth")}
    torch.save({"model": teacher.state_dict(), "model_config": teacher.config, "tokenizer": tiny_tokenizer.to_state(),
                "image_preprocess": {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                     "crop_pct": 1.0}}, d["teacher"])
    words = set()
    for split in ("train", "val"):
        rows = list(csv.DictReader(open(demo_data[f"pairs_{split}"], encoding="utf-8")))
        d[split] = str(root / f"parallel_{split}.csv")
        with open(d[split], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["source", "target"])
            for r in rows:
                w.writerow([r["text"], translate(r["text"])])
                words.update(translate(r["text"]).split())
    names = [line.split("\t") for line in open(demo_data["classnames"], encoding="utf-8").read().splitlines()]
    templates = open(demo_data["templates"], encoding="utf-8").read().splitlines()
    d["classnames"], d["templates"] = str(root / "classnames.txt"), str(root / "templates.txt")
    open(d["classnames"], "w", encoding="utf-8").write("".join(f"{n[0]}\t{translate(n[-1])}\n" for n in names))
    open(d["templates"], "w", encoding="utf-8").write("".join(translate(t.replace("{}", "XX")).replace(
        translate("XX"), "{}") + "\n" for t in templates))
    for t in open(d["templates"], encoding="utf-8"):
        words.update(t.replace("{}", "").split())
    words.update(translate(n[-1]) for n in names)
    d["vocab"] = str(root / "vocab_target.txt")
    open(d["vocab"], "w", encoding="utf-8").write("\n".join(SPECIALS + sorted(w for ws in words for w in ws.split()))
                                                  + "\n")
    return d


def _argv(demo, d, out, extra=()):
    return ["--mode", "text_distill", "--model", "vlmo_tiny_patch16", "--distill_teacher", d["teacher"],
            "--tokenizer", d["vocab"], "--data_path", d["train"], "--val_data_path", d["val"],
            "--zeroshot_data_path", str(demo["images_val"]), "--zeroshot_classnames", d["classnames"],
            "--zeroshot_templates", d["templates"], "--batch_size", "8", "--epochs", "2", "--lr", "2e-3",
            "--warmup_epochs", "0.2", "--drop_path", "0", "--num_workers", "0", "--log_freq", "2",
            "--output_dir", str(out), *extra]


def test_student_matches_the_teacher_and_keeps_its_image_path(demo_data, distill, tmp_path):
    import main_pretrain_cook
    from inference import load_model

    out = tmp_path / "run"
    assert main_pretrain_cook.main(_argv(demo_data, distill, out, ["--distill_loss", "both"])) == 0
    ckpt, teacher = load_ckpt(out / "checkpoint-2.pth"), torch.load(distill["teacher"], weights_only=True)
    image_keys = [k for k in teacher["model"] if k.startswith(("patch_embed.", "cls_token", "image_pos_embed",
                                                               "itc_image_proj.")) or "mlp_imag" in k
                  or ".attn.qkv." in k or k.endswith(("attn.relative_position_bias_table", "norm1.weight"))
                  or k == "norm.weight"]
    for k in image_keys:
        assert torch.equal(ckpt["model"][k], teacher["model"][k]), k
    vocab = sum(1 for _ in open(distill["vocab"], encoding="utf-8"))
    assert ckpt["model"]["text_embeddings.word_embeddings.weight"].shape[0] == vocab
    assert ckpt["tokenizer"]["vocab"].split() == open(distill["vocab"], encoding="utf-8").read().split()
    log = read_jsonl(out / "log.jsonl")
    train = [r for r in log if r["split"] == "train"]
    assert train[-1]["mse_loss"] < 0.5 * train[0]["mse_loss"] and train[-1]["cos"] > train[0]["cos"]
    val = [r for r in log if r["split"] == "val"]
    assert len(val) == 2 and "zeroshot_top1" in val[-1] and val[-1]["distill_mse"] < val[0]["distill_mse"]
    # the saved model: the teacher's image embeddings, target-language text through its own tokenizer
    emb = load_model(str(out / "checkpoint-2.pth"), device="cpu")
    images = torch.rand(2, 3, 32, 32)
    t_model = create_model("vlmo_tiny_patch16", vocab_size=teacher["model_config"]["vocab_size"])
    t_model.load_state_dict(teacher["model"])
    with torch.no_grad():
        torch.testing.assert_close(emb.model.encode_image(images), t_model.eval().encode_image(images))
    assert emb.encode_text([translate("a red circle")]).shape == (1, 64)


def test_two_ranks_equal_one_rank_on_the_same_global_batch(demo_data, distill, tmp_path):
    common = ["--distill_loss", "contrastive", "--epochs", "1", "--zeroshot_data_path", ""]
    run_entry("main_pretrain_cook.py", _argv(demo_data, distill, tmp_path / "one", common + ["--batch_size", "8"]))
    run_entry("main_pretrain_cook.py", _argv(demo_data, distill, tmp_path / "two", common + ["--batch_size", "4"]),
              nproc=2)
    one, two = (load_ckpt(tmp_path / n / "checkpoint-1.pth")["model"] for n in ("one", "two"))
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-5, worst
    moved = torch.load(distill["teacher"], weights_only=True)["model"]["blocks.0.mlp_text.fc1.weight"]
    assert not torch.equal(one["blocks.0.mlp_text.fc1.weight"], moved)


def test_parallel_files_in_every_format(tmp_path):
    pairs = [("a red circle", "elcric der aka"), ("two squares", "owt serauqs")]
    (tmp_path / "p.tsv").write_text("source\ttarget\n" + "".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs),
                                      encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"source": [s for s, _ in pairs], "target": [t for _, t in pairs]}), tmp_path / "p.parquet")
    for ext in ("tsv", "jsonl", "parquet"):
        ds = ParallelTextDataset(str(tmp_path / f"p.{ext}"))
        assert [(ds[i]["source"], ds[i]["target"]) for i in range(len(ds))] == pairs


def test_bad_inputs_are_one_line(demo_data, distill, tmp_path, capsys):
    import main_pretrain_cook

    cases = {"no teacher": (["--distill_teacher", ""], "--distill_teacher"),
             "missing teacher": (["--distill_teacher", str(tmp_path / "nope.pth")], "file not found"),
             "other model": (["--model", "vlmo_small_patch16"], "--model vlmo_tiny_patch16"),
             "contrastive with accumulation": (["--distill_loss", "contrastive", "--accum_iter", "2"],
                                               "--accum_iter 2")}
    for name, (extra, message) in cases.items():
        with pytest.raises(SystemExit) as e:
            main_pretrain_cook.main(_argv(demo_data, distill, tmp_path / name.replace(" ", "_"), extra))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, (name, err)


def test_dual_encoder_teacher_and_a_hugging_face_student(demo_data, distill, tiny_tokenizer, tmp_path):
    """A dual-encoder teacher (timm ViT + our text tower) and a local Hugging Face BERT student: the saved model
    is the teacher's image tower and projection plus the BERT tower, and its image embeddings are the teacher's."""
    import main_pretrain_cook
    from test_dual_encoder import IMG, VIT, _tiny_bert_folder

    _tiny_bert_folder(tmp_path / "bert", tiny_tokenizer.tokens)
    torch.manual_seed(0)
    teacher = create_model("dual_encoder", image_tower=VIT, text_tower="ours", embed_dim=16, img_size=32,
                           vocab_size=tiny_tokenizer.vocab_size, max_text_len=32, image_tower_kwargs=IMG,
                           text_tower_kwargs={"width": 32, "depth": 1, "heads": 2})
    path = tmp_path / "dual_teacher.pth"
    torch.save({"model": teacher.state_dict(), "model_config": teacher.config, "tokenizer": tiny_tokenizer.to_state()},
               path)
    out = tmp_path / "run"
    argv = [a for a in _argv(demo_data, distill, out, ["--epochs", "1", "--zeroshot_data_path", ""])
            if a not in ("--tokenizer", distill["vocab"])]
    argv[argv.index("vlmo_tiny_patch16")] = "dual_encoder"
    argv[argv.index(distill["teacher"])] = str(path)
    assert main_pretrain_cook.main(argv + ["--text_tower", str(tmp_path / "bert"), "--max_text_len", "32"]) == 0
    ckpt = load_ckpt(out / "checkpoint-1.pth")
    assert ckpt["model_config"]["text"]["kind"] == "hf" and ckpt["model_config"]["image"]["name"] == VIT
    for k, v in teacher.state_dict().items():
        if k.startswith(("image_tower.", "itc_image_proj.")):
            assert torch.equal(ckpt["model"][k], v), k
