"""Read a data file into records (dicts), each remembering where it came from for error messages.

json (an array, or one object per line), jsonl, csv/tsv and parquet. JSON is parsed here so that a malformed line
is reported by number; csv and parquet go through `datasets`.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from loralab.errors import LoralabError, did_you_mean


@dataclass
class Record:
    data: dict
    file: str
    line: int  # 1-based line in the file (json arrays: the record's index + 1; csv: the row's line)

    def error(self, message: str, field: str | None = None, fix: str | None = None) -> LoralabError:
        return LoralabError(message, file=self.file, record=self.line, field=field, fix=fix)

    def get(self, field: str, kind: type | tuple = str, required: bool = True, empty_ok: bool = False):
        """The field's value, checked: missing, empty or wrongly typed fields raise an error naming this record."""
        value = self.data.get(field)
        if value is None:
            if required:
                present = ", ".join(self.data) or "none"
                close = difflib.get_close_matches(field, [str(k) for k in self.data], n=1, cutoff=0.5)
                hint = f"map your column to it with data.columns.{field}={close[0]}" if close else \
                    "add it, or map your column to it in data.columns"
                raise self.error("missing field", field, fix=f"{hint} (this record has: {present})")
            return None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.error(f"expected {names}, got {type(value).__name__} {str(value)[:40]!r}", field)
        if not empty_ok and isinstance(value, (str, list)) and len(value) == 0:
            raise self.error("empty field", field, fix="fill it in or drop the record")
        return value


def read_records(path: str | Path, columns: dict[str, str] | None = None, delimiter: str | None = None,
                 limit: int | None = None) -> list[Record]:
    """Read `path` into records; `columns` maps our field names to the file's column names."""
    path = Path(path)
    file = str(path)
    if path.is_dir():
        raise LoralabError("this is a folder, not a data file", file=file,
                           fix="point data.train / data.validation at a .json, .jsonl, .csv, .tsv or .parquet file")
    if path.is_symlink() and not path.exists():
        raise LoralabError("a symbolic link that leads nowhere (broken, or a loop)", file=file,
                           fix="point at the file itself")
    if not path.is_file():
        raise LoralabError("data file not found", file=file, fix="check data.train / data.validation")
    suffix = path.suffix.lower()
    raw = path.read_bytes()
    if not raw.strip():
        raise LoralabError("the data file is empty", file=file, fix="point at a file with records")
    if suffix in (".json", ".jsonl"):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise LoralabError("the file is not UTF-8 text", file=file, record=line,
                               fix="re-save it as UTF-8 (e.g. iconv -f GBK -t UTF-8)") from None
        rows = _read_json(text, file)
    elif suffix in (".csv", ".tsv", ".parquet"):
        rows = _read_table(path, suffix, delimiter)
    else:
        raise LoralabError(f"unsupported file type {suffix!r}", file=file,
                           fix="use .json, .jsonl, .csv, .tsv or .parquet")
    if not rows:
        raise LoralabError("the data file holds no records", file=file)
    _check_columns(columns or {}, rows, file)
    rename = {theirs: ours for ours, theirs in (columns or {}).items()}
    records = []
    for data, line in rows[:limit]:
        if not isinstance(data, dict):
            raise LoralabError(f"expected an object with fields, got {type(data).__name__}", file=file, record=line)
        records.append(Record({rename.get(k, k): v for k, v in data.items()}, file, line))
    return records


def _check_columns(columns: dict[str, str], rows: list[tuple], file: str) -> None:
    """A column named in data.columns that no record has is a typo, not an optional field."""
    present = dict.fromkeys(k for data, _ in rows if isinstance(data, dict) for k in data)
    for ours, theirs in columns.items():
        if theirs not in present:
            raise LoralabError(f"no record has the column {theirs!r}", file=file, field=f"data.columns.{ours}",
                               fix=did_you_mean(theirs, present, "one of the file's columns:"))


def _read_json(text: str, file: str) -> list[tuple[dict, int]]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoralabError(f"malformed JSON: {e.msg} (column {e.colno})", file=file, record=e.lineno,
                               fix="fix the JSON at that line") from None
        return [(item, i + 1) for i, item in enumerate(items)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((json.loads(line), number))
        except json.JSONDecodeError as e:
            raise LoralabError(f"malformed JSON line: {e.msg} (column {e.colno})", file=file, record=number,
                               fix="one JSON object per line") from None
    return rows


def _read_table(path: Path, suffix: str, delimiter: str | None) -> list[tuple[dict, int]]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        if suffix == ".parquet":
            table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        else:
            sep = delimiter or ("\t" if suffix == ".tsv" else ",")
            # quoting=3 (none) keeps quote characters that are part of the text, as in SST-2
            table = datasets.load_dataset("csv", data_files=str(path), split="train", sep=sep,
                                          quoting=3 if sep == "\t" else 0, keep_default_na=False)
    except Exception as e:  # pandas/arrow errors carry the detail; name the file
        causes = [e]
        while causes[-1].__cause__ or causes[-1].__context__:
            causes.append(causes[-1].__cause__ or causes[-1].__context__)
        if any(isinstance(c, UnicodeDecodeError) for c in causes):
            raise LoralabError("the file is not UTF-8 text", file=str(path),
                               fix="re-save it as UTF-8 (e.g. iconv -f GBK -t UTF-8)") from None
        if suffix == ".parquet":
            raise LoralabError(f"not a readable parquet file: {e}", file=str(path),
                               fix="write it again (e.g. pandas' to_parquet), or export it as csv/jsonl") from None
        raise LoralabError(f"cannot read the table: {e}", file=str(path),
                           fix="check the delimiter and quoting") from None
    offset = 1 if suffix == ".parquet" else 2  # csv: line 1 is the header
    return [(row, i + offset) for i, row in enumerate(table)]
