"""Reading rows of record files (JSONL, CSV/TSV with a header) with errors that name the file and line."""
import csv
import json

from util.errors import UserError


def jsonl_records(path, keys, where):
    """(line number, record) for each non-blank line of a JSONL file; every record must be an object holding
    `keys`, else a UserError names `where`, the line and what was expected."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                for key in keys:
                    rec[key]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{where}:{line_no}: expected a JSON object with {' and '.join(keys)} ({e})") from None
            yield line_no, rec


def csv_records(path, required, optional, where):
    """(line number, {column: value}) for each non-empty row of a CSV (TSV by extension) with a header naming
    the `required` columns (and any of the `optional` ones); names are matched case-insensitively."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise UserError(f"{where}: header {header} needs column(s) named {' and '.join(missing)}")
        columns = {c: header.index(c) for c in (*required, *optional) if c in header}
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) <= max(columns.values()):
                raise UserError(f"{where}:{line_no}: expected {len(header)} columns, got {len(row)}")
            yield line_no, {c: row[i] for c, i in columns.items()}
