"""Forty-odd command-line mistakes, each caught before any work starts: exit 2, one `error:` line naming the
flag as typed (and the file at fault), no traceback, nothing created or changed. Plus real-process and
torchrun cases, `--check`, and the values a run adjusts or warns about.

`python tests/test_user_errors.py` prints the sweep as a table (mistake, exit code, the line printed)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too
import main_pretrain_cook  # noqa: E402
from run_helpers import run_entry  # noqa: E402


def mistakes(d, tmp):
    """{name: (mode, argv overrides, text the error line must hold)}; `d` the demo data, `tmp` a scratch dir."""
    tmp = str(tmp)

    def scratch_file(name, text):
        path = os.path.join(tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path
    no_mask = scratch_file("no_mask_vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\na\nphoto\n")
    a_file = scratch_file("a_file.txt", "not a folder\n")
    yaml_bad = scratch_file("bad.yaml", "epochs: [1,\n")
    yaml_unknown = scratch_file("unknown.yaml", "epoch: 3\n")
    yaml_value = scratch_file("value.yaml", "warmup_epochs: -1\n")
    not_ckpt = scratch_file("notes.pth", "hello")
    missing = os.path.join(tmp, "missing")
    mlm, itc, mim = "text_mlm", "image_text_itc", "image_mim"
    return {
        "mask share above 1": (mlm, ["--mlm_prob", "1.5"], "--mlm_prob"),
        "mask share 0": (mlm, ["--mlm_prob", "0"], "--mlm_prob"),
        "log every 0 steps": (mlm, ["--log_freq", "0"], "--log_freq"),
        "negative workers": (mlm, ["--num_workers", "-1"], "--num_workers"),
        "batch 0": (mlm, ["--batch_size", "0"], "--batch_size"),
        "accumulate 0": (mlm, ["--accum_iter", "0"], "--accum_iter"),
        "0 epochs": (mlm, ["--epochs", "0"], "--epochs"),
        "epochs not a number": (mlm, ["--epochs", "ten"], "--epochs"),
        "image size 0": (itc, ["--img_size", "0"], "--img_size"),
        "image size not a multiple of the patch": (itc, ["--img_size", "40"], "--img_size 40"),
        "negative warmup": (mlm, ["--warmup_epochs", "-1"], "--warmup_epochs"),
        "negative blr": (mlm, ["--blr", "-1e-4"], "--blr"),
        "negative lr": (mlm, ["--lr=-0.001"], "--lr"),
        "negative weight decay": (mlm, ["--weight_decay", "-0.1"], "--weight_decay"),
        "beta of 1": (mlm, ["--opt_betas", "0.9", "1.0"], "--opt_betas"),
        "one beta": (mlm, ["--opt_betas", "0.9"], "--opt_betas"),
        "negative clip": (mlm, ["--clip_grad", "-1"], "--clip_grad"),
        "drop path 1": (mlm, ["--drop_path", "1"], "--drop_path"),
        "text length 1": (mlm, ["--max_text_len", "1"], "--max_text_len"),
        "eval crop 0": (itc, ["--eval_crop_pct", "0"], "--eval_crop_pct"),
        "eval crop above 1": (itc, ["--eval_crop_pct", "1.5"], "--eval_crop_pct"),
        "negative LoRA rank": (mlm, ["--lora_rank", "-1"], "--lora_rank"),
        "LoRA alpha 0": (mlm, ["--lora_alpha", "0"], "--lora_alpha"),
        "negative reg weight": (mlm, ["--reg_loss_weight", "-1"], "--reg_loss_weight"),
        "negative save steps": (mlm, ["--save_every_steps", "-5"], "--save_every_steps"),
        "negative save minutes": (mlm, ["--save_every_minutes", "-1"], "--save_every_minutes"),
        "negative kept copies": (mlm, ["--save_per_epochs", "-1"], "--save_per_epochs"),
        "max pixels 0": (itc, ["--max_image_pixels", "0"], "--max_image_pixels"),
        "mask the whole grid": (mim, ["--num_mask_patches", "4", "--min_mask_patches", "1"], "--num_mask_patches"),
        "blocks larger than the mask": (mim, ["--num_mask_patches", "2", "--min_mask_patches", "3"],
                                        "--min_mask_patches"),
        "mask aspect below 1": (mim, ["--max_mask_aspect", "0.5"], "--max_mask_aspect"),
        "flip probability 2": (itc, ["--itc_flip_prob", "2"], "--itc_flip_prob"),
        "crop scale 0": (itc, ["--itc_crop_min_scale", "0"], "--itc_crop_min_scale"),
        "SigLIP bias not a number": (itc, ["--itc_loss", "siglip", "--siglip_bias_init", "low"], "--siglip_bias_init"),
        "unknown loss": (itc, ["--itc_loss", "infonce"], "--itc_loss"),
        "unknown model": (mlm, ["--model", "vlmo_huge_patch99"], "--model"),
        "unknown mode": (mlm, ["--mode", "image_caption"], "--mode"),
        "run name without a mode": (None, ["--exp_name", "my_run"], "--exp_name"),
        "unknown precision": (mlm, ["--precision", "fp8"], "--precision"),
        "unknown flag": (mlm, ["--learning_rate", "1e-4"], "--learning_rate"),
        "model kwargs not JSON": (mlm, ["--model_kwargs", "{depth: 2}"], "--model_kwargs"),
        "model kwargs unknown key": (mlm, ["--model_kwargs", '{"layers": 2}'], "--model_kwargs"),
        "tower kwargs not an object": (itc, ["--image_tower_kwargs", "[1]"], "--image_tower_kwargs"),
        "model that cannot train the mode": (mim, ["--model", "dual_encoder"], "--model"),
        "both towers locked": (itc, ["--lock_image", "--lock_text"], "--lock_image"),
        "no data": (mlm, ["--data_path", ""], "--data_path"),
        "missing data": (mlm, ["--data_path", missing], f"--data_path {missing}"),
        "missing held-out data": (mlm, ["--val_data_path", missing], f"--val_data_path {missing}"),
        "missing tokenizer": (mlm, ["--tokenizer", missing], f"--tokenizer {missing}"),
        "vocab without [MASK]": (mlm, ["--tokenizer", no_mask], f"--tokenizer {no_mask}"),
        "missing zero-shot folder": (itc, ["--zeroshot_data_path", missing], "--zeroshot_data_path"),
        "missing checkpoint": (mlm, ["--resume", missing], f"--resume {missing}"),
        "not a checkpoint": (mlm, ["--resume", not_ckpt], not_ckpt),
        "missing config": (mlm, ["--config", missing], f"--config: file not found: {missing}"),
        "config not YAML": (mlm, ["--config", yaml_bad], f"--config {yaml_bad}"),
        "config with a misspelt key": (mlm, ["--config", yaml_unknown], "unknown option(s) ['epoch']"),
        "config with a bad value": (mlm, ["--config", yaml_value], "--warmup_epochs"),
        "output folder is a file": (mlm, ["--output_dir", a_file], f"--output_dir {a_file}"),
        "output folder under a file": (mlm, ["--output_dir", os.path.join(a_file, "run")], "--output_dir"),
        "log folder under a file": (mlm, ["--log_dir", os.path.join(a_file, "tb")], "--log_dir"),
        "CUDA on a machine without": (mlm, ["--device", "cuda"], "--device cuda"),
    }


def base_args(d, mode, out):
    data = {"text_mlm": d["captions_train"], "image_text_itc": d["pairs_train"], "image_mim": d["images_train"]}
    args = {"--exp_name": mode or "text_mlm", "--model": "vlmo_tiny_patch16", "--data_path": str(data[mode or "text_mlm"]),
            "--tokenizer": str(d["tokenizer"]), "--batch_size": "4", "--epochs": "1", "--num_workers": "0",
            "--output_dir": str(out), "--device": "cpu"}
    if mode == "image_mim":
        args["--mim_target"] = "pixel"
    return args


def argv_of(d, mode, override, out):
    args = base_args(d, mode, out)
    flags = [x for x in override if x.startswith("--")]
    for flag in flags:
        args.pop(flag, None)
    return [x for kv in args.items() for x in kv if x != ""] + override


def tree(path):
    """{relative path: (size, mtime)} of everything under `path`."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, path)] = (os.path.getsize(p), os.path.getmtime(p))
    return out


def run_in_process(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main_pretrain_cook.main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.err.strip().splitlines(), captured.out


def test_every_mistake_gets_one_line_naming_the_flag_and_changes_nothing(demo_data, tmp_path, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cases = mistakes(demo_data, scratch)
    assert len(cases) >= 40
    before = tree(tmp_path)
    failures = []
    for name, (mode, override, named) in cases.items():
        out = tmp_path / "out"
        code, err, _ = run_in_process(argv_of(demo_data, mode, override, out), capsys)
        if not (code == 2 and len(err) == 1 and err[0].startswith("error: ") and named in err[0]):
            failures.append((name, code, err))
        assert not out.exists(), name
    assert not failures, failures
    assert tree(tmp_path) == before  # nothing created or touched anywhere


def test_an_unwritable_output_folder_is_named(demo_data, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if os.path.abspath(p) == str(locked) else real_access(p, m))
    code, err, _ = run_in_process(argv_of(demo_data, "text_mlm", ["--output_dir", str(locked / "run")],
                                          tmp_path / "x"), capsys)
    assert code == 2 and len(err) == 1 and f"--output_dir {locked / 'run'}" in err[0] and "not writable" in err[0]
    assert os.listdir(locked) == []


def test_another_modes_checkpoint_in_the_folder_names_the_folder(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main_pretrain_cook.main(argv_of(demo_data, "text_mlm", ["--log_freq", "50"], out)) == 0
    before = tree(out)
    capsys.readouterr()
    code, err, _ = run_in_process(argv_of(demo_data, "image_text_itc", [], out), capsys)
    assert code == 2 and len(err) == 1 and f"--output_dir {out}" in err[0] and "text_mlm run" in err[0], err
    assert "--resume" in err[0] and tree(out) == before


def test_a_requeued_run_needs_its_resume_file_no_more_and_config_integers_may_be_floats(demo_data, tmp_path,
                                                                                         capsys):
    out = tmp_path / "run"
    assert main_pretrain_cook.main(argv_of(demo_data, "text_mlm", ["--log_freq", "50"], out)) == 0
    gone = str(tmp_path / "purged" / "stage1.pth")  # the weights the first launch started from, since deleted
    assert main_pretrain_cook.main(argv_of(demo_data, "text_mlm", ["--resume", gone], out)) == 0
    assert "nothing to do" in capsys.readouterr().out
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 3.0\nopt_betas: 0.9\n")
    code, err, _ = run_in_process(argv_of(demo_data, "text_mlm", ["--config", str(config)], tmp_path / "x"), capsys)
    assert code == 2 and "opt_betas: 0.9 should be a list of 2 values" in err[0]
    config.write_text("epochs: 3.0\n")
    argv = argv_of(demo_data, "text_mlm", ["--config", str(config)], tmp_path / "x")
    assert main_pretrain_cook.parse_args([a for a in argv if a not in ("--epochs", "1")]).epochs == 3


def test_adjusted_and_ineffective_values_are_printed_and_the_run_goes_on(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = argv_of(demo_data, "image_mim", ["--warmup_epochs", "2", "--save_per_epochs", "5", "--check"], out)
    assert main_pretrain_cook.main(argv) == 0
    printed = capsys.readouterr().out
    assert "--num_mask_patches 75 -> 2 and --min_mask_patches 16 -> 1 for the 2x2 patch grid" in printed
    assert "warning: --warmup_epochs 2 is not shorter than --epochs 1" in printed
    assert "warning: --save_per_epochs 5 is more than --epochs 1" in printed
    assert "check passed" in printed and not out.exists()


@pytest.mark.parametrize("mode", ["text_mlm", "image_text_itc", "image_mim"])
def test_check_validates_everything_and_writes_nothing(demo_data, tmp_path, capsys, mode):
    out = tmp_path / "run"
    assert main_pretrain_cook.main(argv_of(demo_data, mode, ["--check"], out)) == 0
    printed = capsys.readouterr().out
    assert "check: tokenizer round trip" in printed and "check: one batch:" in printed
    assert "check passed" in printed and not out.exists()


def test_a_real_process_and_torchrun_print_the_error_once(demo_data, tmp_path):
    out = tmp_path / "run"
    argv = argv_of(demo_data, "text_mlm", ["--mlm_prob", "1.5"], out)
    proc = run_entry("main_pretrain_cook.py", argv, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: argument --mlm_prob: 1.5 must be in (0, 1]"
    proc = run_entry("main_pretrain_cook.py", argv, nproc=2, check=False)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("error: argument --mlm_prob") == 1


def test_an_error_after_the_start_is_appended_to_console_log(demo_data, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = tmp_path / "run"
    code, err, _ = run_in_process(argv_of(demo_data, "text_mlm", ["--data_path", str(empty)], out), capsys)
    assert code == 2 and len(err) == 1 and "contains no captions" in err[0]
    assert err[0] in (out / "console.log").read_text()


def main():
    """Print the sweep as a markdown table (mistake, exit code, the line printed)."""
    import contextlib
    import io
    import tempfile

    from custom_datasets.demo_data import make_demo_data
    from tests.conftest import DEMO_TEST_SIZES

    with tempfile.TemporaryDirectory() as tmp:
        d = make_demo_data(os.path.join(tmp, "demo"), **DEMO_TEST_SIZES)
        os.makedirs(os.path.join(tmp, "scratch"))
        print("| mistake | flags | exit | line printed |\n|---|---|---|---|")
        for name, (mode, override, _) in mistakes(d, os.path.join(tmp, "scratch")).items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main_pretrain_cook.main(argv_of(d, mode, override, os.path.join(tmp, "out")))
                except SystemExit as e:
                    code = e.code
            line = err.getvalue().strip().replace(tmp, "$TMP").replace("|", "\\|")
            shown = " ".join(override).replace(tmp, "$TMP")
            print(f"| {name} | `{shown}` | {code} | {line} |")


if __name__ == "__main__":
    main()
