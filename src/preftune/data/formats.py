"""Rows of any supported shape → `PreferencePair(prompt, chosen, rejected)`, with one-line errors.

Sources (`load_pairs(source)`):
    *.jsonl    one JSON object per line; blank lines are ignored; rows are named "data.jsonl line 3" (1-based line)
    *.json     a list of objects, or an object with a single list value ({"data": [...]});
               rows are named "data.json index 0" (0-based list index)
    *.csv      header row, then one row per pair (all values are strings); "data.csv row 1" is the first data row
    *.parquet  "data.parquet row 1" is the first row
    owner/name a Hugging Face hub dataset (when no such local path exists); "hub:owner/name[train] row 1"
Files are strict UTF-8 text (a leading BOM is fine): a bad byte, a UTF-16 file, a NUL byte or a source without a
single row is an error.

Shapes, detected per row after `--columns` renamed source columns to the canonical names:
    standard         {"prompt": "Q: hi there\\nA: ", "chosen": "good", "rejected": "bad"}
    conversational   {"prompt": [{"role": "user", "content": "hi"}],
                      "chosen": [{"role": "assistant", "content": "good"}], "rejected": [...]}
    implicit prompt  {"chosen": "Q: hi there\\nA: good", "rejected": "Q: hi there\\nA: bad"}
                     → prompt "Q: hi there\\nA: ", chosen "good", rejected "bad" (shared beginning, cut after
                     whitespace so no word is split); message lists share whole leading messages instead.
    Anthropic HH     {"chosen": "\\n\\nHuman: hi\\n\\nAssistant: good",
                      "rejected": "\\n\\nHuman: hi\\n\\nAssistant: bad"}
                     → prompt "\\n\\nHuman: hi\\n\\nAssistant:", chosen " good", rejected " bad" (split after the
                     last "\\n\\nAssistant:", as TRL's hh-rlhf script does).
Pairwise datasets such as stack-exchange (question/response_j/response_k) load with
`--columns prompt=question,chosen=response_j,rejected=response_k`; `--columns prompt=` ignores a prompt column
so that the prompt becomes the shared beginning of chosen and rejected.

Nothing is repaired silently: a bad row is a `UserError` naming source, line/row and field; rows whose chosen and
rejected are identical are skipped and counted in `LoadReport` (or are an error with on_identical="error").
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import socket
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from preftune.errors import UserError

log = logging.getLogger("preftune")

Message = dict[str, str]  # {"role": ..., "content": ...}

CANONICAL = ("prompt", "chosen", "rejected")
COLUMN_NAMES = (*CANONICAL, "completion", "label")  # --columns names: pairs, and unpaired examples (unpaired.py)
ROLES = ("system", "user", "assistant", "tool")
SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
ON_IDENTICAL = ("skip", "error")
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
# owner/name, as the hub spells dataset ids (a data-file extension makes it a missing local file instead).
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class PreferencePair:
    """One preference: a prompt and two responses, all plain text or all lists of messages.

    `where` names the source row for error messages: "data.jsonl line 3", "data.csv row 2",
    "hub:owner/name[train] row 5".
    """

    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    where: str
    label: bool | None = None  # an unpaired example (data/unpaired.py): True desirable; None for a pair


@dataclass
class LoadReport:
    """What `load_pairs` read and what it skipped. `shapes` counts pairs per detected shape."""

    rows: int = 0  # data rows read (blank jsonl lines are not rows)
    pairs: int = 0  # pairs returned
    identical_skipped: int = 0  # chosen == rejected (after prompt extraction), skipped
    shapes: Counter = field(default_factory=Counter)  # "standard" / "conversational" / "implicit" / "hh"
    rejected_lists: Counter = field(default_factory=Counter)  # k → rows whose 'rejected' lists k responses

    def summary(self) -> str:
        """One line, e.g. "120 rows → 117 pairs (hh 117); 3 skipped (chosen == rejected)"; rows with a list of
        rejected responses add e.g. "; 12 rows with 3 rejected each → 36 pairs"."""
        shapes = ", ".join(f"{name} {n}" for name, n in sorted(self.shapes.items()))
        expanded = "".join(
            f"; {n} rows with {k} rejected each → {n * k} pairs" for k, n in sorted(self.rejected_lists.items())
        )
        return (
            f"{self.rows} rows → {self.pairs} pairs ({shapes or 'none'}); "
            f"{self.identical_skipped} skipped (chosen == rejected){expanded}"
        )


# ----------------------------------------------------------------------------------------------------- columns


def parse_columns(spec: str | None) -> dict[str, str]:
    """ "prompt=question,chosen=response_j,rejected=response_k" → {"prompt": "question", ...} (canonical → source).

    None or "" → {}. "prompt=" (empty source) means: ignore any prompt column and use the implicit prompt.
    """
    if spec is None or not spec.strip():
        return {}
    columns: dict[str, str] = {}
    for item in spec.split(","):
        name, eq, source = (part.strip() for part in item.partition("="))
        if not eq:
            raise UserError(f"--columns: expected NAME=COLUMN items separated by commas, got '{item.strip()}'")
        if name not in COLUMN_NAMES:
            raise UserError(
                f"--columns: unknown name '{name}' in '{item.strip()}'; "
                f"expected prompt, chosen, rejected, completion or label"
            )
        if name in columns:
            raise UserError(f"--columns: '{name}' is given twice")
        if not source and name != "prompt":
            raise UserError(f"--columns: '{name}=' needs a column name (only 'prompt=' may be empty)")
        columns[name] = source
    _check_columns(columns)
    return columns


def _check_columns(columns: dict[str, str]) -> None:
    for name in columns:
        if name not in COLUMN_NAMES:
            raise UserError(f"--columns: unknown name '{name}'; expected prompt, chosen, rejected, completion or label")
    sources = [s for s in columns.values() if s]
    for source in set(sources):
        if sources.count(source) > 1:
            names = " and ".join(n for n, s in columns.items() if s == source)
            raise UserError(f"--columns: column '{source}' is given for both {names}")


def _apply_columns(
    row: dict[str, Any], columns: dict[str, str], where: str, names: tuple[str, ...] = CANONICAL
) -> dict[str, Any]:
    """The row's fields `names`: mapped columns renamed, unmapped names taken as they are."""
    fields = {name: row[name] for name in names if name in row and name not in columns}
    for name, source in columns.items():
        if not source or name not in names:  # "prompt=": no prompt column, whatever the row holds
            continue
        if source not in row:
            raise UserError(
                f"{where}: column '{source}' (--columns {name}={source}) not found; the row has: {_column_list(row)}"
            )
        fields[name] = row[source]
    return fields


def _column_list(row: dict[str, Any]) -> str:
    return ", ".join(_printable(str(name)) for name in row) or "no columns"


def _printable(text: str) -> str:
    """`text` with control characters escaped ("a\\nb" → "a\\\\nb"): a value quoted in an error stays one line and
    cannot move the terminal's cursor or change its colours."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ------------------------------------------------------------------------------------------------- row → pair


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_kinds(fields: dict[str, Any], where: str) -> bool:
    """True when the row is conversational (message lists), False for plain text; raises on other types or a mix."""
    for name, value in fields.items():
        if not isinstance(value, (str, list)):
            raise UserError(f"{where}: field '{name}' must be a string or a list of messages, got {_type_name(value)}")
        # Before the mix check: a list of token ids or strings is not "a list of messages" either.
        for i, item in enumerate(value if isinstance(value, list) else []):
            if not isinstance(item, dict):
                raise UserError(
                    f"{where}: field '{name}' message {i} must be an object with 'role' and 'content', "
                    f"got {_type_name(item)}"
                )
    kinds = {name: isinstance(value, list) for name, value in fields.items()}
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{n} is {'a list of messages' if k else 'a string'}" for n, k in kinds.items())
        hint = (
            " (to take the prompt from the shared beginning of chosen and rejected, pass --columns prompt=)"
            if kinds.get("prompt") is False
            else ""
        )
        raise UserError(f"{where}: fields mix plain text and message lists ({described}); use one kind{hint}")
    return any(kinds.values())


def _check_messages(messages: list, name: str, where: str) -> None:
    if not messages:
        raise UserError(f"{where}: field '{name}' is an empty list of messages")
    for i, message in enumerate(messages):
        at = f"{where}: field '{name}' message {i}"
        if not isinstance(message, dict):
            raise UserError(f"{at} must be an object with 'role' and 'content', got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise UserError(f"{at} has no '{key}'")
            if not isinstance(message[key], str):
                raise UserError(f"{at}: '{key}' must be a string, got {_type_name(message[key])}")
        if message["role"] not in ROLES:
            raise UserError(f"{at}: unknown role {message['role']!r}; expected one of {', '.join(ROLES)}")


def _check_text_response(text: str, name: str, where: str, implicit: bool) -> None:
    if not text.strip():
        after = " once the prompt shared with the other response is removed" if implicit else ""
        raise UserError(f"{where}: field '{name}' is empty{after}")


def _check_message_response(messages: list[Message], name: str, where: str, implicit: bool) -> None:
    if not messages:
        raise UserError(f"{where}: field '{name}' is empty once the prompt shared with the other response is removed")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: field '{name}': conversation with no assistant turn")
    if messages[0]["role"] != "assistant":
        # The prompt is everything before the response, so the response starts with the assistant's turn;
        # otherwise the prompt would be rendered twice or a user turn would be scored as the response.
        why = "chosen and rejected share no leading messages" if implicit else "the prompt belongs in 'prompt'"
        raise UserError(
            f"{where}: field '{name}' must start with an assistant turn, got role '{messages[0]['role']}' ({why})"
        )
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        raise UserError(f"{where}: field '{name}' is empty (its assistant turns have no content)")


def common_prefix_length(items: Sequence, other_items: Sequence) -> int:
    """Number of leading items the two sequences share: [1, 2, 3], [1, 2, 4, 5] → 2. Characters and messages
    here (implicit prompts), token ids in `tokenize` (the prompt/response boundary), which imports it from here."""
    n = 0
    for a, b in zip(items, other_items):
        if a != b:
            break
        n += 1
    return n


def shared_text_prompt(chosen: str, rejected: str) -> int:
    """Length of the implicit prompt of two strings: their longest common prefix, moved back so the split
    falls at the start or just after whitespace (never mid-word).

    "Q: hi there\\nA: good" / "Q: hi there\\nA: bad" → 15 (the prompt is "Q: hi there\\nA: ")
    "The answer is yes" / "The answer is yellow" → 14 ("The answer is "), not 16 ("The answer is ye").
    """
    n = common_prefix_length(chosen, rejected)
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    return n


def shared_message_prompt(chosen: list[Message], rejected: list[Message]) -> int:
    """Number of whole leading messages shared by both conversations (as trl.data_utils.extract_prompt)."""
    return common_prefix_length(chosen, rejected)


def _check_encodable(fields: dict[str, Any], where: str) -> None:
    """Every text must be encodable: a lone surrogate (JSON "\\ud800") is a Python string no tokenizer accepts."""
    for name, value in fields.items():
        for text in [value] if isinstance(value, str) else [message["content"] for message in value]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise UserError(
                    f"{where}: field '{name}' holds {text[e.start]!r}, half of a UTF-16 surrogate pair, "
                    f"which no tokenizer can encode (a broken \\u escape?)"
                ) from None


def _split_hh(text: str) -> tuple[str, str]:
    """ "\\n\\nHuman: hi\\n\\nAssistant: good" → ("\\n\\nHuman: hi\\n\\nAssistant:", " good")."""
    cut = text.rindex(HH_ASSISTANT) + len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def _is_hh(chosen: str, rejected: str) -> bool:
    return all(marker in text for text in (chosen, rejected) for marker in (HH_HUMAN, HH_ASSISTANT))


def _split_messages(fields: dict[str, Any], where: str) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) of a conversational row; without a prompt, the shared leading messages."""
    for name, messages in fields.items():
        _check_messages(messages, name, where)
    chosen, rejected = fields["chosen"], fields["rejected"]
    if "prompt" in fields:
        return fields["prompt"], chosen, rejected
    n = shared_message_prompt(chosen, rejected)
    return chosen[:n], chosen[n:], rejected[n:]


def _split_text(fields: dict[str, Any], where: str) -> tuple[str, str, str, str]:
    """(prompt, chosen, rejected, shape) of a plain-text row: standard, Anthropic HH or implicit prompt."""
    chosen, rejected = fields["chosen"], fields["rejected"]
    if "prompt" in fields:
        return fields["prompt"], chosen, rejected, "standard"
    if _is_hh(chosen, rejected):
        prompt, chosen = _split_hh(chosen)
        prompt_rejected, rejected = _split_hh(rejected)
        if prompt != prompt_rejected:
            raise UserError(
                f"{where}: Anthropic HH transcripts 'chosen' and 'rejected' differ before their last "
                f"{HH_ASSISTANT!r} turn; the prompt must be shared"
            )
        return prompt, chosen, rejected, "hh"
    n = shared_text_prompt(chosen, rejected)
    return chosen[:n], chosen[n:], rejected[n:], "implicit"


def row_to_pair(
    row: dict[str, Any], where: str, columns: dict[str, str] | None = None, *, strict: bool = True
) -> tuple[PreferencePair, str]:
    """One row → (pair, shape name). Raises UserError naming `where` and the field at fault.

    strict=False is the audit's reading: empty responses and encoding problems are not errors (the audit counts
    them); every other check still raises, including the structure of conversational responses.
    """
    fields = _apply_columns(row, columns or {}, where)
    for name in ("chosen", "rejected"):
        if name not in fields:
            hint = (
                "an unpaired example (prompt, completion, label) trains only with --loss kto or apo_zero_unpaired"
                if (columns or {}).get("completion", "completion") in row
                else "rename columns with --columns"
            )
            raise UserError(f"{where}: missing field '{name}' (the row has: {_column_list(row)}; {hint})")
    conversational = _check_kinds(fields, where)
    implicit = "prompt" not in fields
    if conversational:
        (prompt, chosen, rejected), shape = _split_messages(fields, where), "conversational"
    else:
        prompt, chosen, rejected, shape = _split_text(fields, where)
    if strict:
        _check_encodable(fields, where)
    # An identical pair is skipped or refused by the caller, whatever its responses hold.
    if chosen != rejected:
        for name, response in (("chosen", chosen), ("rejected", rejected)):
            if conversational and strict:
                _check_message_response(response, name, where, implicit)
            elif conversational and response:
                # Every content filled in: only the structure checks (assistant turn, order) can fire.
                _check_message_response([{**m, "content": "x"} for m in response], name, where, implicit)
            elif strict:
                _check_text_response(response, name, where, shape == "implicit")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, where=where), shape


# ----------------------------------------------------------------------------------------------------- sources


def _decode(data: bytes, path: str, first_line: int = 1) -> str:
    """Strict UTF-8 (a leading BOM is allowed); a bad byte → UserError naming the file and line."""
    if first_line == 1 and data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(
            f"{path} line 1: the file is UTF-16 (it starts with a UTF-16 byte order mark); save the file as UTF-8"
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        # Valid UTF-8, yet no text file holds a NUL byte: binary data, or UTF-16/32 without a byte order mark.
        line = first_line + data.count(b"\n", 0, nul)
        raise UserError(
            f"{path} line {line}: holds a NUL byte (0x00), so it is not a text file (binary data or "
            f"UTF-16?); save the file as UTF-8"
        )
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise UserError(
            f"{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8"
        ) from None


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _lines(path: str) -> Iterator[bytes]:
    """The file's lines without their b"\\n", read one at a time (never the whole file): as `read_bytes().split()`,
    minus the empty piece after a final newline, which would be a blank line anyway."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                yield raw[:-1] if raw.endswith(b"\n") else raw
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _rows_jsonl(path: str) -> Iterator[tuple[dict, str]]:
    for i, raw in enumerate(_lines(path), start=1):
        text = _decode(raw, path, first_line=i)
        if not text.strip():
            continue
        where = f"{path} line {i}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({_json_problem(e)})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {_json_type(row)}")
        yield row, where


def _json_problem(e: json.JSONDecodeError) -> str:
    """ "Expecting value at column 13"; "Unterminated string starting at column 30" (json's message ends in "at")."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _rows_json(path: str) -> Iterator[tuple[dict, str]]:
    try:
        data = json.loads(_decode(_read_bytes(path), path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({_json_problem(e)})") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(data) != 1 or len(lists) != 1:
            raise UserError(
                f"{path}: expected a list of objects or an object with a single list value "
                f'(like {{"data": [...]}}), got an object with keys: {", ".join(data) or "none"}'
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of objects, got {_json_type(data)}")
    for i, row in enumerate(data):
        where = f"{path} index {i}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, got {_json_type(row)}")
        yield row, where


def _rows_csv(path: str) -> Iterator[tuple[dict, str]]:
    text = _decode(_read_bytes(path), path)
    # strict: a quoted value never closed (a file cut short) is an error, not a value running to the end of the file.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise UserError(f"{path}: empty file; expected a header row")
        duplicates = sorted({name for name in header if header.count(name) > 1})
        if duplicates:
            raise UserError(f"{path} header: column {duplicates[0]!r} appears more than once")
        for i, values in enumerate(reader, start=1):
            if not values:  # a blank line holds no row
                continue
            where = f"{path} row {i}"
            if len(values) != len(header):
                raise UserError(f"{where}: has {len(values)} values, the header has {len(header)} columns")
            yield dict(zip(header, values)), where
    except csv.Error as e:
        raise UserError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None


def _rows_parquet(path: str) -> Iterator[tuple[dict, str]]:
    import pyarrow
    import pyarrow.parquet as pq

    # Row group by row group: memory holds one group's rows, not the file's.
    i = 0
    try:
        with pq.ParquetFile(path) as f:
            for group in range(f.num_row_groups):
                for row in f.read_row_group(group).to_pylist():
                    i += 1
                    yield row, f"{path} row {i}"
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


_READERS = {".jsonl": _rows_jsonl, ".json": _rows_json, ".csv": _rows_csv, ".parquet": _rows_parquet}


def _looks_like_hub_name(source: str) -> bool:
    return bool(_HUB_NAME.match(source)) and not source.lower().endswith(SUPPORTED_EXTENSIONS)


def _rows_local(source: str) -> Iterator[tuple[dict, str]]:
    if os.path.isdir(source):
        raise UserError(f"{source}: is a folder; expected a data file ({', '.join(SUPPORTED_EXTENSIONS)})")
    suffix = Path(source).suffix.lower()
    if suffix not in _READERS:
        raise UserError(
            f"{source}: unsupported file type '{suffix or '(none)'}'; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)} or a hub dataset name owner/name"
        )
    return _READERS[suffix](source)


# ----------------------------------------------------------------------------------------------------- hub


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline_requested() -> bool:
    """Read at call time: `datasets` and `huggingface_hub` read these variables once, at import."""
    import datasets

    return datasets.config.HF_HUB_OFFLINE or any(
        _env_true(name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(endpoint: str, timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to the hub endpoint within `timeout` seconds. Without this, an unreachable hub costs
    ~25 s of retries inside `datasets` before its error."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _offline_mode() -> Iterator[None]:
    """Make `datasets` use its local cache only, for this call."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _rows_hub(name: str, split: str) -> Iterator[tuple[dict, str]]:
    import datasets
    import huggingface_hub.constants as hub_constants

    offline = _offline_requested()
    if not offline and not _hub_reachable(hub_constants.ENDPOINT):
        offline = True
        why = f"cannot reach the Hugging Face hub ({hub_constants.ENDPOINT})"
    else:
        why = "offline mode (HF_HUB_OFFLINE) is on"
    try:
        if offline:
            with _offline_mode():
                dataset = datasets.load_dataset(name, split=split)
        else:
            dataset = datasets.load_dataset(name, split=split)
    except (OSError, ValueError) as e:  # ConnectionError, DatasetNotFoundError, unknown split, ...
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if offline:
            raise UserError(f"hub dataset '{name}': {why} and it is not in the local cache ({detail})") from None
        raise UserError(f"hub dataset '{name}' split '{split}': {detail}") from None
    for i, row in enumerate(dataset, start=1):
        yield row, f"hub:{name}[{split}] row {i}"


# ----------------------------------------------------------------------------------------------------- entry


def load_pairs(
    source: str, *, columns: dict[str, str] | None = None, on_identical: str = "skip", split: str = "train"
) -> tuple[list[PreferencePair], LoadReport]:
    """Read every row of `source` (a local file or a hub dataset name) into pairs.

    columns: canonical name → source column (see `parse_columns`). on_identical: "skip" (counted) or "error".
    split: the hub split; ignored for local files. Keeps the whole source in memory (`read_pairs` does not).
    """
    report = LoadReport()
    pairs = list(read_pairs(source, report, columns=columns, on_identical=on_identical, split=split))
    return pairs, report


def read_pairs(
    source: str,
    report: LoadReport,
    *,
    columns: dict[str, str] | None = None,
    on_identical: str = "skip",
    split: str = "train",
) -> Iterator[PreferencePair]:
    """`load_pairs` one pair at a time: the same pairs, checks and errors, counted into `report` as they are read
    (its totals are final once the iterator is exhausted). .jsonl and .parquet files are read a line or a row
    group at a time, so memory does not grow with the file; other sources are read whole by their reader.
    """
    if on_identical not in ON_IDENTICAL:
        raise UserError(f"--on-identical must be one of {', '.join(ON_IDENTICAL)}, got '{on_identical}'")
    columns = dict(columns or {})
    _check_columns(columns)
    return _pairs_of_rows(source, _rows_of(source, split), report, columns, on_identical)


def _rows_of(source: str, split: str) -> Iterator[tuple[dict, str]]:
    """(row, where) of a local file, or of a hub dataset's `split`."""
    if os.path.exists(source):
        return _rows_local(source)
    if _looks_like_hub_name(source):
        return _rows_hub(source, split)
    raise UserError(f"{source}: no such file")


def _rejected_list(row: dict[str, Any], columns: dict[str, str]) -> list | None:
    """The row's rejected responses when its 'rejected' field lists several (strings, or conversations: lists of
    messages), else None (a string, or one conversation: a list of message objects)."""
    value = row.get(columns.get("rejected") or "rejected")
    if (
        isinstance(value, list)
        and value
        and (all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value))
    ):
        return value
    return None


_REJECTED_ITEM = re.compile(r"(.*) rejected\[(\d+)\]", re.DOTALL)


def rejected_item(where: str) -> tuple[str, int | None]:
    """(source row, item) of a pair's `where`: ("d.jsonl line 3", 1) for "d.jsonl line 3 rejected[1]", the pair of
    item 1 of that row's list of rejected responses (see `_expand_rejected`); (where, None) for a row's only pair."""
    match = _REJECTED_ITEM.fullmatch(where)
    return (match.group(1), int(match.group(2))) if match else (where, None)


def _expand_rejected(
    rows: Iterator[tuple[dict, str]], columns: dict[str, str], report: LoadReport | None = None
) -> Iterator[tuple[dict, str, bool]]:
    """(row, where, first) per pair: a row whose 'rejected' lists k responses becomes k rows, one per rejected
    response with the same prompt and chosen (the all-pairs form of a ranking: chosen over each), `where` naming
    the item as "rejected[i]"; `first` is True for a source row's first pair. Counted in `report.rejected_lists`."""
    for row, where in rows:
        several = _rejected_list(row, columns)
        if several is None:
            yield row, where, True
            continue
        if report is not None:
            report.rejected_lists[len(several)] += 1
        name = columns.get("rejected") or "rejected"
        for i, rejected in enumerate(several):
            yield {**row, name: rejected}, f"{where} rejected[{i}]", i == 0


def _pairs_of_rows(
    source: str, rows: Iterator[tuple[dict, str]], report: LoadReport, columns: dict[str, str], on_identical: str
) -> Iterator[PreferencePair]:
    first = {}  # kind → `where` of its first pair: "text" / "chat" (see `_warn_if_mixed`)
    for row, where, new_row in _expand_rejected(rows, columns, report):
        report.rows += int(new_row)
        pair, shape = row_to_pair(row, where, columns)
        if pair.chosen == pair.rejected:
            if on_identical == "error":
                raise UserError(f"{where}: 'chosen' and 'rejected' are identical (--on-identical error)")
            report.identical_skipped += 1
            continue
        report.pairs += 1
        report.shapes[shape] += 1
        first.setdefault("text" if isinstance(pair.chosen, str) else "chat", pair.where)
        yield pair
    if not report.rows:
        raise UserError(f"{source}: holds no data rows (an empty file, blank lines only or an empty list)")
    _warn_if_mixed(source, first)


def _warn_if_mixed(source: str, first: dict[str, str]) -> None:
    """Plain-text and conversational pairs in one source are allowed (tests/data/fmt_shapes.jsonl holds every
    shape), but are often a mistake: the chat template formats the conversations only. Said once, not per row."""
    if "text" in first and "chat" in first:
        log.warning(
            "%s: mixes plain-text pairs (first: %s) and conversations (first: %s); the chat template "
            "formats the conversations only",
            source,
            first["text"],
            first["chat"],
        )


def iter_pairs(source: str, columns: dict[str, str] | None = None) -> Iterator[tuple[PreferencePair, str]]:
    """Every row of `source` as (pair, shape), in order, for the data audit (`preftune audit`).

    Unlike `load_pairs`, nothing is skipped: rows whose chosen equals rejected are yielded, and so are rows with an
    empty or whitespace-only response (training refuses those; the audit counts them). Every other check of
    `row_to_pair` still raises. Hub datasets are read from their "train" split.
    """
    columns = dict(columns or {})
    _check_columns(columns)
    for row, where, _ in _expand_rejected(_rows_of(source, "train"), columns):
        yield row_to_pair(row, where, columns, strict=False)
