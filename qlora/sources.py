"""Where rows come from: JSONL, JSON, CSV and Parquet files, folders and globs of them, and Hugging
Face datasets by name. Every row comes with where it was found (file:line, or file:row N), so that
a bad row is reported where the user can open it.

A row that cannot even be parsed comes as a BadRow in place of the row; the policy of what to do
with it (fail, or drop and count) is data.py's.
"""
from __future__ import annotations

import csv
import glob
import json
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

from qlora.errors import UserError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
Row = Union[dict, Exception]


class BadRow(ValueError):
    """A row that cannot be used; the message says why."""


def is_local(path: str) -> bool:
    """Whether a data path names local files (rather than a Hugging Face dataset)."""
    p = Path(path).expanduser()
    return (p.exists() or any(c in path for c in "*?[") or path.startswith((".", "/", "~"))
            or p.suffix.lower() in SUFFIXES or path.count("/") > 1)


def local_files(path: str) -> List[Path]:
    """The data files a path names: a file, every data file in a folder (recursively), or a glob."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise UserError(f"{path}: the folder holds no {', '.join(SUFFIXES)} files")
        return files
    if any(c in path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"{path}: the pattern matches no file")
        return files
    if not p.is_file():
        raise UserError(f"{path}: no such file")
    return [p]


def check_path(key: str, path: str) -> Optional[str]:
    """A problem with a data path, found before anything is loaded (None when fine)."""
    if not is_local(path):
        return None  # a Hugging Face dataset name: checked when loaded
    try:
        files = local_files(path)
    except UserError as e:
        return f"{key}={e}"
    odd = [f.name for f in files if f.suffix.lower() not in SUFFIXES]
    if odd:
        return f"{key}={path}: {odd[0]} is not a .jsonl, .json, .csv or .parquet file"
    return None


def read_rows(path: str, subset: Optional[str] = None, split: str = "train") -> Iterator[Tuple[str, Row]]:
    """(where, row) for every row a path names; a row that does not parse comes as a BadRow."""
    if not is_local(path):
        yield from hub_rows(path, subset, split)
        return
    for f in local_files(path):
        reader = {".jsonl": jsonl_rows, ".json": json_rows, ".csv": csv_rows, ".parquet": parquet_rows}
        yield from reader[f.suffix.lower()](f)


def jsonl_rows(f: Path) -> Iterator[Tuple[str, Row]]:
    with f.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                yield f"{f}:{lineno}", _parse(line)


def _parse(text: str) -> Row:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return BadRow(f"malformed JSON ({e.msg} at column {e.colno})")


def json_rows(f: Path) -> Iterator[Tuple[str, Row]]:
    """A JSON array of rows (or {"data": [...]}), each reported at the line where it starts."""
    text = f.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as e:
        yield f"{f}:{e.lineno}", BadRow(f"malformed JSON ({e.msg} at column {e.colno})")
        return
    items = whole.get("data") if isinstance(whole, dict) else whole
    if not isinstance(items, list):
        yield f"{f}:1", BadRow('a .json file must hold a list of rows (or {"data": [...]})')
        return
    # find where each item starts, to report it by line
    i = text.index("[", text.index('"data"') if isinstance(whole, dict) else 0) + 1
    for item in items:
        while text[i] in " \t\r\n,":
            i += 1
        _, end = decoder.raw_decode(text, i)
        yield f"{f}:{text.count(chr(10), 0, i) + 1}", item
        i = end


def csv_rows(f: Path) -> Iterator[Tuple[str, Row]]:
    """Rows of a CSV with a header; cells holding JSON lists (messages, conversations) are parsed."""
    with f.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        start = 2
        for row in reader:
            if None in row:
                yield f"{f}:{start}", BadRow(f"more cells than the {len(reader.fieldnames)} columns of the header")
            else:
                yield f"{f}:{start}", {k: _maybe_json(v) for k, v in row.items()}
            start = reader.line_num + 1


def _maybe_json(cell: Optional[str]):
    if cell and cell.lstrip().startswith("["):
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell
    return cell


def parquet_rows(f: Path) -> Iterator[Tuple[str, Row]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(f)
    except Exception as e:  # pyarrow raises several types for a damaged file
        yield f"{f}:row 1", BadRow(f"not a readable Parquet file ({str(e).splitlines()[0]})")
        return
    for i, row in enumerate(table.to_pylist(), 1):
        yield f"{f}:row {i}", row


def hub_rows(name: str, subset: Optional[str], split: str) -> Iterator[Tuple[str, Row]]:
    """Rows of a Hugging Face dataset (needs the network, or the datasets cache: where the hub's host does
    not resolve, the cache is read at once)."""
    import datasets

    from qlora.hub import go_offline, hub_unreachable
    from qlora.models import say

    unreachable = hub_unreachable()
    if unreachable:
        go_offline()
        say(f"the Hugging Face hub cannot be reached ({unreachable}): reading {name} from the datasets cache")
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # offline, unknown name, gated, bad split: the library's message says which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"data.path={name}: not a local file, folder or glob, and loading it as a Hugging Face "
                        f"dataset (subset={subset}, split={split}) failed: {first}"
                        + (f"; the hub cannot be reached ({unreachable}), so only the datasets cache was read"
                           if unreachable else "")) from None
    for i, row in enumerate(ds, 1):
        yield f"{name}[{split}]:row {i}", row
