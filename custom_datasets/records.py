"""Reading rows of record files (JSONL, CSV/TSV with a header) with errors that name the file and line.

Text files must be UTF-8 (a leading byte-order mark is dropped): a line that is not gets one error naming
the file, the line and the byte, before any training starts; nothing is decoded with a guessed encoding."""
import csv
import json

from util.errors import UserError


def not_utf8(path, line_no, line, err):
    """The UserError for `line` (bytes) of `path`, which failed to decode with UnicodeDecodeError `err`."""
    return UserError(f"{path}:{line_no}: not UTF-8 text (byte 0x{line[err.start]:02x} at column {err.start + 1}); "
                     f"convert the file, e.g. `iconv -f latin1 -t utf-8 {path} > fixed`")


def utf8_lines(path):
    """(line number, line with its ending) of a UTF-8 text file, read as bytes and decoded strictly."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise not_utf8(path, line_no, raw, e) from None


def text_rows(path):
    """The lines of `path` (utf8_lines without the numbers), for csv.reader; the reader's own `line_num`
    counts them."""
    return (line for _, line in utf8_lines(path))


def jsonl_records(path, keys, where):
    """(line number, record) for each non-blank line of a JSONL file; every record must be an object holding
    `keys`, else a UserError names `where`, the line and what was expected."""
    for line_no, line in utf8_lines(path):
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
    reader = csv.reader(text_rows(path), delimiter="\t" if path.lower().endswith(".tsv") else ",")
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in required if c not in header]
    if missing:
        raise UserError(f"{where}: header {header} needs column(s) named {' and '.join(missing)}")
    columns = {c: header.index(c) for c in (*required, *optional) if c in header}
    for row in reader:
        if not row:
            continue
        if len(row) <= max(columns.values()):
            raise UserError(f"{where}:{reader.line_num}: expected {len(header)} columns, got {len(row)}")
        yield reader.line_num, {c: row[i] for c, i in columns.items()}
