"""Running the real entry points in subprocesses (single process or torchrun with gloo) for tests."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    env.update({k: str(v) for k, v in extra.items()})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        if k not in extra:
            env.pop(k, None)
    return env


def command(script, args, nproc=1, launcher=()):
    if nproc == 1 and not launcher:
        return [sys.executable, os.path.join(REPO, script), *args]
    rendezvous = [] if "--standalone" in launcher else ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *rendezvous, *launcher,
            os.path.join(REPO, script), *args]


def run_entry(script, args, nproc=1, timeout=300, check=True, launcher=(), preexec_fn=None):
    proc = subprocess.run(command(script, args, nproc, launcher), cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def start_entry(script, args, nproc=1, launcher=()):
    return subprocess.Popen(command(script, args, nproc, launcher), cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(proc, predicate, timeout=300, poll=0.005):
    """True as soon as predicate() holds while `proc` runs; False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("timed out waiting for the run")


def logged_steps(out):
    """Training records in out/log.jsonl so far (0 while it does not exist)."""
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum('"split": "train"' in line for line in f)


def kill_when(proc, predicate, timeout=300, poll=0.005):
    """SIGKILL the process group as soon as predicate() is true; returns True if it was killed mid-run."""
    if not wait_for(proc, predicate, timeout, poll):
        return False
    kill_tree(proc)
    return True


def _descendants(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return children + [d for c in children for d in _descendants(c)]


def kill_tree(proc):
    """SIGKILL the process, its group and every descendant: torchrun starts each worker in a session of its
    own, so killing its group alone would leave the ranks training as orphans."""
    for pid in _descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def finish(proc, timeout=120):
    """The output of a started run once it exits; a run still going after `timeout` is killed (process
    group: no orphaned ranks) and fails the test."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        output = proc.communicate()[0]
        raise AssertionError(f"the run did not exit within {timeout} s:\n{output[-4000:]}") from None


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_jsonl(path, split=None):
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split is None or r["split"] == split]


def make_caption_data(root, n_train=64, n_val=10, seed=0):
    """A small captions file pair and a WordPiece tokenizer trained on them."""
    import random

    from custom_datasets.tokenizer import train_wordpiece

    rng = random.Random(seed)
    colours, shapes = ["red", "blue", "green", "yellow"], ["circle", "square", "star", "triangle"]

    def caption():
        c1, s1, c2, s2 = rng.choice(colours), rng.choice(shapes), rng.choice(colours), rng.choice(shapes)
        return f"a {c1} {s1} above a {c2} {s2}. the {s1} is {c1}."

    os.makedirs(root, exist_ok=True)
    train = [{"caption": caption()} for _ in range(n_train)]
    val = [{"caption": caption()} for _ in range(n_val)]
    paths = {"train": os.path.join(root, "train.json"), "val": os.path.join(root, "val.json"),
             "tokenizer": os.path.join(root, "tokenizer")}
    for key, items in (("train", train), ("val", val)):
        with open(paths[key], "w") as f:
            json.dump(items, f)
    train_wordpiece([x["caption"] for x in train], paths["tokenizer"], vocab_size=200)
    return paths


def flip_a_tensor_byte(path):
    """Flip one byte inside the largest tensor record of a torch zip checkpoint (the pickle stays readable)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))
