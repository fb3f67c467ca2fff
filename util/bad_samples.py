"""Record samples the data pipeline replaced (corrupt, missing, undecodable): counted, logged with their
path, and listed in `<output_dir>/bad_samples_rank<r>.tsv` (one file per rank: no collective needed)."""
import os

from util.logger import LOG


class BadSampleLog:
    def __init__(self, output_dir, rank):
        self.path = os.path.join(output_dir, f"bad_samples_rank{rank}.tsv")
        self.seen = set()
        self.count = 0

    def __call__(self, entries, epoch):
        """entries: [(path_or_id, reason), ...] replaced in this step's batches."""
        new = [(str(p), str(r)) for p, r in entries if (str(p), str(r)) not in self.seen]
        self.count += len(entries)
        if not new:
            return
        with open(self.path, "a") as f:
            for p, r in new:
                self.seen.add((p, r))
                f.write(f"{epoch}\t{p}\t{r}\n")
        LOG.warning(f"replaced {len(new)} unreadable sample(s) (total {self.count} replacements, "
                    f"{len(self.seen)} distinct), e.g. {new[0][0]}: {new[0][1]}; listed in {self.path}")
