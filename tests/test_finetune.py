"""main_finetune.py end to end on the demo data: every task trains and `--eval` on its checkpoint reproduces
the logged metric; evaluation covers exactly the N items and agrees on 1 and 2 ranks; layer-wise lr decay;
the checkpoint's tokenizer and image preprocessing are inherited, and a mismatch warns loudly."""
import csv
import os
import shutil

import numpy as np
import pytest
import torch

import main_finetune
from custom_datasets.demo_data import SHAPES
from custom_datasets.image_dataset import IMAGE_NORMS, image_preprocess_state
from models.registry import create_model
from run_helpers import load_ckpt, read_jsonl, run_entry
from tasks.base import FinetuneModel, discard_pretraining_heads, set_trainable
from util.layer_decay import layer_decay_scale, layer_id_for
from util.optim_factory import build_adamw, param_groups

COMMON = ["--model", "vlmo_tiny_patch16", "--batch_size", "8", "--num_workers", "0", "--warmup_epochs", "0.5",
          "--log_freq", "2", "--blr", "1e-2", "--drop_path", "0.0"]


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _bag_of_words(text, dim=16):
    """A fixed 'text embedding' of a caption: the normalised sum of per-word random vectors."""
    v = sum(np.random.default_rng([sum(map(ord, w)), len(w)]).normal(size=dim) for w in text.strip(".").split())
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.fixture(scope="module")
def ft(demo_data, tiny_tokenizer, tmp_path_factory):
    """Paths: a pretraining checkpoint, text-classification CSVs and regression files made from the demo pairs."""
    root = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    model = create_model("vlmo_tiny_patch16", vocab_size=tiny_tokenizer.vocab_size)
    preprocess = image_preprocess_state(32, norm="clip", interpolation="bilinear", crop_pct=0.9)
    d = {"pretrain": str(root / "pretrain.pth"), "preprocess": preprocess, "tokenizer": str(demo_data["tokenizer"])}
    torch.save({"model": model.state_dict(), "model_config": model.config, "tokenizer": tiny_tokenizer.to_state(),
                "image_preprocess": preprocess, "epoch": 3, "mode": "image_text_itc"}, d["pretrain"])
    for split in ("train", "val"):
        rows = list(csv.DictReader(open(demo_data[f"pairs_{split}"], encoding="utf-8")))
        if split == "val":
            rows = rows[:15]  # odd: two ranks get shards of 8 and 7
        labels = [next(s for s in SHAPES if s in r["text"]) for r in rows]
        d[f"text_{split}"] = _write_csv(root / f"text_{split}.csv", ["text", "label"],
                                        [(r["text"], lab) for r, lab in zip(rows, labels)])
        paths = [os.path.relpath(os.path.join(demo_data["root"], r["image_path"]), root) for r in rows]
        d[f"reg_{split}"] = _write_csv(root / f"reg_{split}.csv", ["image_path"], [(p,) for p in paths])
        np.save(root / f"reg_{split}.npy", np.stack([_bag_of_words(r["text"]) for r in rows]))
        d[f"pairs_{split}"] = _write_csv(root / f"pairs_{split}.csv", ["text", "image_path"],
                                         [(r["text"], p) for r, p in zip(rows, paths)])
    return d


def task_data(task, demo_data, ft):
    return {
        "image_classification": ["--data_path", str(demo_data["images_train"].parent)],
        "text_classification": ["--data_path", ft["text_train"], "--val_data_path", ft["text_val"]],
        "image_text_retrieval": ["--data_path", ft["pairs_train"], "--val_data_path", ft["pairs_val"]],
        "image_regression": ["--data_path", ft["reg_train"], "--val_data_path", ft["reg_val"]],
    }[task]


EXTRA = {  # each task also exercises one option
    "image_classification": ["--mixup", "0.8", "--cutmix", "1.0", "--ema", "--ema_decay", "0.5", "--save_per_epochs",
                             "1", "--drop_path", "0.1"],
    "text_classification": ["--lora_rank", "4"],
    "image_text_retrieval": ["--layer_decay", "0.5"],
    "image_regression": ["--img_size", "48"],
}
MAIN_METRIC = {"image_classification": "acc1", "text_classification": "acc", "image_text_retrieval": "r_mean",
               "image_regression": "cos_sim"}


@pytest.fixture(scope="module")
def trained(demo_data, ft, tmp_path_factory):
    """task -> output folder of a 2-epoch fine-tuning run from the pretraining checkpoint (run on demand)."""
    done = {}

    def get(task):
        if task not in done:
            out = str(tmp_path_factory.mktemp(task))
            argv = ["--task", task, "--finetune", ft["pretrain"], "--epochs", "2", "--output_dir", out, *COMMON,
                    *task_data(task, demo_data, ft), *EXTRA[task]]
            assert main_finetune.main(argv) == 0
            done[task] = out
        return done[task]

    return get


@pytest.mark.parametrize("task", sorted(MAIN_METRIC))
def test_task_trains_and_eval_reproduces_logged_metric(task, trained, demo_data, ft, tmp_path):
    out = trained(task)
    val = read_jsonl(os.path.join(out, "log.jsonl"), "val")
    assert [r["epoch"] for r in val] == [1, 2] and read_jsonl(os.path.join(out, "log.jsonl"), "train")
    ckpt = load_ckpt(os.path.join(out, "checkpoint-latest.pth"))
    assert ckpt["task"] == task and ckpt["epoch"] == 2 and ckpt["mode"] == f"finetune:{task}"
    assert not any(k.startswith(("backbone.mlm_head", "backbone.mim_head")) for k in ckpt["model"])
    assert any(k.startswith("backbone.itc_image_proj") for k in ckpt["model"]) == (task == "image_text_retrieval")
    best = max(r[MAIN_METRIC[task]] for r in val)
    assert ckpt["best_metric"] == pytest.approx(best)
    assert load_ckpt(os.path.join(out, "checkpoint-best.pth"))["epoch"] == ckpt["best_epoch"]

    eval_out = str(tmp_path / "eval")
    argv = ["--task", task, "--eval", "--resume", os.path.join(out, "checkpoint-latest.pth"), "--output_dir",
            eval_out, *COMMON, *task_data(task, demo_data, ft)]
    assert main_finetune.main(argv) == 0
    (record,) = read_jsonl(os.path.join(eval_out, "log.jsonl"), "eval")
    logged = val[-1]
    metric_keys = [k for k in logged if k not in ("split", "global_step", "epoch", "time")]
    assert MAIN_METRIC[task] in metric_keys and record["n_items"] == logged["n_items"] > 0
    for k in metric_keys:
        assert record[k] == pytest.approx(logged[k], abs=1e-6), k
    if task == "image_classification":  # EMA weights are saved and evaluated too
        assert ckpt["model_ema"] is not None and "ema_acc1" in record
    if task == "text_classification":  # LoRA adapters travel in the checkpoint; --eval rebuilds them
        assert any(".lora_A" in k for k in ckpt["model"])
    if task == "image_regression":  # another image size: relative position tables resized from the 32 px grid
        assert ckpt["model_config"]["img_size"] == 48 and ckpt["image_preprocess"]["img_size"] == 48


def test_eval_covers_exactly_n_items_same_on_one_and_two_ranks(trained, demo_data, ft, tmp_path):
    ckpt = os.path.join(trained("image_text_retrieval"), "checkpoint-latest.pth")
    base = ["--task", "image_text_retrieval", "--eval", "--resume", ckpt, *COMMON, "--batch_size", "4",
            *task_data("image_text_retrieval", demo_data, ft)]
    records = {}
    for nproc in (1, 2):
        out = str(tmp_path / f"ranks{nproc}")
        if nproc == 1:
            assert main_finetune.main(base + ["--output_dir", out]) == 0
        else:
            run_entry("main_finetune.py", base + ["--output_dir", out], nproc=2)
        (records[nproc],) = read_jsonl(os.path.join(out, "log.jsonl"), "eval")
    assert records[1]["n_items"] == records[2]["n_items"] == 15  # shards of 8 and 7, batches of 4, 4 and 4, 3
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"):
        assert records[2][k] == pytest.approx(records[1][k], abs=1e-6), k  # recall counts: identical


def _image_model(depth_decay=0.5, lora_rank=0):
    from tasks.image_classification import ImageClassification

    backbone = create_model("vlmo_tiny_patch16", vocab_size=50)
    discard_pretraining_heads(backbone)
    task = ImageClassification(None, {"classes": ["a", "b", "c"], "nb_classes": 3})
    head = task.build_head(backbone)
    provided = [k for k in backbone.state_dict()] if lora_rank else []
    set_trainable(backbone, head, task, lora_rank, 1.0, provided)
    return FinetuneModel(backbone, head, task)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_layer_decay_groups_cover_each_trainable_parameter_once(lora_rank):
    model, decay, depth = _image_model(lora_rank=lora_rank), 0.5, 2
    groups = param_groups(model, 0.05, layer_decay_scale(depth, decay))
    names = [n for g in groups for n in g["param_names"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable) and len(names) == len(set(names))
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    expected_layer = {"backbone.patch_embed.proj.weight": 0, "backbone.cls_token": 0,
                      "backbone.blocks.0.norm1.weight": 1,
                      "backbone.blocks.0.attn.relative_position_bias_table": 1, "backbone.blocks.1.gamma_2": 2,
                      "backbone.norm.weight": 3, "head.weight": 3, "head.bias": 3}
    if lora_rank:  # provided weights frozen and adapted; adapters sit in their block
        expected_layer = {"backbone.blocks.0.attn.qkv.lora_A": 1, "backbone.blocks.1.mlp_imag.fc2.lora_B": 2,
                          "head.weight": 3}
        assert "backbone.blocks.0.attn.qkv.weight" not in scale
    for name, layer in expected_layer.items():
        assert scale[name] == pytest.approx(decay ** (depth + 1 - layer)), name
    assert {n for n in trainable if "text" in n or "mask_token" in n} == set()  # off the image path: frozen
    optimizer = build_adamw(model, 1.0, 0.05, lr_scale_of=layer_decay_scale(depth, decay))
    from util.lr_sched import set_lr
    set_lr(optimizer, 0.1)
    assert sorted({round(g["lr"], 9) for g in optimizer.param_groups}) == \
        sorted({round(0.1 * decay ** (depth + 1 - layer_id_for(n, depth)), 9) for n in trainable})
    assert layer_id_for("text_embeddings.word_embeddings.weight", 12) == 0
    assert layer_id_for("module.backbone.blocks.11.mlp_text.fc1.weight", 12) == 12
    assert layer_id_for("backbone.logit_scale", 12) == 13


def _swapped_vocab(src, dst):
    tokens = open(os.path.join(src, "vocab.txt"), encoding="utf-8").read().split("\n")
    i, j = len(tokens) - 3, len(tokens) - 4  # two ordinary tokens trade ids: same size, different ids
    tokens[i], tokens[j] = tokens[j], tokens[i]
    os.makedirs(dst, exist_ok=True)
    open(os.path.join(dst, "vocab.txt"), "w", encoding="utf-8").write("\n".join(tokens))
    return dst


def test_tokenizer_and_preprocessing_inherited_and_mismatch_warns(demo_data, ft, tiny_tokenizer, tmp_path):
    data = task_data("image_classification", demo_data, ft)
    quick = ["--task", "image_classification", "--finetune", ft["pretrain"], "--epochs", "1", *COMMON, *data,
             "--aa", "", "--reprob", "0"]
    out = str(tmp_path / "inherit")
    assert main_finetune.main(quick + ["--output_dir", out]) == 0
    ckpt = load_ckpt(os.path.join(out, "checkpoint-latest.pth"))
    assert ckpt["image_preprocess"] == ft["preprocess"] and ckpt["tokenizer"] == tiny_tokenizer.to_state()
    assert "WARNING" not in open(os.path.join(out, "console.log")).read()

    out = str(tmp_path / "mismatch")
    other = _swapped_vocab(ft["tokenizer"], str(tmp_path / "other_tokenizer"))
    assert main_finetune.main(quick + ["--output_dir", out, "--image_norm", "imagenet", "--interpolation", "bicubic",
                                       "--tokenizer", other]) == 0
    console = open(os.path.join(out, "console.log")).read()
    assert console.count("!!! WARNING") == 2 and "!" * 100 in console
    assert "image preprocessing differs" in console and "normalisation" in console and "interpolation" in console
    assert "--tokenizer differs" in console
    ckpt = load_ckpt(os.path.join(out, "checkpoint-latest.pth"))  # the command line's values were used and saved
    assert ckpt["image_preprocess"]["mean"] == pytest.approx(list(IMAGE_NORMS["imagenet"][0]))
    assert ckpt["image_preprocess"]["interpolation"] == "bicubic" and ckpt["image_preprocess"]["crop_pct"] == 0.9
    assert ckpt["tokenizer"] != tiny_tokenizer.to_state()


def test_bad_checkpoints_are_refused_with_one_line(demo_data, ft, tiny_tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    vocab = tiny_tokenizer.vocab_size
    narrow = create_model("vlmo_tiny_patch16", vocab_size=vocab, embed_dim=32)
    shared = create_model("vlmo_tiny_patch16", vocab_size=vocab, ffn_layout="shared")
    sd = create_model("vlmo_tiny_patch16", vocab_size=vocab).state_dict()
    sd["blocks.0.attn.qkv.lora_A"] = torch.zeros(2, 64)
    cases = {"narrow.pth": ({"model": narrow.state_dict(), "model_config": narrow.config}, [], "embed_dim=32"),
             "shared.pth": ({"model": shared.state_dict(), "model_config": shared.config},
                            ["--ffn_layout", "multiway"], "ffn_layout='shared'"),
             "lora.pth": ({"model": sd}, [], "unmerged LoRA")}
    data = task_data("text_classification", demo_data, ft) + ["--tokenizer", ft["tokenizer"]]
    for name, (obj, extra, message) in cases.items():
        torch.save(obj, tmp_path / name)
        argv = ["--task", "text_classification", "--finetune", str(tmp_path / name), "--epochs", "1",
                "--output_dir", str(tmp_path / name[:-4]), *COMMON, *data, *extra]
        with pytest.raises(SystemExit) as e:
            main_finetune.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    # a pretraining checkpoint passed as --resume is not a fine-tuning state: pointed to --finetune
    with pytest.raises(SystemExit):
        main_finetune.main(["--task", "text_classification", "--resume", ft["pretrain"], "--output_dir",
                            str(tmp_path / "r"), *COMMON, *data])
    assert "--finetune" in capsys.readouterr().err


def test_resume_from_epoch_one_matches_the_uninterrupted_run(trained, demo_data, ft, tmp_path):
    """Optimizer, EMA, best metric and RNG state travel in the checkpoint; data randomness is keyed."""
    task, out = "image_classification", trained("image_classification")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copyfile(os.path.join(out, "checkpoint-1.pth"), resumed / "checkpoint-latest.pth")
    argv = ["--task", task, "--finetune", ft["pretrain"], "--epochs", "2", "--output_dir", str(resumed), *COMMON,
            *task_data(task, demo_data, ft), *EXTRA[task]]
    assert main_finetune.main(argv) == 0
    (again,) = read_jsonl(str(resumed / "log.jsonl"), "val")
    assert again == {**read_jsonl(os.path.join(out, "log.jsonl"), "val")[-1], "time": again["time"]}
    a, b = load_ckpt(os.path.join(out, "checkpoint-latest.pth")), load_ckpt(str(resumed / "checkpoint-latest.pth"))
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["best_metric"] == b["best_metric"]


def test_requeued_run_continues_from_its_own_checkpoint(trained, demo_data, ft):
    out = trained("text_classification")
    argv = ["--task", "text_classification", "--finetune", ft["pretrain"], "--epochs", "2", "--output_dir", out,
            *COMMON, *task_data("text_classification", demo_data, ft), *EXTRA["text_classification"]]
    assert main_finetune.main(argv) == 0
    console = open(os.path.join(out, "console.log")).read()  # appended by the second run
    assert f"resuming this run from {os.path.join(out, 'checkpoint-latest.pth')}" in console
    assert "nothing to do: the checkpoint is at epoch 2 of 2" in console


def test_issue_command_lines_parse(ft, tmp_path):
    argv = ("--task image_classification --model vlmo_base_patch16 --finetune {ckpt} --data_path {data} "
            "--nb_classes 1000 --batch_size 64 --epochs 100 --blr 5e-4 --layer_decay 0.65 --drop_path 0.1 --mixup 0.8 "
            "--cutmix 1.0 --smoothing 0.1 --lora_rank 0").format(ckpt=ft["pretrain"], data=tmp_path).split()
    args = main_finetune.resolve_run_args(main_finetune.parse_args(argv), world_size=8)
    assert args.lr == pytest.approx(5e-4 * 64 * 8 / 256) and args.layer_decay == 0.65 and args.nb_classes == 1000
    assert (args.mixup, args.cutmix, args.smoothing, args.drop_path, args.lora_rank) == (0.8, 1.0, 0.1, 0.1, 0)
    args = main_finetune.parse_args(["--task", "image_classification", "--eval", "--resume", ft["pretrain"]])
    assert args.eval and args.resume == ft["pretrain"]
    with pytest.raises(Exception, match="--task"):
        main_finetune.parse_args(["--task", "segmentation"])
