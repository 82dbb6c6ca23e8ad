"""--stream: token ids on disk (`TokenStore`) give exactly the pairs, ids, order, cache key and run of the in-memory
path; rows are read a line (.jsonl) or a row group (.parquet) at a time with the same errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from preftune import refcache
from preftune.cli import main
from preftune.config import resolve
from preftune.data import load
from preftune.data.formats import LoadReport, load_pairs, read_pairs
from preftune.data.store import TokenStore, split_where
from preftune.data.tokenize import TokenizedPair

from conftest import stopped_after
from toy import build_tokenizer, counting_pairs, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels

TIMING = {"pairs_per_s", "tokens_per_s", "step_time_s"}


def test_store_files_and_pairs_as_in_the_docstring(tmp_path):
    pairs = [
        TokenizedPair([1, 12, 7], [18, 2], [19, 2], "d.jsonl line 1"),
        TokenizedPair([1, 16], [17, 2], [2], "d.jsonl line 3"),
    ]
    store = TokenStore.write(tmp_path / "s", iter(pairs))
    assert np.fromfile(tmp_path / "s" / "ids.bin", np.int32).tolist() == [1, 12, 7, 18, 2, 19, 2, 1, 16, 17, 2, 2]
    assert np.fromfile(tmp_path / "s" / "offsets.bin", np.int64).tolist() == [0, 3, 5, 7, 9, 11, 12]
    assert np.fromfile(tmp_path / "s" / "where.bin", np.int64).tolist() == [0, 1, -1, 0, 3, -1]
    assert json.loads((tmp_path / "s" / "meta.json").read_text()) == {
        "pairs": 2,
        "tokens": 12,
        "prefixes": ["d.jsonl line"],
    }
    reopened = TokenStore(tmp_path / "s")
    assert len(store) == len(reopened) == 2
    assert list(reopened) == pairs and reopened[-1] == pairs[1] and reopened[np.int64(0)] == pairs[0]
    assert reopened[:5] == pairs and reopened[1:] == [pairs[1]]
    with pytest.raises(IndexError):
        reopened[2]
    with pytest.raises(TypeError):
        reopened[1.0]


def test_where_is_split_into_a_shared_prefix_a_number_and_an_item():
    assert split_where("data.jsonl line 12") == ("data.jsonl line", 12, -1)
    assert split_where("hub:o/n[train] row 5") == ("hub:o/n[train] row", 5, -1)
    assert split_where("data.jsonl line 12 rejected[3]") == ("data.jsonl line", 12, 3)
    # Kept whole when the number would not come back as written.
    assert split_where("a row 007") == ("a row 007", -1, -1)
    assert split_where("nowhere") == ("nowhere", -1, -1)
    assert split_where("a row 7 rejected[01]") == ("a row 7 rejected[01]", -1, -1)
    assert split_where("x rejected[0]") == ("x", -1, 0)


def test_the_pairs_of_a_list_of_rejected_responses_share_one_prefix(tmp_path):
    pairs = [TokenizedPair([1], [2], [3 + i], f"d.jsonl line {n} rejected[{i}]") for n in (1, 2) for i in range(3)]
    store = TokenStore.write(tmp_path / "s", pairs)
    assert list(store) == pairs
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["prefixes"] == ["d.jsonl line"]


def test_unnumbered_where_comes_back_whole(tmp_path):
    pairs = [
        TokenizedPair([1], [2], [3], "x 007"),
        TokenizedPair([1], [2], [3], "x 7"),
        TokenizedPair([4], [5, 6], [7], "x 007"),
    ]
    store = TokenStore.write(tmp_path / "s", pairs)
    assert list(store) == pairs and json.loads((tmp_path / "s" / "meta.json").read_text())["prefixes"] == ["x 007", "x"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    model = save_model_folder(root / "model")
    rows = counting_pairs(40, seed=1)
    rows[3] = {**rows[3], "rejected": rows[3]["chosen"]}  # identical: skipped and counted
    rows[5] = {**rows[5], "prompt": "count from 1 : " * 6}  # over --max-length 16: truncated and counted
    lines = [json.dumps(r) for r in rows]
    lines.insert(7, "   ")  # a blank line: not a row, but it moves the line numbers
    train = root / "train.jsonl"
    train.write_text("\n".join(lines), encoding="utf-8")  # no final newline
    held = write_jsonl(counting_pairs(16, seed=2), root / "eval.jsonl")
    return {"model": str(model), "train": str(train), "eval": str(held), "root": root}


def settings(toy, out: Path, **extra) -> dict:
    return {"model": toy["model"], "data": toy["train"], "output": str(out), "max_length": 16, **extra}


def test_streamed_pairs_equal_the_in_memory_ones(toy, tmp_path):
    cfg, _ = resolve(settings(toy, tmp_path / "run"))
    tokenizer = build_tokenizer()
    in_memory, _ = load.load_data(cfg.data, cfg, tokenizer, "--data")
    store = load.stream_data(cfg.data, cfg, tokenizer, "--data", tmp_path / "tokens")
    assert len(store) == len(in_memory) == 39
    assert list(store) == in_memory and [store[i] for i in range(39)] == in_memory
    # Line 4 (identical) is skipped, line 8 is blank: pairs 5 and 6 come from lines 7 and 9.
    assert store[5].where == f"{toy['train']} line 7" and store[6].where == f"{toy['train']} line 9"
    # Line 6: <s> + 6 × "count from 1 :" (3, 4, 7, 5) is 25 tokens; " 11 12 13</s>" is 4 (17, 18, 19, 2), so
    # --max-length 16 keeps max(16 - 4, min(25, 16 // 2)) = 12 prompt tokens.
    assert store[4] == TokenizedPair([3, 4, 7, 5] * 3, [17, 18, 19, 2], [20, 19, 18, 2], f"{toy['train']} line 6")

    def key(pairs):
        return refcache.cache_key(weights="w", pairs=pairs, dtype="float32")

    assert key(store) == key(in_memory)


def test_reports_count_the_same_as_the_in_memory_path(toy, tmp_path, caplog):
    cfg, _ = resolve(settings(toy, tmp_path / "run"))
    with caplog.at_level("INFO", logger="preftune"):
        load.load_data(cfg.data, cfg, build_tokenizer(), "--data")
        memory_lines = [r.getMessage() for r in caplog.records]
        caplog.clear()
        load.stream_data(cfg.data, cfg, build_tokenizer(), "--data", tmp_path / "tokens")
        stream_lines = [r.getMessage() for r in caplog.records]
    assert "40 rows → 39 pairs (standard 39); 1 skipped (chosen == rejected)" in memory_lines[0]
    assert "1 prompts cut from the left" in memory_lines[1]
    assert stream_lines[0] == memory_lines[0] and stream_lines[1].startswith(memory_lines[1] + " (on disk in ")


def test_parquet_is_read_by_row_groups_with_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = counting_pairs(5, seed=3)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 3
    pairs, report = load_pairs(str(path))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows
    ]
    assert [p.where for p in pairs] == [f"{path} row {i}" for i in range(1, 6)] and report.pairs == 5


def test_read_pairs_counts_as_it_goes(tmp_path):
    path = write_jsonl(counting_pairs(3, seed=0), tmp_path / "d.jsonl")
    report = LoadReport()
    pairs = read_pairs(str(path), report)
    assert report.rows == 0  # nothing is read before the first pair is asked for
    next(pairs)
    assert (report.rows, report.pairs) == (1, 1)
    assert len(list(pairs)) == 2 and (report.rows, report.pairs) == (3, 3)


def run(args: list[str]) -> int:
    return main(["train", *args])


def cli_args(toy, out: Path, steps: int = 3) -> list[str]:
    return [
        "--model",
        toy["model"],
        "--data",
        toy["train"],
        "--eval-data",
        toy["eval"],
        "--output",
        str(out),
        "--batch-size",
        "4",
        "--max-steps",
        str(steps),
        "--max-length",
        "16",
        "--learning-rate",
        "1e-3",
        "--eval-every",
        "2",
    ]


def metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_stream_run_equals_a_normal_run(toy, tmp_path, capsys):
    normal, streamed = tmp_path / "normal", tmp_path / "streamed"
    assert run(cli_args(toy, normal)) == 0
    capsys.readouterr()
    assert run(cli_args(toy, streamed) + ["--stream"]) == 0
    err = capsys.readouterr().err
    assert "data audit at the start is skipped" in err and "preftune audit" in err
    assert metrics(streamed) == metrics(normal) and "eval/loss" in metrics(streamed)[1]
    assert (normal / "audit.json").exists() and not (streamed / "audit.json").exists()
    assert len(TokenStore(streamed / "tokens" / "train")) == 39 and len(TokenStore(streamed / "tokens" / "eval")) == 16


def test_stream_resume_reproduces_the_run(toy, tmp_path):
    def args(out):
        return cli_args(toy, out, steps=4) + ["--stream", "--save-every", "2"]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run(args(whole)) == 0

    with stopped_after(3):
        assert run(args(cut)) == 130
    assert run(args(cut) + ["--resume"]) == 0  # the token ids are written again from --data
    assert metrics(cut) == metrics(whole)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "count", "chosen": 3, "rejected": "4"}', "line 2: field 'chosen' must be a string"),
        ('{"prompt": ', "line 2: not valid JSON"),
        ('{"prompt": "count from 1 :", "chosen": "", "rejected": "2"}', "line 2: field 'chosen' is empty"),
    ],
)
def test_bad_rows_give_the_same_error_and_leave_nothing(toy, tmp_path, capsys, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(counting_pairs(1, seed=0)[0]) + "\n" + line + "\n", encoding="utf-8")
    errors = []
    for extra in ([], ["--stream"]):
        out = tmp_path / "out"
        args = cli_args(toy, out) + ["--data", str(data)] + extra
        assert run(args) == 2
        errors.append(capsys.readouterr().err.strip().splitlines()[-1])
        assert not out.exists()
    assert errors[0] == errors[1] and message in errors[0]


def test_a_start_killed_while_writing_tokens_leaves_a_usable_folder(toy, tmp_path):
    out = tmp_path / "run"
    (out / "tokens" / "train").mkdir(parents=True)  # what a kill -9 during tokenization leaves
    (out / "tokens" / "train" / "ids.bin").write_bytes(b"\0" * 8)
    assert run(cli_args(toy, out, steps=1) + ["--stream"]) == 0
    assert len(TokenStore(out / "tokens" / "train")) == 39


def test_precompute_with_stream_fills_the_cache_train_uses(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["precompute", *cli_args(toy, out, steps=1), "--stream"]) == 0
    assert not out.exists()
    capsys.readouterr()
    assert run(cli_args(toy, out, steps=1) + ["--stream"]) == 0
    assert capsys.readouterr().err.count("reference log-probs: reused") == 2


def test_too_few_pairs_for_a_step_leaves_nothing(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(cli_args(toy, out) + ["--stream", "--batch-size", "40"]) == 2
    assert "39 pairs, fewer than one optimizer step" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()
