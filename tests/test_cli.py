"""The user's exact command line, --config defaults, and bad input: one clear line, non-zero exit, no traceback,
nothing written."""
import json
import os
import shutil

import pytest
import torch

import main_pretrain_cook
from models.registry import create_model
from run_helpers import make_caption_data, run_entry

USER_ARGV = ("--exp_name text_mlm --model vlmo_base_patch16 --data_path data/CC3M/cc3m_captions.json --batch_size 384 "
             "--output_dir outputs/text_mlm/ --log_dir outputs/text_mlm/ --resume {ckpt} --lora_rank 64 "
             "--reg_loss_weight 1e1 --self_regularization --save_per_epochs 20 --epochs 100 --warmup_epochs 40 "
             "--blr 1.5e-4 --weight_decay 0.05").split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    d = make_caption_data(str(root / "data"), n_train=32, n_val=4)
    from custom_datasets.tokenizer import load_tokenizer
    d["vocab"] = load_tokenizer(d["tokenizer"]).vocab_size
    torch.manual_seed(0)
    sd = create_model("vlmo_tiny_patch16", vocab_size=d["vocab"]).state_dict()
    d["weights"] = str(root / "beit_transfertovlmo.pth")
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith(("text_embeddings", "mlm_head"))}},
               d["weights"])
    return d


def test_user_command_line_is_accepted_and_runs(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/CC3M")
    shutil.copy(data["train"], "data/CC3M/cc3m_captions.json")
    argv = [a.format(ckpt=data["weights"]) for a in USER_ARGV]
    args = main_pretrain_cook.resolve_run_args(main_pretrain_cook.parse_args(argv), world_size=8)
    assert args.mode == "text_mlm" and args.model == "vlmo_base_patch16" and args.batch_size == 384
    assert args.effective_batch_size == 384 * 8 and args.lr == pytest.approx(1.5e-4 * 384 * 8 / 256)
    assert args.lora_rank == 64 and args.reg_loss_weight == 10.0 and args.self_regularization
    assert args.use_self_regularization and args.save_per_epochs == 20 and args.epochs == 100
    assert args.warmup_epochs == 40 and args.weight_decay == 0.05 and args.resume == data["weights"]
    assert args.log_dir == "outputs/text_mlm/"

    tiny = ["--model", "vlmo_tiny_patch16", "--tokenizer", data["tokenizer"], "--batch_size", "8", "--epochs", "1",
            "--warmup_epochs", "0.5", "--num_workers", "0", "--log_freq", "2"]
    assert main_pretrain_cook.main(argv + tiny) == 0
    record = json.load(open("outputs/text_mlm/args.json"))
    assert record["argv"] == argv + tiny and record["world_size"] == 1
    assert record["args"]["lr"] == pytest.approx(1.5e-4 * 8 / 256) and record["args"]["lora_rank"] == 64
    assert record["args"]["use_self_regularization"] and record["versions"]["torch"] == torch.__version__
    assert record["resume_kind"] == "weights" and "git_commit" in record
    assert record["model_config"]["name"] == "vlmo_tiny_patch16"
    lines = [json.loads(x) for x in open("outputs/text_mlm/log.jsonl")]
    assert all("reg_loss" in x for x in lines if x["split"] == "train")
    assert os.path.exists("outputs/text_mlm/console.log") and os.path.exists("outputs/text_mlm/checkpoint-1.pth")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir("outputs/text_mlm"))
    ckpt = torch.load("outputs/text_mlm/checkpoint-latest.pth", weights_only=True)
    from custom_datasets.tokenizer import load_tokenizer, tokenizer_from_state
    travelled, original = tokenizer_from_state(ckpt["tokenizer"]), load_tokenizer(data["tokenizer"])
    text = ["a red circle above a blue star."]
    assert torch.equal(travelled.encode_batch(text)[0], original.encode_batch(text)[0])


def test_config_file_sets_defaults_and_flags_win(data, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"exp_name: text_mlm\nmodel: vlmo_tiny_patch16\ndata_path: {data['train']}\nbatch_size: 16\n"
                   "blr: 0.5\nlora_rank: 8\n")
    args = main_pretrain_cook.parse_args(["--config", str(cfg), "--batch_size", "4"])
    assert args.batch_size == 4 and args.blr == 0.5 and args.lora_rank == 8 and args.model == "vlmo_tiny_patch16"
    cfg.write_text("not_a_flag: 1\n")
    with pytest.raises(Exception, match="unknown option"):
        main_pretrain_cook.parse_args(["--config", str(cfg), "--data_path", data["train"]])


def _bad_cases(data, tmp):
    malformed = tmp / "bad.json"
    malformed.write_text('[{"caption": "a red circle"}, {"caption": ')
    empty = tmp / "empty.json"
    empty.write_text("[]")
    other_arch = tmp / "other_arch.pth"
    torch.save({"model": create_model("vlmo_tiny_patch16", vocab_size=data["vocab"], embed_dim=32).state_dict()},
               other_arch)
    other_layout = tmp / "other_layout.pth"
    torch.save({"model": create_model("vlmo_tiny_patch16", vocab_size=data["vocab"], ffn_layout="shared").state_dict()},
               other_layout)
    not_ckpt = tmp / "notes.pth"
    not_ckpt.write_text("hello")
    return {
        "missing data": (["--data_path", str(tmp / "nope.json")], "--data_path"),
        "malformed json": (["--data_path", str(malformed)], "bad.json"),
        "empty dataset": (["--data_path", str(empty)], "empty.json"),
        "unknown model": (["--model", "vlmo_huge_patch99"], "--model"),
        "unknown mode": (["--mode", "image_caption"], "--mode"),
        "mode from name": (["--exp_name", "my_run"], "--exp_name"),
        "missing tokenizer": (["--tokenizer", str(tmp / "no_tokenizer")], "no_tokenizer"),
        "other architecture": (["--resume", str(other_arch)], "other_arch.pth"),
        "other layout": (["--resume", str(other_layout)], "other_layout.pth"),
        "not a checkpoint": (["--resume", str(not_ckpt)], "notes.pth"),
    }


def test_bad_input_exits_with_one_clear_line(data, tmp_path, capsys):
    for name, (override, named) in _bad_cases(data, tmp_path).items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        base = {"--exp_name": "text_mlm", "--model": "vlmo_tiny_patch16", "--data_path": data["train"],
                "--tokenizer": data["tokenizer"], "--batch_size": "8", "--epochs": "1", "--num_workers": "0",
                "--output_dir": str(out)}
        for flag, value in zip(override[::2], override[1::2]):
            base[flag] = value
        argv = [x for kv in base.items() for x in kv]
        with pytest.raises(SystemExit) as exc:
            main_pretrain_cook.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2, name
        assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], (name, err)
        assert not (out / "checkpoint-latest.pth").exists()


def test_bad_input_in_a_real_process_has_no_traceback(data, tmp_path):
    proc = run_entry("main_pretrain_cook.py", ["--exp_name", "text_mlm", "--data_path", str(tmp_path / "x.json")],
                     check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: --data_path {tmp_path / 'x.json'}: not found"


def test_every_flag_has_help_with_its_default_and_model_lists_the_models():
    import argparse

    import main_finetune
    from models.registry import model_names

    for entry in (main_pretrain_cook, main_finetune):
        parser = entry.get_args_parser()
        bare = [a.option_strings[0] for a in parser._actions
                if a.option_strings and a.help is not argparse.SUPPRESS and not a.help]
        assert not bare, (entry.__name__, bare)
        text = " ".join(parser.format_help().split())
        assert "AdamW decoupled weight decay (default: 0.05)" in text and "(default: 0)" in text
    text = " ".join(main_pretrain_cook.get_args_parser().format_help().split())
    assert f"one of: {', '.join(model_names())} (default: vlmo_base_patch16)" in text


def test_noop_lora_and_a_long_warmup_warn_once_and_the_run_records_what_is_in_effect(data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--exp_name", "text_mlm", "--model", "vlmo_tiny_patch16", "--data_path", data["train"], "--tokenizer",
            data["tokenizer"], "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "2", "--num_workers", "0",
            "--lora_rank", "64", "--self_regularization", "--reg_loss_weight", "10", "--output_dir", str(out)]
    assert main_pretrain_cook.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len([x for x in printed if "warning: --lora_rank 64: no loaded weight" in x]) == 1
    assert len([x for x in printed if "warning: --warmup_epochs 2 is not shorter than --epochs 2" in x]) == 1
    record = json.load(open(out / "args.json"))["args"]
    assert record["lora_rank"] == 0 and not record["self_regularization"] and not record["use_self_regularization"]
    train = [json.loads(x) for x in open(out / "log.jsonl") if '"split": "train"' in x]
    assert sorted({r["epoch"] for r in train}) == [1, 2]  # epochs count from 1, as the console and file names
    assert (out / "checkpoint-2.pth").exists() and not (out / "checkpoint-0.pth").exists()
