"""Never lose a run: a signal (SIGTERM, SIGUSR1, SIGINT; to the process, its process group or torchrun) saves
and exits 75, and the same command then finishes bitwise like an uninterrupted run; a failed save (a file-size
limit standing in for a full disk) exits 4 with one line and leaves the previous checkpoint intact; a torn or
corrupted latest checkpoint falls back to the newest intact kept one; another world size keeps the effective
batch or refuses; a worker killed under torchrun --max-restarts resumes by itself."""
import glob
import os
import resource
import shutil
import signal

import pytest
import torch

from run_helpers import (finish, flip_a_tensor_byte, kill_when, load_ckpt, logged_steps, make_caption_data, run_entry, start_entry,
                         wait_for)
from util.checkpoint import CorruptCheckpoint, load_file, save_atomic
from util.errors import EXIT_PREEMPTED, EXIT_SAVE_FAILED, EXIT_USER_ERROR

STEPS = 2 * 8  # 48 captions / global batch 6, 2 epochs
TORCHRUN_SIGNALS = ["--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_caption_data(str(tmp_path_factory.mktemp("preempt_data")), n_train=48, n_val=4)


def _args(data, out, batch=6, extra=()):
    return ["--exp_name", "text_mlm", "--model", "vlmo_tiny_patch16", "--data_path", data["train"],
            "--tokenizer", data["tokenizer"], "--batch_size", str(batch), "--epochs", "2", "--warmup_epochs", "0.5",
            "--lr", "1e-3", "--drop_path", "0", "--num_workers", "1", "--log_freq", "1", "--output_dir", out,
            "--resume", "auto", *extra]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    run_entry("main_pretrain_cook.py", _args(data, out))
    return load_ckpt(os.path.join(out, "checkpoint-latest.pth"))


def _assert_same(a, b, atol=0.0):
    assert a["global_step"] == b["global_step"] == STEPS
    for k in b["model"]:
        if atol:
            torch.testing.assert_close(a["model"][k], b["model"][k], atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("sig,target,nproc", [("SIGTERM", "process", 1), ("SIGINT", "group", 1),
                                              ("SIGUSR1", "torchrun", 2)])
def test_a_signal_saves_and_the_same_command_loses_no_step(data, straight, tmp_path, sig, target, nproc):
    out = str(tmp_path / "run")
    args = _args(data, out, batch=6 // nproc)
    launcher = TORCHRUN_SIGNALS if target == "torchrun" else ()
    proc = start_entry("main_pretrain_cook.py", args, nproc=nproc, launcher=launcher)
    assert wait_for(proc, lambda: logged_steps(out) >= 3), "the run ended before the signal"
    (os.killpg if target == "group" else os.kill)(proc.pid, getattr(signal, sig))
    output = finish(proc, timeout=120)
    if target != "torchrun":  # torchrun reports its workers' stop in its own way; the workers exit 75
        assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert f"received {sig}" in output and "checkpoint-latest.pth holds global step" in output
    saved = load_ckpt(os.path.join(out, "checkpoint-latest.pth"))
    assert 3 <= saved["global_step"] < STEPS
    assert not glob.glob(os.path.join(out, "*.tmp"))
    proc = run_entry("main_pretrain_cook.py", args, nproc=nproc, launcher=launcher)
    assert f"global step {saved['global_step']}" in proc.stdout  # resumed from the signal's checkpoint
    _assert_same(load_ckpt(os.path.join(out, "checkpoint-latest.pth")), straight, atol=0 if nproc == 1 else 2e-5)


def _limit_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _stopped_by_sigterm(args, out, when):
    """Start the run, SIGTERM it once when(out) holds, wait for its save-and-exit; returns the saved step."""
    proc = start_entry("main_pretrain_cook.py", args)
    assert wait_for(proc, lambda: when(out)), "the run ended before the signal"
    os.kill(proc.pid, signal.SIGTERM)
    output = finish(proc, timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    return load_ckpt(os.path.join(out, "checkpoint-latest.pth"))["global_step"]


def test_a_failed_save_exits_4_in_one_line_and_leaves_the_previous_checkpoint(data, straight, tmp_path):
    out = str(tmp_path / "run")
    _stopped_by_sigterm(_args(data, out), out, lambda o: logged_steps(o) >= 3)
    latest = os.path.join(out, "checkpoint-latest.pth")
    before = open(latest, "rb").read()
    limit = os.path.getsize(latest) // 2  # log lines and args.json fit; a checkpoint does not
    proc = run_entry("main_pretrain_cook.py", _args(data, out), check=False, preexec_fn=_limit_file_size(limit))
    assert proc.returncode == EXIT_SAVE_FAILED, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "stopping:" in line]
    assert len(errors) == 1 and "file too large writing" in errors[0] and latest in errors[0]
    assert "Traceback" not in proc.stderr
    assert open(latest, "rb").read() == before and not glob.glob(os.path.join(out, "*.tmp"))
    with open(latest + ".tmp", "wb") as f:  # what a writer killed mid-save leaves behind
        f.write(b"partial")
    proc = run_entry("main_pretrain_cook.py", _args(data, out))
    assert "removed 1 partial file(s)" in proc.stdout and "checkpoint-latest.pth.tmp" in proc.stdout
    _assert_same(load_ckpt(latest), straight)


def test_the_checksum_catches_a_flipped_byte(tmp_path):
    path = str(tmp_path / "c.pth")
    save_atomic({"model": {"w": torch.randn(1000)}, "global_step": 3}, path)
    assert load_file(path)["global_step"] == 3
    flip_a_tensor_byte(path)
    with pytest.raises(CorruptCheckpoint, match="do not match the checksum"):
        load_file(path)


def test_a_damaged_latest_falls_back_to_the_newest_kept_checkpoint(data, straight, tmp_path):
    """A truncated latest file (unreadable) and one with a flipped byte (fails its checksum), each in a copy of
    the same stopped run."""
    def args(out):
        return _args(data, out, extra=["--save_per_epochs", "1"])

    stopped = str(tmp_path / "stopped")
    assert _stopped_by_sigterm(args(stopped), stopped, lambda o: os.path.exists(os.path.join(o, "checkpoint-1.pth"))
                               and logged_steps(o) >= STEPS // 2 + 3) > STEPS // 2
    for damage in ("truncated", "flipped_byte"):
        out = str(tmp_path / damage)
        shutil.copytree(stopped, out)
        latest, kept = os.path.join(out, "checkpoint-latest.pth"), os.path.join(out, "checkpoint-1.pth")
        if damage == "truncated":
            with open(latest, "r+b") as f:
                f.truncate(os.path.getsize(latest) // 3)
        else:
            flip_a_tensor_byte(latest)
        proc = run_entry("main_pretrain_cook.py", args(out))
        skipped = [line for line in proc.stdout.splitlines() if "skipping" in line]
        assert len(skipped) == 1 and latest in skipped[0] and kept in skipped[0], damage
        assert ("checksum" in skipped[0]) == (damage == "flipped_byte")
        assert f"global step {STEPS // 2}" in proc.stdout
        _assert_same(load_ckpt(latest), straight)


def test_another_world_size_keeps_the_effective_batch_or_refuses(data, straight, tmp_path):
    out = str(tmp_path / "run")
    two = _args(data, out, batch=3, extra=["--save_every_steps", "5"])
    proc = start_entry("main_pretrain_cook.py", two, nproc=2)
    latest = os.path.join(out, "checkpoint-latest.pth")
    assert kill_when(proc, lambda: os.path.exists(latest)), "the run finished before it could be killed"
    refused = run_entry("main_pretrain_cook.py", _args(data, out, batch=4), check=False)
    assert refused.returncode == EXIT_USER_ERROR
    line = refused.stderr.strip().splitlines()[-1]
    assert "effective batch of 6" in line and "--accum_iter" in line
    proc = run_entry("main_pretrain_cook.py", _args(data, out, batch=3, extra=["--save_every_steps", "5"]))
    assert "--accum_iter 1 -> 2 keeps the effective batch" in proc.stdout
    assert "fresh random stream" in proc.stdout
    _assert_same(load_ckpt(latest), straight, atol=2e-5)


def _workers(pid):
    """The training processes torchrun `pid` started (its children running the entry point)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    found = []
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"main_pretrain_cook.py" in f.read():
                found.append(child)
    return found


def test_torchrun_restarts_a_dead_worker_from_the_last_checkpoint(data, straight, tmp_path):
    out = str(tmp_path / "run")
    args = _args(data, out, batch=3, extra=["--save_every_steps", "5"])
    # as scripts/launch_torchrun.sh: a c10d rendezvous (--standalone); one restart is all it may take (the
    # restarted round keeps its process-group keys apart from the dead round's: util/dist.py:_round_store)
    proc = start_entry("main_pretrain_cook.py", args, nproc=2, launcher=["--standalone", "--max-restarts", "1"])
    latest = os.path.join(out, "checkpoint-latest.pth")
    assert wait_for(proc, lambda: os.path.exists(latest))
    workers = _workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    output = finish(proc, timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert "resuming this run from" in output  # the restarted workers continued the run
    _assert_same(load_ckpt(latest), straight, atol=2e-5)
