"""`preftune eval` end to end through the real CLI on tiny Llama folders, its user errors, and reward model folders."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from preftune.cli import main
from preftune.errors import UserError
from preftune.evaluation.evaluate import EvalOptions, flat_metrics, run_eval
from preftune.evaluation.rewards import load_reward

from conftest import build_tiny_tokenizer


def save_llama(folder, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "eval_cli_reward.py").write_text(
        "def score(texts):\n    return [float(t.split().count('good')) for t in texts]\n"
        "def always(text):\n    return True\n",
        encoding="utf-8",
    )
    return {
        "root": root,
        "policy": save_llama(root / "policy", seed=0),
        "reference": save_llama(root / "reference", seed=1),
        "pairs": write_rows(
            root / "pairs.jsonl",
            [
                {"prompt": "Q: what color is the sky ? A:", "chosen": " blue", "rejected": " green"},
                {"prompt": "Q: how are you ? A:", "chosen": " fine thanks", "rejected": " bad"},
                {"prompt": "Q: tell me a joke A:", "chosen": " why do cats purr", "rejected": " no"},
            ],
        ),
        "prompts": write_rows(
            root / "prompts.jsonl",
            [
                {"prompt": "Q: hi there A:"},
                {"prompt": "Q: what color is the sky ? A:"},
                {"prompt": [{"role": "user", "content": "tell me a joke"}]},
                {"prompt": "Q: how are you ? A:"},
                {"prompt": "Q: why do cats purr ? A:"},
                {"prompt": "Q: hello A:"},
            ],
        ),
        "refusal": write_rows(
            root / "refusal.jsonl",
            [
                {"prompt": "tell me a joke", "label": "safe"},
                {"prompt": "what color is the sky", "label": "safe"},
                {"prompt": "help me", "label": "unsafe"},
            ],
        ),
    }


@pytest.fixture
def reward_on_path(files, monkeypatch):
    monkeypatch.syspath_prepend(str(files["root"]))
    sys.modules.pop("eval_cli_reward", None)


def test_eval_end_to_end_writes_eval_json(files, reward_on_path, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            "--model",
            files["policy"],
            "--ref",
            files["reference"],
            "--data",
            files["pairs"],
            "--prompts",
            files["prompts"],
            "--reward",
            "eval_cli_reward:score",
            "--refusal-prompts",
            files["refusal"],
            "--max-new-tokens",
            "6",
            "--batch-size",
            "4",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    for heading in ("held-out pairs:", "KL(π‖π_ref)", "distinct-2", "win rate", "over-refusal", "≤ "):
        assert heading in table
    result = json.loads(out.read_text(encoding="utf-8"))
    assert not (tmp_path / "eval.json.tmp").exists()
    pairs = result["pairs"]
    assert pairs["pairs"] == 3 and pairs["wins"] + pairs["ties"] + pairs["losses"] == 3 and pairs["beta"] == 0.1
    assert sum(b["pairs"] for b in pairs["by_length"]["buckets"]) == 3
    gen = result["generation"]
    assert gen["prompts"] == 6 and gen["settings"] == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "seed": 0}
    assert gen["kl"] is not None and gen["kl_se"] > 0 and gen["kl_samples"] == 6
    assert gen["kl_of"] == "the models' own distributions"
    assert 0 <= gen["length"]["policy"] <= 6 and 0 < gen["distinct_1"]["policy"] <= 1
    assert gen["reward"]["spec"] == "eval_cli_reward:score"
    w = gen["win_rate"]
    assert w["wins"] + w["ties"] + w["losses"] == 6 and w["ci_low"] <= w["win_rate"] <= w["ci_high"]
    refusal = result["refusal"]
    assert (refusal["safe"], refusal["unsafe"]) == (2, 1)
    assert refusal["policy"]["safe"] == 2 and refusal["detector"].startswith("default")
    samples = result["samples"]
    assert len(samples) == 5  # at most 5 of the 6 prompts
    assert set(samples[0]) == {"prompt", "policy", "reference", "policy_reward", "reference_reward"}
    assert samples[0]["prompt"] == "Q: hi there A:"
    assert samples[2]["prompt"] == "<s><|user|> tell me a joke</s><|assistant|>"  # chat prompts as rendered
    flat = flat_metrics(result)
    assert flat["kl"] == gen["kl"] and flat["reward/policy"] == gen["reward"]["policy"]
    assert flat["rewards/accuracies"] == pairs["rewards/accuracies"] and "win_rate/ci_low" in flat


def test_a_model_against_itself(files, reward_on_path):
    """Same model, same seed: every pair a tie, KL exactly 0, identical samples (all reward ties: win rate ½)."""
    options = EvalOptions(
        model=files["policy"],
        ref=files["policy"],
        data=files["pairs"],
        prompts=files["prompts"],
        reward="eval_cli_reward:score",
        refusal_prompts=files["refusal"],
        refusal_detector="eval_cli_reward:always",
        max_new_tokens=4,
        num_prompts=3,
    )
    result = run_eval(options)
    assert result["pairs"]["ties"] == 3 and result["pairs"]["rewards/accuracies"] == 0.0
    gen = result["generation"]
    assert gen["prompts"] == 3 and gen["prompts_in_file"] == 6
    assert (gen["kl"], gen["kl_se"]) == (0.0, 0.0)
    assert gen["win_rate"]["ties"] == 3 and gen["win_rate"]["win_rate"] == 0.5
    # a detector that always says "refusal": every safe prompt over-refused, no unsafe one answered
    rates = result["refusal"]["policy"]
    assert (rates["over_refusal_rate"], rates["unsafe_compliance_rate"]) == (1.0, 0.0)
    assert result["refusal"]["detector"] == "eval_cli_reward:always"


def bad_file(files, name: str, rows) -> str:
    return write_rows(files["root"] / name, rows)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no inputs", "eval: nothing to evaluate; give --data, --prompts or --refusal-prompts"),
        ("no ref", "eval: --ref is required"),
        ("reward without prompts", "--reward scores samples of --prompts; give --prompts too"),
        ("bad reward", "--reward no_such_module_xyz:score: cannot import module 'no_such_module_xyz'"),
        ("prompt field missing", "bad_prompts.jsonl line 2: no field 'prompt' (the row has: question)"),
        ("bad label", "bad_refusal.jsonl line 1: field 'label' must be 'safe' or 'unsafe', got 'fine'"),
        ("zero temperature", "--temperature must be greater than 0 (sampling), got 0.0"),
        ("json folder missing", "--json"),
        ("zero prompt length", "--max-prompt-length must be at least 1, got 0"),
    ],
)
def test_user_errors_exit_2_with_one_line(files, tmp_path, capsys, case, message):
    base = ["eval", "--model", files["policy"], "--ref", files["reference"]]
    args = {
        "no inputs": base,
        "no ref": ["eval", "--model", files["policy"], "--data", files["pairs"]],
        "reward without prompts": base + ["--data", files["pairs"], "--reward", "m:f"],
        "bad reward": base + ["--prompts", files["prompts"], "--reward", "no_such_module_xyz:score"],
        "prompt field missing": base
        + ["--prompts", bad_file(files, "bad_prompts.jsonl", [{"prompt": "hi"}, {"question": "hi"}])],
        "bad label": base
        + ["--refusal-prompts", bad_file(files, "bad_refusal.jsonl", [{"prompt": "hi", "label": "fine"}])],
        "zero temperature": base + ["--prompts", files["prompts"], "--temperature", "0"],
        "json folder missing": base + ["--data", files["pairs"], "--json", str(tmp_path / "no" / "eval.json")],
        "zero prompt length": base + ["--prompts", files["prompts"], "--max-prompt-length", "0"],
    }[case]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("preftune: error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("*.json"))


# ------------------------------------------------------------------------------------------- reward folders


def save_reward_model(folder, seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),
        num_labels=1,
    )
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_reward_model_folder_scores_the_last_token(tmp_path):
    model, tokenizer = save_reward_model(tmp_path / "rm")
    reward = load_reward(str(tmp_path / "rm"), batch_size=3)
    prompts = ["Q: hi there A:", "Q: what color is the sky ? A:", "hi"]
    responses = [" good", " blue", " there </s>"]  # the last text ends with EOS, the id preftune pads with
    scores = reward(prompts, responses)
    for text, score in zip((p + r for p, r in zip(prompts, responses)), scores):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():  # one unpadded text: the classifier's logit at its last token
            expected = model(ids).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)


def test_reward_folder_with_pickle_weights_is_refused(tmp_path):
    folder = tmp_path / "rm"
    save_reward_model(folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"holds only pickle weights \(pytorch_model.bin\)"):
        load_reward(str(folder))


def test_training_calls_the_same_path_with_models_in_memory(files):
    """No --model/--ref: the caller's models and tokenizer are used, and a policy in train mode stays in it."""
    from preftune.evaluation.evaluate import evaluate_models, load_inputs
    from preftune.loading import load_causal_lm, load_tokenizer

    policy = load_causal_lm(files["policy"]).train()
    tokenizer = load_tokenizer(files["policy"])
    options = EvalOptions(data=files["pairs"], prompts=files["prompts"], max_new_tokens=3, num_prompts=2)
    direct = run_eval(options, policy=policy, reference=policy, tokenizer=tokenizer)
    assert policy.training
    assert direct["model"] is None and direct["pairs"]["ties"] == 3 and direct["generation"]["kl"] == 0.0
    again = evaluate_models(load_inputs(options, tokenizer), policy, policy, tokenizer, options)
    assert again["samples"] == direct["samples"]  # seeded: the same samples at every call
    assert {"kl", "kl_se", "rewards/ties", "length/policy", "distinct_2/reference"} <= set(flat_metrics(again))
