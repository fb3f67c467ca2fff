"""Fault injection: how many steps a small pretraining run loses to each kind of fault, and whether the same
command then finishes with the weights an uninterrupted run ends with.

For each fault kind, N trials of a small text_mlm run of main_pretrain_cook.py (vlmo_tiny_patch16, 96
captions, global batch 6, 2 epochs = 32 optimizer steps, --drop_path 0, --num_workers 1, --log_freq 1,
--resume auto) inject the fault at a random moment (a random logged step plus a random fraction of a second,
seeded by --seed), then run the same command again until it completes (at most a few times). The final
checkpoint-latest.pth is compared with ONE uninterrupted reference run of the same arguments: bitwise for
runs on 1 rank, within 2e-5 for kinds that run on 2 ranks (another reduction order).

Kinds:
  sigkill                  1 rank, --save_every_steps 4: SIGKILL the process group at a random step
  sigterm_1rank            1 rank: SIGTERM the process (finish the step, save, exit 75)
  sigusr1_1rank            1 rank: SIGUSR1 the process
  sigusr1_torchrun_2ranks  torchrun --signals-to-handle SIGTERM,SIGINT,SIGUSR1 on 2 ranks: SIGUSR1 to torchrun
  failed_save              SIGTERM in epoch 1, then a run under a file-size limit below the checkpoint size
                           (a full disk): exit 4, the previous checkpoint unchanged; then the run without it
  truncated_latest         SIGTERM in epoch 2 (--save_per_epochs 1), checkpoint-latest.pth truncated to a third:
                           the next run must fall back to checkpoint-1.pth (global step 16)
  flipped_byte             as truncated_latest, one byte inside a tensor record of the zip flipped instead
  world_size_change        2 ranks x batch 3, --save_every_steps 5, SIGKILL after the first checkpoint; resumed
                           on 1 rank with --batch_size 3 (--accum_iter 1 -> 2 keeps the effective batch)

A SIGKILL goes to every process of the run (torchrun starts each worker in a session of its own, so its
process group alone would leave the workers training). A run still alive HANG_S seconds after printing its
last line ('stopping: ...', 'done in ...') is killed and counted as 'hung'.

Steps lost, per interrupted run: the global steps it had completed when it stopped (its last train record in
log.jsonl) minus the global step of the checkpoint the next run resumed from (0 when it started afresh);
summed over every interrupted run of every trial. A preemption should lose 0; a SIGKILL loses the steps since
the last checkpoint; a failed save loses the steps since the last checkpoint that was written.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/fault_injection.py --trials 2
    OMP_NUM_THREADS=1 .venv/bin/python scripts/fault_injection.py --trials 5 --kinds sigkill flipped_byte \
        --seed 1 --out /tmp/faults

Prints one line per trial, then a Markdown table (also written to <out>/results.md, with every run's
details in <out>/results.json). Exits 1 when any trial did not complete, did not match the reference or
broke one of the behaviours above (listed under the table). Not a test: it takes minutes (each run starts a
fresh interpreter), and the moments drawn depend on the machine's speed.
"""
import argparse
import collections
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import torch  # noqa: E402

from run_helpers import (child_env, flip_a_tensor_byte, command, load_ckpt, logged_steps, make_caption_data, run_entry,  # noqa: E402
                         wait_for)

ENTRY = "main_pretrain_cook.py"
STEPS = 2 * 16  # 96 captions / global batch 6, 2 epochs
TORCHRUN_SIGNALS = ["--signals-to-handle", "SIGTERM,SIGINT,SIGUSR1"]
ATOL_2RANKS = 2e-5
MAX_RERUNS = 3  # runs of the same command after the fault, until one completes
RUN_TIMEOUT = 600
EXIT_SAVE_FAILED, EXIT_PREEMPTED = 4, 75
RESUMED = re.compile(r"resuming this run from (\S+) \(global step (\d+)\)")
FINAL_LINE = re.compile(r"^.*(?:stopping: |done in |error: ).*$", re.M)  # a run's last line
HANG_S = 60  # a run still there this long after its last line is hung
KINDS = ["sigkill", "sigterm_1rank", "sigusr1_1rank", "sigusr1_torchrun_2ranks", "failed_save", "truncated_latest",
         "flipped_byte", "world_size_change"]


def run_args(data, out, batch=6, extra=()):
    return ["--exp_name", "text_mlm", "--model", "vlmo_tiny_patch16", "--data_path", data["train"],
            "--tokenizer", data["tokenizer"], "--batch_size", str(batch), "--epochs", "2", "--warmup_epochs", "0.5",
            "--lr", "1e-3", "--drop_path", "0", "--num_workers", "1", "--log_freq", "1", "--output_dir", out,
            "--resume", "auto", *extra]


def train_steps_after(log_path, offset):
    """Global steps of the train records appended to log.jsonl after byte `offset` (a torn line is skipped)."""
    if not os.path.exists(log_path):
        return []
    with open(log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    steps = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("split") == "train":
            steps.append(int(row["global_step"]))
    return steps


def limit_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def compare(ckpt_path, reference, atol):
    """(equal, max |difference|, note) of the model tensors of `ckpt_path` against the reference checkpoint."""
    if not os.path.exists(ckpt_path):
        return False, None, "no checkpoint-latest.pth"
    ckpt = load_ckpt(ckpt_path)
    if ckpt.get("global_step") != STEPS:
        return False, None, f"global_step {ckpt.get('global_step')}, not {STEPS}"
    if set(ckpt["model"]) != set(reference["model"]):
        return False, None, "other model tensors than the reference"
    worst, equal = 0.0, True
    for k, ref in reference["model"].items():
        got = ckpt["model"][k]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            return False, None, f"{k}: {tuple(got.shape)} {got.dtype} vs {tuple(ref.shape)} {ref.dtype}"
        diff = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
        worst = max(worst, diff)
        equal = equal and (torch.equal(got, ref) if atol == 0 else diff <= atol)
    return equal, worst, ""


def descendants(pid):
    """Every process below `pid` (/proc children lists, recursively)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return False


def kill_job(pid):
    """SIGKILL a launched run and every process below it, as a lost node would: torchrun starts each worker in
    a session of its own (start_new_session), so SIGKILL to torchrun's process group alone leaves the workers
    training on (orphans that finish the run). Waits until they are gone."""
    pids = [pid] + descendants(pid)
    groups = []
    for p in pids:
        try:
            group = os.getpgid(p)
        except OSError:
            continue
        if group != os.getpgrp() and group not in groups:
            groups.append(group)
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.time() + 30
    for p in pids[1:]:  # pids[0] is the caller's child: its proc.wait() reaps it
        while _alive(p) and time.time() < deadline:
            time.sleep(0.02)


class Trial:
    """One trial's runs in one output folder: each run's exit code, the steps it logged, where it resumed."""

    def __init__(self, kind, index, out, rng):
        self.kind, self.index, self.out, self.rng = kind, index, out, rng
        self.log = os.path.join(out, "log.jsonl")
        self.latest = os.path.join(out, "checkpoint-latest.pth")
        self.runs, self.problems, self.fault = [], [], ""
        os.makedirs(out, exist_ok=True)

    def start(self, label, args, nproc=1, launcher=(), preexec_fn=None):
        """Launch a run in a session of its own, its output (every rank's) to run<i>_<label>.out."""
        path = os.path.join(self.out, f"run{len(self.runs) + 1}_{label}.out")
        offset = os.path.getsize(self.log) if os.path.exists(self.log) else 0
        with open(path, "w") as f:
            proc = subprocess.Popen(command(ENTRY, args, nproc, launcher), cwd=REPO, env=child_env(), stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec_fn)
        return {"proc": proc, "label": label, "path": path, "offset": offset, "started": time.time()}

    def finish(self, started, timeout=RUN_TIMEOUT):
        """Wait for a launched run to exit. One that printed its last line ('stopping: ...', 'done in ...',
        'error: ...') but is still there HANG_S later, or that runs past `timeout`, is killed and reported."""
        proc, label = started["proc"], started["label"]
        deadline, last_line_at, rc = started["started"] + timeout, None, None
        while proc.poll() is None:
            if last_line_at is None:
                with open(started["path"], errors="replace") as f:
                    last = FINAL_LINE.search(f.read())
                if last:
                    last_line_at, last_line = time.time(), last.group(0).strip()
            if last_line_at is not None and time.time() - last_line_at > HANG_S:
                kill_job(proc.pid)
                rc = "hung"
                self.problems.append(f"{label}: printed {last_line[:160]!r} and had not exited {HANG_S} s later "
                                     "(killed)")
                break
            if time.time() > deadline:
                kill_job(proc.pid)
                rc = "timeout"
                self.problems.append(f"{label}: still running after {timeout} s (killed)")
                break
            time.sleep(0.1)
        proc.wait()
        with open(started["path"], errors="replace") as f:
            output = f.read()
        found = RESUMED.findall(output)
        run = {"label": label, "rc": proc.returncode if rc is None else rc,
               "seconds": round(time.time() - started["started"], 1),
               "resumed_from": found[0][0] if found else None,
               "resumed_step": int(found[0][1]) if found else 0,
               "logged_steps": train_steps_after(self.log, started["offset"]), "output": output}
        self.runs.append(run)
        return run

    def run(self, label, args, nproc=1, launcher=(), preexec_fn=None):
        return self.finish(self.start(label, args, nproc, launcher, preexec_fn))

    def inject_at(self, started, step, action, what, also=lambda: True):
        """Wait until train step `step` is logged (and also() holds), then a random fraction of the last step's
        duration more (the fault lands anywhere in the next step: forward, backward, a save), then
        action(proc); True if the fault hit the run while it was running."""
        proc = started["proc"]
        reached = wait_for(proc, lambda: logged_steps(self.out) >= step - 1, timeout=RUN_TIMEOUT, poll=0.005)
        before = time.monotonic()
        reached = reached and wait_for(proc, lambda: logged_steps(self.out) >= step and also(),
                                       timeout=RUN_TIMEOUT, poll=0.005)
        if reached:
            time.sleep(self.rng.uniform(0.0, min(time.monotonic() - before, 2.0)))
        if not reached or proc.poll() is not None:
            self.problems.append(f"the run ended before the fault ({what}) could be injected")
            return False
        at = logged_steps(self.out)
        action(proc)
        self.fault = f"{what} with {at} steps logged"
        return True

    def complete(self, args, nproc=1, launcher=()):
        """Run the same command until it exits 0 (at most MAX_RERUNS times)."""
        for i in range(MAX_RERUNS):
            run = self.run(f"rerun{i + 1}", args, nproc, launcher)
            if i == 0 and self.fault and run["resumed_step"] >= STEPS:
                self.problems.append(f"the first rerun found the run finished (global step {run['resumed_step']}): "
                                     "the fault did not stop the training")
            if run["rc"] == 0:
                return True
        self.problems.append(f"no rerun completed in {MAX_RERUNS} tries (exit codes "
                             f"{[r['rc'] for r in self.runs]}); last output:\n" + tail(self.runs[-1]["output"]))
        return False

    def expect(self, ok, message, run=None):
        if not ok:
            self.problems.append(message + (f"; output:\n{tail(run['output'])}" if run else ""))

    def steps_lost(self):
        """Sum over interrupted runs: steps completed (log.jsonl) minus the step the next run resumed from."""
        lost = 0
        for run, nxt in zip(self.runs, self.runs[1:]):
            completed = max(run["logged_steps"], default=run["resumed_step"])
            lost += completed - nxt["resumed_step"]
        return lost


def tail(text, lines=25):
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def saved_step(path):
    return load_ckpt(path)["global_step"] if os.path.exists(path) else None


# ---- the kinds ------------------------------------------------------------------------------------------

def signal_trial(t, data, sig, nproc=1, launcher=()):
    """SIGTERM/SIGUSR1 to the process (or torchrun) at a random step; it must save and exit 75; the same
    command resumes from that checkpoint."""
    args = run_args(data, t.out, batch=6 // nproc)
    k = t.rng.randint(2, STEPS - 3)
    started = t.start("signalled", args, nproc, launcher)
    t.inject_at(started, k, lambda p: os.kill(p.pid, sig), sig.name)
    run = t.finish(started)
    if t.fault:
        if not launcher:  # torchrun reports its workers' stop in its own way; the workers exit 75
            t.expect(run["rc"] == EXIT_PREEMPTED, f"signalled run: exit {run['rc']}, expected {EXIT_PREEMPTED}", run)
        t.expect(f"received {sig.name}" in run["output"]
                 and "checkpoint-latest.pth holds global step" in run["output"],
                 "no 'received <signal>' / 'checkpoint-latest.pth holds global step' line", run)
    saved = saved_step(t.latest)
    t.complete(args, nproc, launcher)
    if t.fault and len(t.runs) > 1:
        t.expect(t.runs[1]["resumed_step"] == saved,
                 f"the rerun resumed from step {t.runs[1]['resumed_step']}, the signal's checkpoint holds {saved}")


def kind_sigkill(t, data):
    args = run_args(data, t.out, extra=["--save_every_steps", "4"])
    k = t.rng.randint(2, STEPS - 3)
    started = t.start("killed", args)
    t.inject_at(started, k, lambda p: kill_job(p.pid), "SIGKILL")
    t.finish(started)
    t.complete(args)


def kind_sigterm_1rank(t, data):
    signal_trial(t, data, signal.SIGTERM)


def kind_sigusr1_1rank(t, data):
    signal_trial(t, data, signal.SIGUSR1)


def kind_sigusr1_torchrun_2ranks(t, data):
    signal_trial(t, data, signal.SIGUSR1, nproc=2, launcher=TORCHRUN_SIGNALS)


def kind_failed_save(t, data):
    args = run_args(data, t.out)
    k = t.rng.randint(2, 14)  # in epoch 1: the limited run's first save is the end of epoch 1
    started = t.start("signalled", args)
    t.inject_at(started, k, lambda p: os.kill(p.pid, signal.SIGTERM), "SIGTERM (then a file-size limit)")
    run = t.finish(started)
    t.expect(run["rc"] == EXIT_PREEMPTED, f"signalled run: exit {run['rc']}, expected {EXIT_PREEMPTED}", run)
    if os.path.exists(t.latest) and run["rc"] == EXIT_PREEMPTED:
        before = open(t.latest, "rb").read()
        limit = len(before) // 2  # log lines and args.json fit; a checkpoint does not
        run = t.run("size_limited", args, preexec_fn=limit_file_size(limit))
        t.expect(run["rc"] == EXIT_SAVE_FAILED, f"size-limited run: exit {run['rc']}, expected {EXIT_SAVE_FAILED}", run)
        stops = [line for line in run["output"].splitlines() if "stopping:" in line]
        t.expect(len(stops) == 1 and "file too large writing" in stops[0],
                 f"size-limited run: expected one 'stopping: file too large writing ...' line, got {stops}", run)
        t.expect("Traceback" not in run["output"], "size-limited run printed a traceback", run)
        t.expect(open(t.latest, "rb").read() == before, "the failed save changed checkpoint-latest.pth")
        t.expect(not [n for n in os.listdir(t.out) if n.endswith(".tmp")], "the failed save left a .tmp file")
    t.complete(args)


def damaged_latest_trial(t, data, damage):
    args = run_args(data, t.out, extra=["--save_per_epochs", "1"])
    kept = os.path.join(t.out, "checkpoint-1.pth")
    k = t.rng.randint(STEPS // 2 + 1, STEPS - 2)
    started = t.start("signalled", args)
    t.inject_at(started, k, lambda p: os.kill(p.pid, signal.SIGTERM), f"SIGTERM (then {damage} latest)",
                also=lambda: os.path.exists(kept))
    run = t.finish(started)
    t.expect(run["rc"] == EXIT_PREEMPTED, f"signalled run: exit {run['rc']}, expected {EXIT_PREEMPTED}", run)
    if run["rc"] == EXIT_PREEMPTED and os.path.exists(t.latest):
        if damage == "truncated":
            with open(t.latest, "r+b") as f:
                f.truncate(os.path.getsize(t.latest) // 3)
        else:
            flip_a_tensor_byte(t.latest)
    if not t.complete(args) or run["rc"] != EXIT_PREEMPTED:
        return
    rerun = t.runs[1]
    skipped = [line for line in rerun["output"].splitlines() if "skipping" in line]
    t.expect(len(skipped) == 1 and t.latest in skipped[0] and kept in skipped[0],
             f"expected one 'skipping {t.latest} ...; falling back to {kept}' line, got {skipped}", rerun)
    if damage == "flipped_byte":
        t.expect(bool(skipped) and "checksum" in skipped[0], "the skip line does not name the checksum")
    t.expect(rerun["resumed_from"] == kept and rerun["resumed_step"] == STEPS // 2,
             f"the rerun resumed from {rerun['resumed_from']} (global step {rerun['resumed_step']}), not {kept} "
             f"(global step {STEPS // 2})", rerun)


def kind_truncated_latest(t, data):
    damaged_latest_trial(t, data, "truncated")


def kind_flipped_byte(t, data):
    damaged_latest_trial(t, data, "flipped_byte")


def kind_world_size_change(t, data):
    args = run_args(data, t.out, batch=3, extra=["--save_every_steps", "5"])
    k = t.rng.randint(5, STEPS - 3)
    started = t.start("killed_2ranks", args, nproc=2)
    t.inject_at(started, k, lambda p: kill_job(p.pid), "SIGKILL of torchrun and both workers",
                also=lambda: os.path.exists(t.latest))
    t.finish(started)
    if t.complete(args) and t.fault:  # now on 1 rank, same --batch_size 3
        t.expect("--accum_iter 1 -> 2 keeps the effective batch" in t.runs[1]["output"],
                 "the 1-rank resume did not re-derive --accum_iter 1 -> 2", t.runs[1])


KIND_FUNCS = {k: globals()[f"kind_{k}"] for k in KINDS}
TWO_RANKS = {"sigusr1_torchrun_2ranks", "world_size_change"}


# ---- driver ---------------------------------------------------------------------------------------------

def exit_codes(codes):
    """'0 x2, 75 x2': each exit code seen and how often; 'hung' / 'timeout' for runs this script killed."""
    def name(rc):
        if isinstance(rc, int) and rc < 0:
            try:
                return f"{rc} ({signal.Signals(-rc).name})"
            except ValueError:
                pass
        return str(rc)
    counts = collections.Counter(codes)
    order = sorted(counts, key=lambda rc: (not isinstance(rc, int), rc if isinstance(rc, int) else 0, str(rc)))
    return ", ".join(f"{name(rc)} x{counts[rc]}" for rc in order)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trials", type=int, default=3, help="trials per fault kind")
    p.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS, metavar="KIND",
                   help="fault kinds (default: all): " + ", ".join(KINDS))
    p.add_argument("--seed", type=int, default=0, help="seed of the fault moments")
    p.add_argument("--out", default=None, help="working folder (default: a new temporary one, kept)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="fault_injection_"))
    os.makedirs(out, exist_ok=True)
    print(f"working in {out}", flush=True)

    data = make_caption_data(os.path.join(out, "data"), n_train=96, n_val=4)
    t0 = time.time()
    ref_out = os.path.join(out, "reference")
    ref_run = run_entry(ENTRY, run_args(data, ref_out), timeout=RUN_TIMEOUT, check=False)
    if ref_run.returncode != 0:
        print(f"the uninterrupted reference run failed ({ref_run.returncode}):\n"
              f"{tail(ref_run.stdout + ref_run.stderr, 40)}", flush=True)
        return 1
    reference = load_ckpt(os.path.join(ref_out, "checkpoint-latest.pth"))
    print(f"reference: {STEPS} steps in {time.time() - t0:.0f} s", flush=True)

    rows, details, problems = [], [], []
    for kind in args.kinds:
        rng = random.Random(f"{args.seed}-{kind}")
        atol = ATOL_2RANKS if kind in TWO_RANKS else 0.0
        completed = equal = lost = launched = 0
        codes, worst = [], 0.0
        for i in range(args.trials):
            t = Trial(kind, i, os.path.join(out, kind, f"trial{i}"), rng)
            started = time.time()
            try:
                KIND_FUNCS[kind](t, data)
            except Exception as e:  # noqa: BLE001 - a broken trial is reported, the others still run
                t.problems.append(f"the script failed: {type(e).__name__}: {e}")
            done = bool(t.runs) and t.runs[-1]["rc"] == 0
            same, diff, note = compare(t.latest, reference, atol) if done else (False, None, "did not complete")
            if done and not same:
                t.problems.append(f"final weights differ from the reference (max |diff| {diff}) {note}".strip())
            completed += done
            equal += same
            launched += len(t.runs)
            lost += t.steps_lost()
            codes += [r["rc"] for r in t.runs]
            worst = max(worst, diff or 0.0)
            print(f"{kind} trial {i}: {t.fault or 'no fault injected'}; exit codes {[r['rc'] for r in t.runs]}; "
                  f"resumed from steps {[r['resumed_step'] for r in t.runs[1:]]}; steps lost {t.steps_lost()}; "
                  f"{'equal' if same else 'NOT equal'} to the reference (max |diff| {diff}); "
                  f"{time.time() - started:.0f} s", flush=True)
            for prob in t.problems:
                print(f"  problem: {prob}", flush=True)
                problems.append(f"{kind} trial {i} ({t.out}): {prob}")
            details.append({"kind": kind, "trial": i, "fault": t.fault, "out": t.out, "problems": t.problems,
                            "runs": [{k: v for k, v in r.items() if k != "output"} for r in t.runs]})
        compare_how = f"within {atol:g}" if atol else "bitwise"
        rows.append([kind, str(args.trials), f"{completed}/{args.trials} ({launched} runs)", str(lost),
                     exit_codes(codes), f"{equal}/{args.trials} {compare_how}"
                     + (f" (max abs diff {worst:.1e})" if atol else "")])

    header = ["kind", "trials", "runs completed", "steps lost", "exit codes seen", "params equal to uninterrupted"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"seed": args.seed, "trials": args.trials, "rows": rows, "trials_detail": details}, f, indent=1)
    print(f"\n{sum(len(d['runs']) for d in details) + 1} runs in {(time.time() - t0) / 60:.1f} min "
          f"(seed {args.seed}; details in {out}/results.json)\n", flush=True)
    print(table, flush=True)
    if problems:
        print(f"\n{len(problems)} problem(s):", flush=True)
        for prob in problems:
            print(f"- {prob}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
