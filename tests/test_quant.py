"""QLoRA: a base loaded in 4 or 8 bits by bitsandbytes (on the CPU here) trains through a LoRA adapter only; its
reference is the quantized base with the adapter disabled, cached under a key of its own; --merge merges into
the full-precision base. The refusals run without bitsandbytes too."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import lora
from preftune import recipe as train_module
from preftune.cli import main
from preftune.config import resolve
from preftune.loading import load_causal_lm

from conftest import stopped_after
from helpers import losses
from toy import counting_pairs, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {
        "model": str(save_model_folder(root / "model")),
        "train": str(write_jsonl(counting_pairs(16, seed=1), root / "train.jsonl")),
        "root": root,
    }


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


def base_args(toy, out: Path, steps: int = 2) -> list[str]:
    return [
        "train",
        "--model",
        toy["model"],
        "--data",
        toy["train"],
        "--output",
        str(out),
        "--batch-size",
        "8",
        "--max-steps",
        str(steps),
        "--learning-rate",
        "1e-2",
        "--lr-scheduler",
        "constant",
        "--no-report",
        "--ref-cache",
        str(toy["root"] / "cache"),
    ]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cfg_for(toy, *extra: str):
    cfg, _ = resolve({"model": toy["model"], "data": toy["train"], "output": "-", "lora_r": 4, **dict(extra)})
    return cfg


@pytest.fixture(scope="module")
def qlora(toy, bnb):
    """One --load-in-4bit --lora-r 4 --merge run: its folder and the policy's state just before final/."""
    out = toy["root"] / "qlora"
    weights = Path(toy["model"], "model.safetensors")
    before = sha256(weights)
    captured = {}
    save_final = train_module.save_final

    def capture(s, *rest):
        captured.update({k: v.detach().clone() for k, v in s.policy.state_dict().items()})
        return save_final(s, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "save_final", capture)
        assert main(base_args(toy, out) + ["--lora-r", "4", "--load-in-4bit", "--merge"]) == 0
    assert sha256(weights) == before  # the base folder is only read
    return {"out": out, "state": captured}


def test_4bit_trains_the_adapter_only(toy, qlora):
    run = losses(qlora["out"])
    # B = 0 at the start and NF4 dequantizes the same weights for every batch: π = π_ref exactly, loss = ln 2.
    assert len(run) == 2 and run[0] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(run[1])
    assert run[1] < run[0]
    state = qlora["state"]
    fresh = load_causal_lm(toy["model"], bits=4).state_dict()  # the quantized base, never trained
    base = {k: v for k, v in state.items() if ".lora_" not in k}
    assert len(base) == len(fresh)
    for name, tensor in base.items():  # packed 4-bit weights, their scales and every float weight: bit-identical
        original = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(tensor, fresh[original]), name
    assert state["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"].dtype == torch.uint8
    saved = load_file(qlora["out"] / "final" / "adapter_model.safetensors")
    # 2 layers × 7 linear layers (q, k, v, o, gate, up, down) × (A, B), the output layer left out
    assert len(saved) == 28 and all(".lora_" in k for k in saved)
    assert all(v.abs().sum() > 0 for k, v in saved.items() if ".lora_B." in k)


def test_a_4bit_run_resumes_exactly(toy, qlora, tmp_path):
    """Interrupted after step 1, resumed: the checkpoint holds only the adapter (the 4-bit base is read again from
    its folder), and the resumed run ends where the uninterrupted one did."""
    out = tmp_path / "resumed"
    args = base_args(toy, out) + ["--lora-r", "4", "--load-in-4bit", "--save-every", "1"]
    with stopped_after(1):
        assert main(args) == 130
    saved = load_file(out / "checkpoints" / "step-00000001" / "model.safetensors")
    assert len(saved) == 28 and all(".lora_" in k for k in saved)
    assert main(args + ["--resume"]) == 0
    assert losses(out) == losses(qlora["out"])
    resumed = load_file(out / "final" / "adapter_model.safetensors")
    whole = load_file(qlora["out"] / "final" / "adapter_model.safetensors")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_live_reference_is_the_quantized_base_as_the_cache_is(toy, qlora, tmp_path):
    # --no-ref-cache runs the policy with its adapter disabled at every step: the 4-bit base, as the cache did.
    out = tmp_path / "live"
    args = base_args(toy, out)[:-2] + ["--lora-r", "4", "--load-in-4bit", "--no-ref-cache"]  # no --ref-cache
    assert main(args) == 0
    assert losses(out) == pytest.approx(losses(qlora["out"]), abs=1e-6)


def test_a_loaded_adapter_trains_further_on_the_4bit_base(toy, qlora, tmp_path):
    out = tmp_path / "further"
    args = base_args(toy, out) + ["--load-in-4bit"]
    args[args.index("--model") + 1] = str(qlora["out"] / "final")  # the adapter folder; its config names the base
    assert main(args) == 0
    run = losses(out)
    # the reference is the adapter as loaded on the 4-bit base: π = π_ref at the first step again
    assert run[0] == pytest.approx(math.log(2), abs=1e-6) and run[1] < run[0]
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 4


def test_merge_goes_into_the_full_precision_base(toy, qlora):
    merged = load_file(qlora["out"] / "final-merged" / "model.safetensors")
    base = load_file(Path(toy["model"]) / "model.safetensors")
    adapter = load_file(qlora["out"] / "final" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]  # [4, 32], [32, 4]
    # W' = W + (α / r)·B·A with the default α = 2r: scale 2, on the float32 W, not its 4-bit rounding
    expected = base["model.layers.0.self_attn.q_proj.weight"] + 2.0 * b @ a
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert "quantization_config" not in json.loads((qlora["out"] / "final-merged" / "config.json").read_text())


def test_reference_cache_key_names_the_quantization(toy, bnb):
    def digest(*extra):
        cfg = cfg_for(toy, *extra)
        model = load_causal_lm(toy["model"], bits=lora.bits(cfg))
        return lora.reference_digest(lora.wrap(model, cfg), cfg)

    full, four, eight = digest(), digest(("load_in_4bit", True)), digest(("load_in_8bit", True))
    assert len({full, four, eight}) == 3
    assert digest(("load_in_4bit", True)) == four  # quantizing is deterministic: a second run reuses the cache


def test_8bit_trains(toy, bnb, tmp_path):
    out = tmp_path / "run"
    assert main(base_args(toy, out) + ["--lora-r", "4", "--load-in-8bit"]) == 0
    run = losses(out)
    # LLM.int8() picks outlier columns from the whole batch, so the cached reference (other batches) and the policy
    # differ in rounding: the first loss is ln 2 only up to that.
    assert len(run) == 2 and run[0] == pytest.approx(math.log(2), abs=1e-3) and math.isfinite(run[1])
    assert len(load_file(out / "final" / "adapter_model.safetensors")) == 28


@pytest.mark.slow  # about 30 s: two processes under the real torchrun
def test_two_processes_train_a_4bit_base_as_one(toy, bnb, tmp_path):
    def args(out: Path, batch_size: int) -> list[str]:
        return [
            "train",
            "--model",
            toy["model"],
            "--data",
            toy["train"],
            "--output",
            str(out),
            "--batch-size",
            str(batch_size),
            "--max-steps",
            "2",
            "--learning-rate",
            "1e-2",
            "--no-shuffle",
            "--no-report",
            "--lora-r",
            "4",
            "--load-in-4bit",
            "--ref-cache",
            str(tmp_path / "cache"),
        ]

    assert main(args(tmp_path / "one", 8)) == 0
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "preftune",
            *args(tmp_path / "two", 4),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the same 8 pairs per step, 4 on each process: gradients summed across them give the one-process step
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    one = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--load-in-4bit"], "--load-in-4bit: a quantized model trains only through a LoRA adapter; add --lora-r"),
        (["--load-in-8bit", "--lora-r", "0"], "--load-in-8bit: a quantized model trains only through a LoRA adapter"),
        (
            ["--load-in-4bit", "--load-in-8bit", "--lora-r", "4"],
            "--load-in-4bit and --load-in-8bit contradict each other: give one",
        ),
        (["--load-in-4bit", "--lora-r", "4", "--fsdp"], "--fsdp: not supported with --load-in-4bit"),
    ],
)
def test_quantization_flag_mistakes(toy, tmp_path, capsys, extra, message):
    # checked before bitsandbytes is imported: these run without it too
    out = tmp_path / "run"
    assert main(base_args(toy, out) + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preftune: error: ") and message in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err) and not out.exists()


@pytest.mark.parametrize("option", ["--load-in-4bit", "--load-in-8bit"])
def test_without_bitsandbytes_the_error_says_how_to_install_it(toy, tmp_path, capsys, monkeypatch, option):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    out = tmp_path / "run"
    assert main(base_args(toy, out) + [option, "--lora-r", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"preftune: error: {option} needs the bitsandbytes package: pip install bitsandbytes"
    assert not out.exists()
