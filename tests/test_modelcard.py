"""The model card (final/README.md) and `preftune push`: real tiny runs through the CLI, hand-made run folders for
what a tiny run cannot show (hub ids, licenses, eval.json), and the hub replaced by a fake that records its calls."""

from __future__ import annotations

import ast
import json
import re
import socket
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import yaml

from preftune import __version__, push
from preftune.cli import main
from preftune.modelcard import model_card_text, write_model_card

from toy import counting_pairs, save_model_folder, write_jsonl


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full fine-tuning run and a LoRA run with --merge, two steps each, with held-out pairs."""
    root = tmp_path_factory.mktemp("card")
    model = save_model_folder(root / "model")
    train = write_jsonl(counting_pairs(32, seed=1), root / "train.jsonl")
    held = write_jsonl(counting_pairs(16, seed=2), root / "eval.jsonl")
    common = ["--model", str(model), "--data", str(train), "--eval-data", str(held), "--batch-size", "8"]
    common += ["--max-steps", "2", "--learning-rate", "1e-3", "--no-report"]
    assert main(["train", *common, "--output", str(root / "full")]) == 0
    assert main(["train", *common, "--output", str(root / "lora"), "--lora-r", "4", "--merge"]) == 0
    return {"full": root / "full", "lora": root / "lora", "model": str(model)}


def split(card: str) -> tuple[dict, str]:
    """(front matter, Markdown body) of a card."""
    match = re.match(r"---\n(.*?)\n---\n(.*)", card, re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def table(body: str, section: str) -> dict[str, str]:
    """label → value of the tables of one `## section`."""
    text = body.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| (.+?) \| (.+) \|$", text, re.MULTILINE))


def code_blocks(body: str) -> list[str]:
    return re.findall(r"^(`{3,})python\n(.*?)\n\1$", body, re.DOTALL | re.MULTILINE)


# ---------------------------------------------------------------------------------------------------- real runs


def test_full_run_card(runs):
    run = runs["full"]
    card = (run / "final" / "README.md").read_text(encoding="utf-8")
    meta, body = split(card)
    assert meta["base_model"] == runs["model"]  # a local folder whose config.json names no hub id
    assert meta["library_name"] == "transformers"
    assert {"preftune", "dpo", "sigmoid"} <= set(meta["tags"])
    assert "datasets" not in meta and "license" not in meta  # a local file; the toy base declares no license

    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    launch = json.loads((run / "launch.json").read_text(encoding="utf-8"))
    recipe = table(body, "Training recipe")
    assert float(recipe["β"]) == config["beta"]
    assert float(recipe["Learning rate"]) == config["learning_rate"]
    assert recipe["Scheduler"] == f"`{config['lr_scheduler']}`"
    assert int(recipe["Optimizer steps"]) == config["max_steps"]
    per_step = launch["batch_size"] * launch["grad_accum"] * launch["processes"]
    assert int(recipe["Pairs per step"].split()[0]) == per_step == config["batch_size"] * config["grad_accum"]
    assert int(recipe["Max length"]) == config["max_length"]
    assert recipe["Dtype"] == f"`{config['dtype']}`" and int(recipe["Seed"]) == config["seed"]

    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()][-1]
    results = table(body, "Results")
    for label, key in (("Preference accuracy", "accuracies"), ("Reward margin", "margins"), ("Loss", "loss")):
        value = next(v for k, v in results.items() if k.startswith(label))
        expected = last["eval/loss" if key == "loss" else f"eval/rewards/{key}"]
        assert float(value) == pytest.approx(expected, rel=1e-3, abs=1e-6)

    data = table(body, "Data")
    assert data["Pairs read"] == "32"
    assert "- 59.4% of pairs (19) have a prompt that is also in the eval data" in body  # the audit's own warning
    (code,) = [c for _, c in code_blocks(body)]
    assert "AutoModelForCausalLM.from_pretrained" in code and "Peft" not in code
    ast.parse(code)
    assert body.rstrip().endswith(f"Trained with preftune {__version__}.")
    # Written inside save_final from the files of the run folder: the same text as the card of the folder now.
    assert card == model_card_text(run, False)


def test_lora_run_card_and_merged_card(runs):
    run = runs["lora"]
    meta, body = split((run / "final" / "README.md").read_text(encoding="utf-8"))
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert "Model Card for Model ID" not in body  # peft's own template, written by save_pretrained, is replaced
    (code,) = [c for _, c in code_blocks(body)]
    assert "AutoPeftModelForCausalLM.from_pretrained" in code and "PeftModel.from_pretrained(base, " in code
    recipe = table(body, "Training recipe")
    assert recipe["LoRA rank r"] == "4" and recipe["LoRA α"].startswith("8")

    merged_meta, merged_body = split((run / "final-merged" / "README.md").read_text(encoding="utf-8"))
    assert merged_meta["library_name"] == "transformers"
    assert "merged into its weights" in merged_body and "final-merged" in code_blocks(merged_body)[0][1]


# ---------------------------------------------------------------------------------------------------- hand-made


def make_run(root: Path, **config) -> Path:
    run = root / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}", encoding="utf-8")
    base = {"model": str(root / "base"), "data": "prefs.jsonl", "loss": "sigmoid", "beta": 0.1, "batch_size": 4}
    (run / "config.yaml").write_text(yaml.safe_dump({**base, **config}), encoding="utf-8")
    return run


EVAL = {
    "generation": {
        "prompts": 40,
        "settings": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64, "seed": 0},
        "kl": 3.214,
        "kl_se": 0.402,
        "length": {"policy": 20.5, "reference": 18.0, "policy_se": 1.5, "reference_se": 1.25},
        "reward": {"policy": 0.61, "reference": 0.42, "policy_se": 0.03, "reference_se": 0.04, "spec": "pkg.r:score"},
        "win_rate": {
            "win_rate": 0.675,
            "ci_low": 0.52,
            "ci_high": 0.8,
            "wins": 26,
            "ties": 1,
            "losses": 13,
            "prompts": 40,
            "interval": "Wilson 95%, ties count half",
        },
    }
}


def test_hub_dataset_sampling_results_and_license(tmp_path):
    run = make_run(tmp_path, data="someone/preference-pairs", loss="sigmoid,sft", loss_weights="1,0.5")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.2-1B"}), encoding="utf-8")
    (base / "README.md").write_text("---\nlicense: llama3.2\nlanguage: en\n---\n# Base\n", encoding="utf-8")
    (run / "eval.json").write_text(json.dumps(EVAL), encoding="utf-8")
    meta, body = split(model_card_text(run, False))
    assert meta["datasets"] == ["someone/preference-pairs"]
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"  # the hub id the local folder was saved from
    assert meta["license"] == "llama3.2"
    assert {"sigmoid", "sft"} <= set(meta["tags"])
    assert "https://huggingface.co/datasets/someone/preference-pairs" in body
    results = table(body, "Results")
    assert results["KL(π‖π_ref), nats per response"] == "3.214 ± 0.402 (± SE)"
    assert results["Reward (`pkg.r:score`): policy / reference"] == "0.61 ± 0.03 / 0.42 ± 0.04 (± SE)"
    wins = results["Win rate of the policy"]
    assert wins.startswith("0.675 (Wilson 95%, ties count half: 0.52 to 0.8;") and "26 wins" in wins
    assert "Held-out pairs" not in body  # no metrics.jsonl: that part is left out
    assert table(body, "Training recipe")["Loss weights"] == "`1,0.5`"


def test_license_from_config_json_and_none_when_undeclared(tmp_path):
    run = make_run(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"license": "apache-2.0"}), encoding="utf-8")
    assert split(model_card_text(run, False))[0]["license"] == "apache-2.0"
    (base / "config.json").write_text("{}", encoding="utf-8")
    (base / "README.md").write_text("# no front matter\nlicense: mit\n", encoding="utf-8")
    meta = split(model_card_text(run, False))[0]
    assert "license" not in meta and meta["base_model"] == str(base)


def test_missing_and_broken_files_leave_sections_out(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    meta, body = split(model_card_text(run, False))
    assert meta["tags"][:2] == ["preftune", "dpo"] and "## How to load" in body
    run = make_run(tmp_path)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "eval/loss": 0.6', encoding="utf-8")
    (run / "audit.json").write_text("{not json", encoding="utf-8")
    (run / "eval.json").write_text(json.dumps({"generation": "?"}), encoding="utf-8")
    (run / "launch.json").write_text("[1, 2]", encoding="utf-8")
    meta, body = split(model_card_text(run, False))
    assert "## Results" not in body and "No data audit" in body
    assert table(body, "Training recipe")["Optimizer steps"] == "1"


def test_user_data_is_escaped(tmp_path):
    hostile = "x\n---\n# Title <script>alert(1)</script> | `a` ```b''' \\"
    run = tmp_path / "run"
    run.mkdir()
    config = {"model": hostile, "data": hostile, "eval_data": hostile, "lr_scheduler": hostile}
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    meta, body = split(model_card_text(run, True))  # an adapter's card: its loading code names the base model
    assert meta["base_model"] == hostile  # the front matter keeps the value exactly, and ends where it should
    # Code blocks and code spans show their content as text: outside them, no HTML and no heading is left.
    prose = re.sub(r"^(`{3,})[^\n]*\n.*?\n\1$", "", body, flags=re.DOTALL | re.MULTILINE)
    prose = re.sub(r"(?<!`)(`+)(?!`).+?(?<!`)\1(?!`)", "", prose)
    assert "<script>" not in prose and "\n# Title" not in prose
    ((_, code),) = code_blocks(body)  # one block: its fence is longer than the ``` in the value
    strings = [node.value for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Constant)]
    assert hostile in strings  # a Python string literal that holds the value exactly
    rows = [line for line in body.splitlines() if line.startswith("| Scheduler")]
    assert len(rows) == 1 and len(re.findall(r"(?<!\\)\|", rows[0])) == 3  # the | in the value does not split it


def test_write_model_card_rewrites_final_and_merged(runs, tmp_path):
    with pytest.raises(Exception, match="final: missing"):
        write_model_card(tmp_path)
    run = runs["lora"]
    path = write_model_card(run)
    assert path == run / "final" / "README.md" and split(path.read_text(encoding="utf-8"))[0]["library_name"] == "peft"


# ---------------------------------------------------------------------------------------------------- push


@pytest.fixture
def online(monkeypatch):
    """Not in offline mode, with a token, and yet no network at all: every socket connection fails."""

    def blocked(*args, **kwargs):
        raise OSError("network blocked in tests")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at import
    monkeypatch.setenv("HF_TOKEN", "hf_test")


@pytest.fixture
def hub(online, monkeypatch):
    """`online`, the hub answering the probe, and its client replaced by a fake → the list of calls it got."""
    monkeypatch.setattr(push, "hub_reachable", lambda endpoint: True)
    calls = []

    class FakeApi:
        def __init__(self, *args, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return calls


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("private", [False, True])
def test_push_creates_the_repo_and_uploads_final(hub, tmp_path, capsys, private):
    run = make_run(tmp_path)
    args = ["push", str(run), "--repo", "someone/tiny-dpo"] + (["--private"] if private else [])
    assert main(args) == 0
    (create, upload) = hub
    assert create == ("create_repo", "someone/tiny-dpo", {"private": True if private else None, "exist_ok": True})
    assert upload[0] == "upload_folder" and upload[1]["repo_id"] == "someone/tiny-dpo"
    assert Path(upload[1]["folder_path"]) == run / "final"
    assert "https://huggingface.co/someone/tiny-dpo" in capsys.readouterr().out
    # The folder had no card: it gets one, whose loading code names the repository.
    assert "from_pretrained('someone/tiny-dpo')" in (run / "final" / "README.md").read_text(encoding="utf-8")


def test_push_keeps_an_edited_card_and_refreshes_an_unedited_one(hub, tmp_path):
    run = make_run(tmp_path)
    card = run / "final" / "README.md"
    card.write_text(model_card_text(run, False), encoding="utf-8")  # as training wrote it
    assert main(["push", str(run), "--repo", "someone/a"]) == 0
    assert "'someone/a'" in card.read_text(encoding="utf-8")
    assert main(["push", str(run), "--repo", "someone/b"]) == 0  # the card of an earlier push is not an edit
    assert "'someone/b'" in card.read_text(encoding="utf-8") and "someone/a" not in card.read_text(encoding="utf-8")
    card.write_text("---\nlicense: mit\n---\nmy own words\n", encoding="utf-8")
    assert main(["push", str(run), "--repo", "someone/a"]) == 0
    assert card.read_text(encoding="utf-8").endswith("my own words\n")


def test_push_merged(hub, tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["push", str(run), "--repo", "someone/a", "--merged"]) == 2
    assert "final-merged: missing" in one_line_error(capsys)
    (run / "final-merged").mkdir()
    assert main(["push", str(run), "--repo", "someone/a", "--merged"]) == 0
    assert Path(hub[-1][1]["folder_path"]) == run / "final-merged"


def test_push_offline_fails_at_once(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(make_run(tmp_path)), "--repo", "someone/a"]) == 2
    assert "offline mode (HF_HUB_OFFLINE)" in one_line_error(capsys) and hub == []


def test_push_one_line_errors(hub, tmp_path, capsys, monkeypatch):
    assert main(["push", str(tmp_path / "nope"), "--repo", "someone/a"]) == 2
    assert "no such folder" in one_line_error(capsys)
    (tmp_path / "unfinished").mkdir()
    assert main(["push", str(tmp_path / "unfinished"), "--repo", "someone/a"]) == 2
    assert "final: missing" in one_line_error(capsys)
    run = make_run(tmp_path)
    assert main(["push", str(run), "--repo", "not a repo"]) == 2
    assert "OWNER/NAME" in one_line_error(capsys)
    assert main(["push", str(run)]) == 2
    assert "--repo" in one_line_error(capsys)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(run), "--repo", "someone/a"]) == 2
    assert "no Hugging Face token" in one_line_error(capsys) and hub == []


def test_push_without_network_is_one_line(online, tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path)
    assert main(["push", str(run), "--repo", "someone/a"]) == 2  # the real probe and the real client
    assert "cannot reach the Hugging Face hub" in one_line_error(capsys)
    # Past the probe, the client's own connection error is one line naming the step that failed.
    monkeypatch.setattr(push, "hub_reachable", lambda endpoint: True)
    assert main(["push", str(run), "--repo", "someone/a"]) == 2
    assert "creating the repository someone/a failed" in one_line_error(capsys)
