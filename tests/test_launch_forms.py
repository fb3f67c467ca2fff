"""The users' launch command works unchanged: `python -m torch.distributed.launch --nnodes=1 --nproc_per_node=N
script.py ...` passes `--local-rank=N` (older torch: `--local_rank N`) to both entry points."""
import os
import subprocess
import sys

import main_finetune
import main_pretrain_cook
from run_helpers import REPO, child_env, free_port


def _launch(script, args):
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", os.path.join(REPO, script), *args]
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)


def test_the_deprecated_launcher_runs_pretraining_on_two_processes(demo_data, tmp_path):
    proc = _launch("main_pretrain_cook.py", [
        "--exp_name", "text_mlm", "--model", "vlmo_tiny_patch16", "--data_path", str(demo_data["captions_train"]),
        "--tokenizer", str(demo_data["tokenizer"]), "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0",
        "--num_workers", "0", "--output_dir", str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) via torchrun" in proc.stdout and (tmp_path / "run" / "checkpoint-latest.pth").exists()


def test_the_deprecated_launcher_runs_fine_tuning_on_two_processes(demo_data, tmp_path):
    proc = _launch("main_finetune.py", [
        "--task", "image_classification", "--model", "vlmo_tiny_patch16", "--data_path",
        str(demo_data["images_train"].parent), "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0",
        "--num_workers", "0", "--output_dir", str(tmp_path / "ft")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "ft" / "checkpoint-latest.pth").exists()


def test_both_spellings_of_the_local_rank_flag_are_accepted(demo_data):
    base = ["--exp_name", "text_mlm", "--data_path", str(demo_data["captions_train"])]
    assert main_pretrain_cook.parse_args(base + ["--local_rank", "1"]).local_rank == 1
    assert main_pretrain_cook.parse_args(base + ["--local-rank=0"]).local_rank == 0
    ft = ["--task", "image_classification", "--data_path", str(demo_data["images_train"].parent)]
    assert main_finetune.parse_args(ft + ["--local-rank=1"]).local_rank == 1
