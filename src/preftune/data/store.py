"""Token ids of a dataset on disk, memory-mapped: training data larger than memory (`--stream`).

`TokenStore.write(folder, tokenized)` consumes pairs one at a time (e.g. `iter_tokenized(read_pairs(...))`, which
reads a .jsonl file line by line) and appends them to flat files; `TokenStore(folder)` maps them and behaves like
the `list[TokenizedPair]` of the in-memory path: `len`, indexing (an int → a TokenizedPair with the same ids and
`where`, a slice → a list), iteration in order. So batching, the epoch order, the reference cache key and the
cached log-probs see exactly the same pairs.

Files (N pairs, T tokens in all):
    ids.bin       int32 [T]       every pair's prompt ‖ chosen ‖ rejected ids, pair after pair
    offsets.bin   int64 [3N + 1]  segment k of pair i (0 prompt, 1 chosen, 2 rejected) is
                                  ids[offsets[3i + k] : offsets[3i + k + 1]]
    where.bin     int64 [N, 3]    `where` as (prefix number, row number, item): "data.jsonl line 12" → (0, 12, -1)
                                  with prefixes[0] = "data.jsonl line", and "data.jsonl line 12 rejected[2]" (a
                                  row's list of rejected responses) → (0, 12, 2); a row name not ending in a number
                                  is a prefix of its own with row number -1
    labels.bin    int8 [N]        an unpaired example's label (1 desirable, 0 undesirable); -1 for a pair
    meta.json     {"pairs": N, "tokens": T, "prefixes": [...]}, written last: a folder without it is incomplete
e.g. pairs ([1, 12, 7], [18, 2], [19, 2], "d.jsonl line 1") and ([1, 16], [17, 2], [2], "d.jsonl line 3") →
ids [1, 12, 7, 18, 2, 19, 2, 1, 16, 17, 2, 2], offsets [0, 3, 5, 7, 9, 11, 12], where [[0, 1, -1], [0, 3, -1]].
"""

from __future__ import annotations

import json
import operator
import re
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from preftune.data.formats import rejected_item
from preftune.data.tokenize import TokenizedPair

META = "meta.json"
_NUMBERED = re.compile(r"(.*) (\d+)", re.DOTALL)  # "data.jsonl line 12" → ("data.jsonl line", "12")
_FLUSH_TOKENS = 1 << 20  # integers buffered in memory before they are appended to their file (4-8 MiB)


class TokenStore:
    """A read-only, memory-mapped sequence of TokenizedPair (see the module docstring for the files)."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        meta = json.loads((self.folder / META).read_text(encoding="utf-8"))
        self._n = meta["pairs"]
        self._prefixes: list[str] = meta["prefixes"]
        self._ids = _map(self.folder / "ids.bin", np.int32, (meta["tokens"],))
        self._offsets = _map(self.folder / "offsets.bin", np.int64, (3 * self._n + 1,))
        self._where = _map(self.folder / "where.bin", np.int64, (self._n, 3))
        self._labels = _map(self.folder / "labels.bin", np.int8, (self._n,))

    @classmethod
    def write(cls, folder: Path | str, pairs: Iterable[TokenizedPair]) -> TokenStore:
        """Append `pairs` (consumed one at a time) to the files of a new store in `folder` and open it.

        Memory holds a few MiB of buffered integers and the table of distinct `where` prefixes, whatever the number
        of pairs.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=False)
        prefixes: dict[str, int] = {}
        with (
            open(folder / "ids.bin", "wb") as ids_file,
            open(folder / "offsets.bin", "wb") as offsets_file,
            open(folder / "where.bin", "wb") as where_file,
            open(folder / "labels.bin", "wb") as labels_file,
        ):
            ids, offsets, where = _Appender(ids_file, "i"), _Appender(offsets_file, "q"), _Appender(where_file, "q")
            labels = _Appender(labels_file, "b")
            offsets.add([0])
            count = 0
            for pair in pairs:
                for segment in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
                    ids.add(segment)
                    offsets.add([ids.total])
                prefix, number, item = split_where(pair.where)
                where.add([prefixes.setdefault(prefix, len(prefixes)), number, item])
                labels.add([-1 if pair.label is None else int(pair.label)])
                count += 1
            for appender in (ids, offsets, where, labels):
                appender.flush()
            total = ids.total
        meta = {"pairs": count, "tokens": total, "prefixes": list(prefixes)}
        (folder / META).write_text(json.dumps(meta) + "\n", encoding="utf-8")
        return cls(folder)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._pair(i) for i in range(*index.indices(self._n))]
        i = operator.index(index)  # numpy and torch integers too; a float is a TypeError, as for a list
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"pair index {index} out of range for {self._n} pairs")
        return self._pair(i)

    def __iter__(self) -> Iterator[TokenizedPair]:
        return (self._pair(i) for i in range(self._n))

    def _pair(self, i: int) -> TokenizedPair:
        o = self._offsets[3 * i : 3 * i + 4].tolist()
        prefix, number, item = self._where[i].tolist()
        where = self._prefixes[prefix] if number < 0 else f"{self._prefixes[prefix]} {number}"
        if item >= 0:
            where += f" rejected[{item}]"
        label = int(self._labels[i])
        return TokenizedPair(
            prompt_ids=self._ids[o[0] : o[1]].tolist(),
            chosen_ids=self._ids[o[1] : o[2]].tolist(),
            rejected_ids=self._ids[o[2] : o[3]].tolist(),
            where=where,
            label=None if label < 0 else bool(label),
        )


def split_where(where: str) -> tuple[str, int, int]:
    """ "data.jsonl line 12" → ("data.jsonl line", 12, -1); "data.jsonl line 12 rejected[2]" → ("data.jsonl line",
    12, 2); "line 007" or "x" (no canonical number) → ("x", -1, -1). A row's prefix is shared by all its pairs, so
    the table of prefixes stays small whatever the number of rows."""
    row, item = rejected_item(where)
    if item is None or f"{row} rejected[{item}]" != where:  # "rejected[01]" would come back as "rejected[1]"
        row, item = where, -1
    match = _NUMBERED.fullmatch(row)
    if match and str(int(match.group(2))) == match.group(2):  # "007" would come back as "7"
        return match.group(1), int(match.group(2)), item
    return row, -1, item


def _map(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    if not np.prod(shape):  # numpy cannot map an empty file
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


class _Appender:
    """Integers appended to a flat binary file through a small buffer (`array` typecode "i" int32, "q" int64)."""

    def __init__(self, file, typecode: str):
        self.file = file
        self.buffer = array(typecode)
        self.total = 0  # integers added so far

    def add(self, values) -> None:
        self.buffer.extend(values)
        self.total += len(values)
        if len(self.buffer) >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        self.buffer.tofile(self.file)
        del self.buffer[:]
