"""Preemption: SIGTERM, SIGUSR1 or SIGINT ask the run to finish its optimizer step, save, and exit 75.

SLURM sends SIGTERM before killing a preempted job (and the sbatch's `--signal`, USR1, before its time
limit); torchrun passes them on to every worker (`--signals-to-handle`, scripts/launch_torchrun.sh). A
signal is only recorded. At every optimizer step all ranks agree on whether any of them received one,
through an all-reduce of one CPU integer over a gloo group (no device sync, and no rank can take a step the
others do not), then save one checkpoint together and exit with util.errors.EXIT_PREEMPTED. A second
signal during the save is recorded and ignored: the save completes (it is atomic anyway).

A rank blocked in a collective never returns to Python, so it could not act on a signal: that is the state
torchrun leaves the survivors in when a rank dies (it sends them SIGTERM). A watcher thread therefore learns
of each signal at once (`signal.set_wakeup_fd`), and if no optimizer step completes within
`3 x the last step's time + 5 s` after it (and no save or evaluation is under way), the process exits
(128 + signal), as it did before signals were handled; before training starts a signal exits at once
(nothing is lost). Data-loader workers ignore the three signals (`ignore_stop_signals`, their
worker_init_fn), so a Ctrl-C, or torchrun's SIGTERM to the process group, lets them serve the step being
finished; they exit with their parent.
"""
import contextlib
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from util.errors import EXIT_PREEMPTED
from util.logger import LOG

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_ACTIVE = []  # installed watches (util.run_common.entry_point uninstalls them when main() returns)


def uninstall_all():
    for watch in list(_ACTIVE):
        watch.uninstall()


def ignore_stop_signals(worker_id=None):
    """worker_init_fn of every DataLoader: the stop signals are the main process's to act on."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stop_data_workers():
    """SIGKILL the data-loader workers still alive when main() returns (a run stopped mid-epoch): they ignore
    SIGTERM, so multiprocessing's exit handler (terminate, then join) would wait for them forever."""
    import multiprocessing

    children = [c for c in multiprocessing.active_children() if c.daemon and c.is_alive()]
    if not children:
        return
    # torch's SIGCHLD handler would report these deaths as a crash: the run is over, restore the default
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


class PreemptionWatch:
    def __init__(self, slack_s=5.0):
        self.pid = os.getpid()
        self.received = None  # name of the first signal received, once one is
        self.slack_s = slack_s
        self._previous, self._wakeup, self._thread = {}, None, None
        self._group = None
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._state = "starting"  # starting -> training (steps beat) <-> holding (save, evaluation) -> done
        self._last_beat, self._last_step_s = None, 0.0
        self._signalled_at = None

    def install(self):
        """Handlers, the wakeup pipe and its watcher thread (main thread, before the data loaders start), and
        the CPU group the ranks agree through."""
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        # Past a file-size limit (ulimit -f) a write then fails with "file too large", reported as a failed
        # save (exit 4), instead of SIGXFSZ killing the process mid-write.
        self._previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._wakeup, self._write_fd = signal.set_wakeup_fd(write_fd), write_fd
        _ACTIVE.append(self)
        self._thread = threading.Thread(target=self._watch, args=(read_fd,), name="preemption-watch", daemon=True)
        self._thread.start()
        if dist.is_available() and dist.is_initialized():
            # one gloo group for the whole job: the default group itself when it is gloo (CPU runs)
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self

    def uninstall(self):
        """Restore the previous handlers (the run is over; matters when main() runs inside another program)."""
        self._state, self._group = "done", None  # (no reference to a process group outlives the run)
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._wakeup)
            os.close(self._write_fd)  # the watcher thread reads end-of-file and returns
            self._wakeup = None
            # Wait for it: a daemon thread still alive when the interpreter finalizes can abort the process at
            # exit ('terminate called without an active exception' after "done": 5 of 30 single-process runs
            # here without this join, 0 of 30 with it); the thread holds no lock and returns on end-of-file.
            if self._thread is not threading.current_thread():
                self._thread.join(timeout=5)
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked data-loader worker: keep serving the current step
            return
        self._record(signum)

    def _record(self, signum):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received, self._signalled_at = name, time.monotonic()
            LOG.warning(f"received {name}: finishing this optimizer step, then saving and exiting "
                        f"(exit code {EXIT_PREEMPTED}); send SIGKILL to stop at once")

    def _watch(self, read_fd):
        """Learns of every signal as it arrives, whatever the main thread is blocked in; exits a process that
        cannot reach its next step boundary (a peer is gone)."""
        while True:
            data = os.read(read_fd, 64)
            if not data:
                os.close(read_fd)
                return
            for signum in data:
                if signum not in SIGNALS or os.getpid() != self.pid:
                    continue
                first = self.received is None
                self._record(signum)
                if self._state == "starting":
                    LOG.warning("training has not started: exiting without a checkpoint (nothing to lose)")
                    os._exit(EXIT_PREEMPTED)
                if first:
                    threading.Thread(target=self._deadline, args=(signum,), daemon=True).start()

    def _deadline(self, signum):
        while True:
            time.sleep(0.25)
            if self._state == "done":
                return
            if self._state != "training":
                continue
            budget = 3 * self._last_step_s + self.slack_s
            since = time.monotonic() - max(self._last_beat or 0.0, self._signalled_at or 0.0)
            if since > budget:
                LOG.error(f"no optimizer step completed {since:.0f} s after the signal (budget {budget:.0f} s): "
                          "another rank is gone or stuck; exiting without saving")
                os._exit(128 + signum)

    def pending(self):
        """Whether any rank has received a signal (the same answer on every rank; one CPU collective). Called
        once per optimizer step: it is also the heartbeat the watcher measures steps by."""
        now = time.monotonic()
        if self._last_beat is not None and self._state == "training":
            self._last_step_s = now - self._last_beat
        self._last_beat, self._state = now, "training"
        self._flag.fill_(0 if self.received is None else 1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(self._flag.item())

    def finish(self):
        """Training is over (final evaluation, merged weights): a signal no longer sets a deadline."""
        self._state = "done"

    @contextlib.contextmanager
    def holding(self):
        """A phase without step beats that must not be cut short by the deadline (a save, an evaluation)."""
        before, self._state = self._state, "holding"
        try:
            yield
        finally:
            self._state = before
            self._last_beat = time.monotonic()
