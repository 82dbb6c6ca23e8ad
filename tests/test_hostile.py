"""Hostile and malformed input, through the real CLI: every case ends in one clear line (exit 2) or in a counted,
reported skip (exit 0), never in a traceback, and a failed run leaves --output exactly as it found it.

Each case is a small function that changes a `Workspace` (data file, model folder, flags) from a run that works:
the toy model of `tests/toy.py`, four counting pairs, batch 2, one step. `expect` holds what stderr's last
line (errors) or stderr as a whole (runs that finish) must contain; "{data}", "{model}", "{out}", "{config}" and
"{tmp}" stand for the case's paths.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from preftune.cli import main

from helpers import assistant, user
from toy import counting_pairs, save_model_folder

GOOD = counting_pairs(4, seed=1)  # {"prompt": "count from 2 :", "chosen": " 2 3 4", "rejected": " 3 4 2"}, ...


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("hostile-model") / "model")


@dataclass
class Workspace:
    tmp: Path
    model: str
    data: str = ""
    out: str = ""
    config: str = ""
    command: str = "train"
    flags: list[str] = field(default_factory=list)

    def write(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        return str(path)

    def rows(self, rows: list, name: str = "d.jsonl") -> str:
        """A jsonl file of `rows`, set as --data."""
        self.data = self.write(name, "".join(json.dumps(row) + "\n" for row in rows))
        return self.data

    def yaml(self, text: str) -> None:
        self.config = self.write("c.yaml", text)
        self.flags += ["--config", self.config]

    def model_copy(self, name: str) -> Path:
        """A copy of the toy model folder to damage."""
        folder = self.tmp / name
        shutil.copytree(self.model, folder)
        self.model = str(folder)
        return folder

    def argv(self) -> list[str]:
        output = ["--output", self.out] if self.command == "train" else []
        return [
            self.command,
            "--model",
            self.model,
            "--data",
            self.data,
            *output,
            "--batch-size",
            "2",
            "--max-steps",
            "1",
            "--max-length",
            "64",
            *self.flags,
        ]


CASES = []


def case(case_id: str, *expect: str, code: int = 2):
    def register(build: Callable[[Workspace], None]):
        CASES.append(pytest.param(build, code, expect, id=case_id))
        return build

    return register


def good_lines() -> str:
    return "".join(json.dumps(row) + "\n" for row in GOOD)


# --------------------------------------------------------------------------------------------- broken files


@case("jsonl-last-line-cut", "{data} line 5: not valid JSON (Unterminated string starting at column 30)")
def _(w):
    w.data = w.write("d.jsonl", good_lines() + '{"prompt": "count from 1 :", "cho')


@case("json-cut-short", "{data} line 1: not valid JSON (")
def _(w):
    w.data = w.write("d.json", json.dumps(GOOD)[:-30])


@case("parquet-cut-short", "{data}: not a readable Parquet file (")
def _(w):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(GOOD), w.tmp / "whole.parquet")
    whole = (w.tmp / "whole.parquet").read_bytes()
    w.data = w.write("d.parquet", whole[: len(whole) // 2])


@case("csv-quote-never-closed", "{data} line 3: not valid CSV (unexpected end of data)")
def _(w):
    # The file ends inside a quoted value: without strict parsing, csv would take "8 9 (cut" as the whole value.
    w.data = w.write("d.csv", 'prompt,chosen,rejected\ncount from 7 :,7 8 9,9 8 7\ncount from 8 :,8 9 10,"8 9 (cut')


@case("latin1-bytes", "{data} line 2: not valid UTF-8 (byte 0xe9); save the file as UTF-8")
def _(w):
    w.data = w.write("d.jsonl", good_lines().encode().replace(b"count from 10", b"count fr\xe9m 10", 1))


@case("utf8-bom-accepted", "--data {data}: 4 rows → 4 pairs (standard 4); 0 skipped", code=0)
def _(w):
    w.data = w.write("d.jsonl", b"\xef\xbb\xbf" + good_lines().encode())


@case(
    "utf16-file", "{data} line 1: the file is UTF-16 (it starts with a UTF-16 byte order mark); save the file as UTF-8"
)
def _(w):
    w.data = w.write("d.jsonl", good_lines().encode("utf-16"))


@case("utf16-without-bom", "{data} line 1: holds a NUL byte (0x00), so it is not a text file")
def _(w):
    w.data = w.write("d.csv", "prompt,chosen,rejected\ncount,1,2\n".encode("utf-16-le"))


@case("nul-byte", "{data} line 3: holds a NUL byte (0x00)")
def _(w):
    w.data = w.write("d.jsonl", good_lines().encode().replace(b'"count from 1 :"', b'"count\x00from 1 :"', 1))


@case("huge-5mb-line-accepted", "--data {data}: 5 rows → 5 pairs (standard 5)", code=0)
def _(w):
    # A 5 MB line: extra columns are read (and ignored) whatever their size.
    w.rows(GOOD + [{**GOOD[0], "source": "x" * 5_000_000}])


@case(
    "huge-response-dropped",
    "--data {data}: 5 rows → 5 pairs",
    "4 pairs; 0 prompts cut from the left, 0 responses "
    "cut, 1 dropped; longest prompt 5 tokens, longest response 40001 tokens",
    code=0,
)
def _(w):
    # 40 000 tokens + EOS, far over --max-length 64, dropped and counted. (A 5 MB response is read just as well,
    # but the tokenizer alone needs 10-20 s for it on a small CPU: too slow for this matrix.)
    w.rows(GOOD + [{"prompt": "count from 1 :", "chosen": " 1" * 40_000, "rejected": " 2"}])
    w.flags += ["--on-overlength", "drop"]


@case("control-characters-are-text", "--data {data}: 4 rows → 4 pairs (standard 4)", code=0)
def _(w):
    # Escape sequences, BEL, CR, DEL, a right-to-left override: text like any other (the tokenizer maps them to
    # <unk>); the log must not echo them (checked for every case below).
    rows = [dict(row) for row in GOOD]
    rows[0]["chosen"] += " \x1b[2J\x1b[31m red"
    rows[1]["prompt"] = "\x07count\r from 3\x7f :\u202e"
    w.rows(rows)


@case(
    "control-characters-in-an-error",
    "{data} line 1: field 'prompt' message 0: unknown role 'user\\n\\x1b[2J'; "
    "expected one of system, user, assistant, tool",
)
def _(w):
    w.rows(
        [
            {
                "prompt": [{"role": "user\n\x1b[2J", "content": "hi"}],
                "chosen": [assistant("a")],
                "rejected": [assistant("b")],
            }
        ]
    )


@case(
    "lone-surrogate",
    "{data} line 2: field 'chosen' holds '\\ud800', half of a UTF-16 surrogate pair, which no tokenizer can encode",
)
def _(w):
    w.data = w.write("d.jsonl", good_lines().replace('" 10 11 12 13 14 15"', '" 10 \\ud800"', 1))


# --------------------------------------------------------------------------------------------- wrong rows


@case("chosen-is-an-int", "{data} line 2: field 'chosen' must be a string or a list of messages, got int")
def _(w):
    w.rows([GOOD[0], {**GOOD[1], "chosen": 7}])


@case("prompt-is-null", "{data} line 1: field 'prompt' must be a string or a list of messages, got null")
def _(w):
    w.rows([{**GOOD[0], "prompt": None}])


@case(
    "chosen-is-a-list-of-ints",
    "{data} line 1: field 'chosen' message 0 must be an object with 'role' and 'content', got int",
)
def _(w):
    # Token ids where text belongs: named as such, not as "fields mix plain text and message lists".
    w.rows([{**GOOD[0], "chosen": [5, 6, 7]}])


@case(
    "missing-field",
    "{data} line 3: missing field 'rejected' (the row has: prompt, chosen; rename columns with --columns)",
)
def _(w):
    w.rows(GOOD[:2] + [{"prompt": "count from 1 :", "chosen": " 1 2"}])


@case("empty-file", "{data}: holds no data rows")
def _(w):
    w.data = w.write("d.jsonl", "")


@case("only-blank-lines", "{data}: holds no data rows")
def _(w):
    w.data = w.write("d.jsonl", "\n  \n\t\r\n\n")


@case("json-array-of-non-objects", "{data} index 0: expected a JSON object, got number")
def _(w):
    w.data = w.write("d.json", "[1, 2, 3]")


@case("csv-missing-column", "{data} row 1: missing field 'rejected' (the row has: prompt, chosen;")
def _(w):
    w.data = w.write("d.csv", "prompt,chosen\ncount from 1 :,1 2\n")


@case("csv-ragged-row", "{data} row 2: has 2 values, the header has 3 columns")
def _(w):
    w.data = w.write("d.csv", "prompt,chosen,rejected\ncount from 7 :,7 8,8 7\ncount from 8 :,8 9\n")


@case(
    "mixed-shapes-without-chat-template",
    "{data} line 3: the pair is a conversation (lists of messages) but the tokenizer has no chat template",
)
def _(w):
    w.rows(
        GOOD[:2] + [{"prompt": [user("count from 1 :")], "chosen": [assistant("1 2")], "rejected": [assistant("2 1")]}]
    )


@case(
    "mixed-shapes-warned",
    "mixes plain-text pairs (first: {data} line 1) and conversations (first: {data} line "
    "3); the chat template formats the conversations only",
    "4 rows → 4 pairs (conversational 1, standard 3)",
    code=0,
)
def _(w):
    from transformers import AutoTokenizer

    folder = w.model_copy("chat-model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    w.rows(
        GOOD[:2]
        + [{"prompt": [user("count from 1 :")], "chosen": [assistant("1 2")], "rejected": [assistant("2 1")]}, GOOD[2]]
    )


@case("conversation-without-assistant-turn", "{data} line 1: field 'chosen': conversation with no assistant turn")
def _(w):
    w.rows([{"prompt": [user("count from 1 :")], "chosen": [user("1 2")], "rejected": [user("2 1")]}])


@case("assistant-turn-in-prompt-only", "{data} line 1: field 'chosen': conversation with no assistant turn")
def _(w):
    w.rows(
        [{"prompt": [user("count from 1 :"), assistant("1 2")], "chosen": [user("thanks")], "rejected": [user("no")]}]
    )


@case(
    "unknown-role",
    "{data} line 1: field 'chosen' message 0: unknown role 'bot'; expected one of system, user, assistant, tool",
)
def _(w):
    w.rows([{"prompt": [user("hi")], "chosen": [{"role": "bot", "content": "1"}], "rejected": [assistant("2")]}])


@case("message-without-content", "{data} line 1: field 'rejected' message 0 has no 'content'")
def _(w):
    w.rows([{"prompt": [user("hi")], "chosen": [assistant("1")], "rejected": [{"role": "assistant"}]}])


# --------------------------------------------------------------------------------------------- skips and lengths


@case("all-pairs-identical", "--data {data}: no pairs left to train on")
def _(w):
    w.rows([{**row, "rejected": row["chosen"]} for row in GOOD])


@case("identical-pair-skipped", "--data {data}: 5 rows → 4 pairs (standard 4); 1 skipped (chosen == rejected)", code=0)
def _(w):
    w.rows(GOOD[:2] + [{"prompt": "count from 1 :", "chosen": " 1", "rejected": " 1"}] + GOOD[2:])


# BOS + 104 words: a prompt of 105 tokens, over --max-length 64.
LONG_PROMPT = {"prompt": "count from 0 :" + " 0" * 100, "chosen": " 1 2", "rejected": " 2 1"}


@case(
    "long-prompt-truncated",
    "--data tokens: 5 pairs; 1 prompts cut from the left, 0 responses cut, 0 dropped; longest prompt 105 tokens",
    code=0,
)
def _(w):
    w.rows(GOOD + [LONG_PROMPT])


@case(
    "long-prompt-dropped",
    "--data tokens: 4 pairs; 0 prompts cut from the left, 0 responses cut, 1 dropped; longest prompt 105 tokens",
    code=0,
)
def _(w):
    w.rows(GOOD + [LONG_PROMPT])
    w.flags += ["--on-overlength", "drop"]


@case("every-prompt-dropped", "--data {data}: no pairs left to train on")
def _(w):
    w.rows([LONG_PROMPT] * 3)
    w.flags += ["--on-overlength", "drop"]


# --------------------------------------------------------------------------------------------- model folders


@case("model-folder-missing", "--model {model}: no such folder")
def _(w):
    w.model = str(w.tmp / "no-such-model")


@case("model-is-a-file", "--model {model}: expected a model folder, got a file")
def _(w):
    w.model = w.write("model.safetensors", b"\x00" * 16)


@case("model-folder-without-config", "--model {model}: not a Hugging Face model folder (no config.json)")
def _(w):
    (w.model_copy("no-config") / "config.json").unlink()


@case("model-config-not-json", "--model {model}: cannot load (It looks like the config file at")
def _(w):
    (w.model_copy("bad-config") / "config.json").write_text('{"model_type": "llama", ')


@case(
    "model-bert-encoder",
    "--model {model}: model type 'bert' is a bidirectional encoder (config.json does not "
    "set is_decoder: true), not a causal language model",
)
def _(w):
    # transformers maps "bert" to BertLMHeadModel, which would load and train here, attending in both directions.
    from transformers import BertConfig

    w.model = str(w.tmp / "bert")
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(w.model)


@case("model-vision-transformer", "--model {model}: model type 'vit' is not a causal language model")
def _(w):
    from transformers import ViTConfig

    w.model = str(w.tmp / "vit")
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(w.model)


@case("weights-cut-short", "--model {model}: model.safetensors is damaged or cut short (")
def _(w):
    weights = w.model_copy("cut") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


@case("tokenizer-json-broken", "--model {model}: cannot load a tokenizer (")
def _(w):
    (w.model_copy("bad-tokenizer") / "tokenizer.json").write_text('{"version": ')


def pickle_only(w: Workspace) -> None:
    import torch
    from safetensors.torch import load_file

    folder = w.model_copy("pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


@case(
    "pickle-weights-refused",
    "--model {model}: holds only pickle weights (pytorch_model.bin), which can run code "
    "when loaded; convert them to safetensors (or pass --allow-pickle-weights",
)
def _(w):
    pickle_only(w)


@case(
    "pickle-weights-allowed",
    "--model {model}: loading pickle weights (pytorch_model.bin) as --allow-pickle-weights asks",
    code=0,
)
def _(w):
    pickle_only(w)
    w.flags.append("--allow-pickle-weights")


@case(
    "remote-code-known-type",
    "--model {model}: the model ships its own code (auto_map in config.json); pass "
    "--trust-remote-code if you trust its author",
)
def _(w):
    # model_type stays "llama": transformers would quietly load its own Llama instead of the folder's code.
    config = w.model_copy("remote") / "config.json"
    config.write_text(
        json.dumps(
            {**json.loads(config.read_text()), "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
        )
    )


@case("remote-code-own-type", "--model {model}: the model needs its own code to run; pass --trust-remote-code")
def _(w):
    config = w.model_copy("remote-type") / "config.json"
    config.write_text(
        json.dumps(
            {
                **json.loads(config.read_text()),
                "model_type": "evil",
                "auto_map": {
                    "AutoConfig": "configuration_evil.EvilConfig",
                    "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                },
            }
        )
    )
    (Path(w.model) / "configuration_evil.py").write_text(f"open({str(w.tmp / 'pwned')!r}, 'w').close()\n")


# --------------------------------------------------------------------------------------------- YAML


@case("yaml-unknown-key", "{config}: unknown key 'learnig_rate' (see `preftune train --help` for the options)")
def _(w):
    w.yaml("beta: 0.2\nlearnig_rate: 0.001\n")


@case(
    "yaml-python-tag",
    "{config} line 1: not valid YAML (could not determine a constructor for the tag "
    "'tag:yaml.org,2002:python/object/apply:os.system')",
)
def _(w):
    w.yaml(f"beta: !!python/object/apply:os.system ['touch {w.tmp / 'pwned'}']\n")


@case("yaml-not-a-mapping", "{config}: expected a mapping of option names to values, got list")
def _(w):
    w.yaml("- beta\n- 0.2\n")


@case("yaml-key-twice", "{config} line 3: not valid YAML (key 'beta' is given twice)")
def _(w):
    w.yaml("beta: 0.2\nseed: 1\nbeta: 0.5\n")


@case("yaml-wrong-type", "{config}: key 'batch_size' expects int, got str 'eight'")
def _(w):
    w.yaml("batch_size: eight\n")


@case("yaml-not-utf8", "--config {config}: cannot read it (")
def _(w):
    w.config = w.write("c.yaml", b"beta: 0.2 # caf\xe9\n")
    w.flags += ["--config", w.config]


# --------------------------------------------------------------------------------------------- flags, --output


@case("batch-size-zero", "--batch-size must be positive, got 0")
def _(w):
    w.flags += ["--batch-size", "0"]


@case("batch-size-negative", "--batch-size must be positive, got -2")
def _(w):
    w.flags += ["--batch-size", "-2"]


@case("max-length-zero", "--max-length must be at least 2, got 0")
def _(w):
    w.flags += ["--max-length", "0"]


@case("unknown-loss", "--loss: unknown loss 'dpo' (choose from sigmoid,")
def _(w):
    w.flags += ["--loss", "dpo"]


@case("output-is-a-file", "--output {out}: exists and is not a folder")
def _(w):
    w.out = w.write("run", "my notes\n")


@case("output-inside-a-file", "--output {out}: is inside {tmp}/notes.txt, which is not a folder")
def _(w):
    w.out = w.write("notes.txt", "my notes\n") + "/run"


@case("output-folder-not-empty", "--output {out}: folder is not empty; pass --resume")
def _(w):
    (w.tmp / "run").mkdir()
    (w.tmp / "run" / "keep.txt").write_text("mine")


@case("output-not-writable", "--output {out}: no permission to write in {tmp}/locked")
def _(w):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    (w.tmp / "locked").mkdir(mode=0o500)
    w.out = str(w.tmp / "locked" / "run")


@case("precompute-truncated-data", "{data} line 5: not valid JSON")
def _(w):
    w.command = "precompute"
    w.data = w.write("d.jsonl", good_lines() + '{"prompt": "count from 1 :", "cho')


@case("precompute-pickle-weights-refused", "--model {model}: holds only pickle weights (pytorch_model.bin)")
def _(w):
    w.command = "precompute"
    pickle_only(w)


# --------------------------------------------------------------------------------------------- the matrix


def snapshot(path: Path) -> dict[str, bytes] | bytes | None:
    """What is at `path`: None, a file's bytes, or a folder's files and their bytes."""
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>" for p in path.rglob("*")}
    return None


def has_control_characters(text: str) -> bool:
    """Any C0/C1 control or DEL but newline and the progress bar's carriage return."""
    return any((ord(c) < 32 or 127 <= ord(c) < 160) and c not in "\n\r" for c in text)


@pytest.mark.parametrize("build, code, expect", CASES)
def test_hostile_input(build, code, expect, toy_model, tmp_path, capsys):
    w = Workspace(tmp=tmp_path, model=str(toy_model), out=str(tmp_path / "run"))
    w.rows(GOOD)
    build(w)
    before = snapshot(Path(w.out))
    capsys.readouterr()

    status = main(w.argv())

    err = capsys.readouterr().err
    names = {"data": w.data, "model": w.model, "out": w.out, "config": w.config, "tmp": str(tmp_path)}
    lines = err.strip().splitlines()
    assert status == code, err
    assert "Traceback" not in err
    assert not has_control_characters(err), repr(err)
    assert not (tmp_path / "pwned").exists()  # no code from the data, the model folder or the YAML ran
    if code == 2:
        assert lines[-1].startswith("preftune: error: ") and err.count("preftune: error:") == 1, err
        for text in expect:
            assert text.format(**names) in lines[-1], (text.format(**names), lines[-1])
        assert snapshot(Path(w.out)) == before  # nothing created, nothing half-written
    else:
        for text in expect:
            assert text.format(**names) in err, (text.format(**names), err)
        assert (Path(w.out) / "final" / "config.json").exists() and (Path(w.out) / "metrics.jsonl").exists()


def test_matrix_is_large_enough():
    assert len(CASES) >= 30
    assert len({p.id for p in CASES}) == len(CASES)
