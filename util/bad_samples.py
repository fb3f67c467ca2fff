"""Record samples the data pipeline replaced (corrupt, missing, undecodable, empty caption): counted, logged
with their path, and listed in `<output_dir>/bad_samples_rank<r>.tsv` (one file per rank, no collective per
step), one row per bad file for the whole run (a resumed run reads the rows already there). At each epoch
end, `end_epoch` sums the counts over ranks (every rank calls it) for one console line and a log.jsonl row.
"""
import os

import torch

from util import dist as du
from util.logger import LOG


class BadSampleLog:
    def __init__(self, output_dir, rank):
        self.path = os.path.join(output_dir, f"bad_samples_rank{rank}.tsv")
        self.listed = set()
        if os.path.exists(self.path):  # a resumed run: its files are listed already
            with open(self.path, encoding="utf-8", errors="replace") as f:
                self.listed = {line.split("\t")[1] for line in f if line.count("\t") >= 2}
        self.epoch_count = self.epoch_files = self.total = 0

    def __call__(self, entries, epoch):
        """entries: [(path_or_id, reason), ...] replaced in this step's batches (a file may occur twice)."""
        self.epoch_count += len(entries)
        new = {}
        for p, r in entries:
            if str(p) not in self.listed:
                new.setdefault(str(p), str(r))
        if not new:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for p, r in new.items():
                f.write(f"{epoch + 1}\t{p}\t{r}\n")
        self.listed.update(new)
        self.epoch_files += len(new)
        first = next(iter(new.items()))
        LOG.warning(f"replaced {len(new)} unreadable sample(s) first seen in this step, e.g. {first[0]}: {first[1]}; "
                    f"listed in {self.path}")

    def end_epoch(self, epoch, global_step, run_log, device):
        """Every rank: this epoch's replacements and newly listed files summed over ranks, plus the total of
        this launch, on the console and in log.jsonl (prefix `data`); the epoch counters restart."""
        counts = du.all_reduce_sum(torch.tensor([self.epoch_count, self.epoch_files], dtype=torch.float64,
                                                device=device)).tolist()
        replaced, files = int(counts[0]), int(counts[1])
        self.total += replaced
        self.epoch_count = self.epoch_files = 0
        if replaced:
            LOG.warning(f"epoch {epoch + 1}: {replaced} sample(s) replaced on all ranks ({files} bad file(s) listed "
                        f"for the first time); {self.total} replaced since this launch started; the files are in "
                        f"{os.path.dirname(self.path) or '.'}/bad_samples_rank*.tsv")
        if run_log is not None:
            run_log.write({"epoch": epoch + 1, "bad_samples_epoch": replaced, "bad_files_new": files,
                           "bad_samples_total": self.total}, global_step, prefix="data")
