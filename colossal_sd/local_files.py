"""Which local file broke a load, and where: an error about a local model or dataset names the file (and the
line) at fault, never the hub.

The libraries' own errors often name neither (diffusers: "Unable to load weights"; datasets: a row number
inside a parsed chunk), so when loading a local path fails, its files are read again here, cheaply: JSON and
CSV are parsed line by line, safetensors and parquet files only have their header or footer checked.
"""

import csv
import json
from pathlib import Path

from colossal_sd.errors import first_line

MAX_DEPTH = 2  # a pipeline's part folders, or an imagefolder's split folders: enough to find the file at fault


def explain(path, error: BaseException) -> str:
    """Why loading `path` (a local file or folder) failed: the broken file and line, or the library's reason
    (naming the file when there is only one it can be about)."""
    candidates = _candidates(Path(path).expanduser(), _chain_text(error))
    for file in candidates:
        problem = check_file(file)
        if problem:
            return problem
    reason = first_line(root_cause(error))
    return f"{candidates[0]}: {reason}" if len(candidates) == 1 and str(candidates[0]) not in reason else reason


def check_file(file: Path):
    """What is wrong with one file, naming it, or None when it reads fine (or is of a kind not checked)."""
    check = CHECKS.get(file.suffix.lower())
    try:
        return check(file) if check else None
    except OSError as e:
        return f"{file} cannot be read ({e.strerror or first_line(e)})"


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception: libraries wrap the one that says what is wrong ("incomplete metadata", "JSON
    parse error") in ones that do not ("Unable to load weights", "An error occurred while generating")."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error


def _chain_text(error: BaseException) -> str:
    texts = [str(error)]
    while (error := error.__cause__ or error.__context__) is not None and len(texts) < 20:
        texts.append(str(error))
    return "\n".join(texts)


def _candidates(path: Path, error_text: str):
    """The files to check, those the error mentions first."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    files = sorted(f for f in _walk(path, MAX_DEPTH) if f.suffix.lower() in CHECKS)
    return sorted(files, key=lambda f: str(f) not in error_text)  # stable: mentioned ones first, then by name


def _walk(folder: Path, depth: int):
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and depth > 0:
            yield from _walk(entry, depth - 1)
        elif entry.is_file():
            yield entry


# ---------------------------------------------------------------- one check per kind of file


def json_problem(file: Path):
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        return f"{file} is not UTF-8 text ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return f"{file} line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})"
    return None


def jsonl_problem(file: Path):
    """Every line of a JSON Lines file must be one JSON object (datasets' json loader reads nothing else)."""
    with open(file, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                return f"{file} line {number}, column {e.colno}: not valid JSON ({e.msg})"
            if not isinstance(row, dict):
                return f"{file} line {number}: a JSON {type(row).__name__}, not an object of column values"
    return None


def csv_problem(file: Path):
    with open(file, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, strict=True)
        header, start = None, 1  # a quoted value may span lines: report the line its row starts on
        try:
            for row in reader:
                if header is None:
                    header = row
                elif len(row) > len(header):  # fewer is fine: the missing ones are read as empty
                    return (f"{file} line {start}: {len(row)} fields, the header has {len(header)} "
                            "(quote values that hold commas)")
                start = reader.line_num + 1
        except csv.Error as e:
            hint = " (a quote is left open)" if "end of data" in str(e) else ""
            return f"{file} line {start}: {e}{hint}"
    return None


def safetensors_problem(file: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except Exception as e:  # SafetensorError: a header cut short, or tensors reaching past the end of the file
        return f"{file} is corrupt or truncated ({first_line(e)})"
    return None


def parquet_problem(file: Path):
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        return f"{file} is corrupt or truncated (a parquet file starts and ends with 'PAR1')"
    return None


CHECKS = {".json": json_problem, ".jsonl": jsonl_problem, ".csv": csv_problem,
          ".safetensors": safetensors_problem, ".parquet": parquet_problem}
