"""A progress bar for commands that work through many items: count, rate, ETA on stderr, rewritten in place on
a terminal and printed every 10% otherwise (a log file gets a few whole lines, not carriage returns)."""
import sys
import time

from util.logger import format_duration


class Progress:
    def __init__(self, total, what, stream=None):
        self.total, self.what, self.done = int(total), what, 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start, self.next_mark = time.perf_counter(), 0.1

    def update(self, n):
        self.done = min(self.total, self.done + n)
        share = self.done / max(self.total, 1)
        if self.tty or share >= self.next_mark or self.done == self.total:
            while self.next_mark <= share:
                self.next_mark += 0.1
            self._print(end="\r" if self.tty and self.done < self.total else "\n")

    def _print(self, end):
        elapsed = time.perf_counter() - self.start
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 24
        bar = "#" * int(width * self.done / max(self.total, 1))
        self.stream.write(f"{self.what}: [{bar:<{width}}] {self.done}/{self.total} | {rate:.1f}/s | "
                          f"eta {format_duration(eta)}{end}")
        self.stream.flush()
