"""--fsdp loads sharded: each process reads only its rows of each tensor from the files, and checkpoints and final/
are written as they are gathered, one tensor at a time.

Fast tests check the file reader and writer in one process. The slow ones run 2 processes under the real torchrun
(CPU, gloo): this file itself as a script (`probe`, at the bottom) loads models sharded and compares every tensor
with the files and with `load_causal_lm`, and `preftune train --fsdp` runs compare with one-process runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from preftune.checkpoint import OPTIMIZER, Streamed, optimizer_state, write_safetensors
from preftune.loading import WeightFiles

from helpers import SRC, assert_same_run, assert_same_weights, copy_run, records, torchrun
from toy import build_model, build_tokenizer, counting_pairs, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares sharded runs with one process: CI runs it again on other kernels

# ---------------------------------------------------------------------------------------------------- one process


def test_weight_files_read_the_rows_asked_for(tmp_path):
    """Rows of a tensor, converted to the output's dtype; a 0-d tensor; a tensor of a second file found through the
    index; asking past the end or reading a cut file fails."""
    a = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 7
    b = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
    save_file({"a": a, "step": torch.tensor(3.0)}, tmp_path / "one.safetensors")
    save_file({"b": b}, tmp_path / "two.safetensors")
    index = {"weight_map": {"a": "one.safetensors", "step": "one.safetensors", "b": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = WeightFiles(tmp_path)
    assert files.shape("a") == (6, 4) and files.dtype("b") == torch.bfloat16
    rows = torch.empty(2, 4)
    files.read_rows("a", rows, start=3)
    assert torch.equal(rows, a[3:5])
    wide = torch.empty(2, dtype=torch.float32)  # bf16 in the file: widened exactly
    files.read_rows("b", wide, start=1)
    assert wide.tolist() == [-2.25, 3.0]
    step = torch.empty(())
    files.read_rows("step", step)
    assert step.item() == 3.0
    with pytest.raises(ValueError, match="not room for rows"):
        files.read_rows("a", torch.empty(2, 4), start=5)
    data = (tmp_path / "one.safetensors").read_bytes()
    (tmp_path / "one.safetensors").write_bytes(data[:-40])  # the last rows of "a" or "step" are gone
    with pytest.raises(ValueError, match="cut short"):
        for name in ("a", "step"):
            files.read_rows(name, torch.empty(files.shape(name)))


def test_a_streamed_file_is_the_file_safetensors_writes(tmp_path):
    tensors = {
        "w": torch.randn(5, 3),
        "h": torch.randn(4, dtype=torch.float64).to(torch.bfloat16),
        "step": torch.tensor(7.0),
        "none": torch.empty(0, 2),
        "ids": torch.arange(3),
    }
    stream = Streamed([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], iter(tensors.values()))
    write_safetensors(tmp_path / "streamed.safetensors", stream)
    got = load_file(tmp_path / "streamed.safetensors")
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    wrong = Streamed([("w", torch.float32, (5, 3))], iter([torch.zeros(3, 5)]))
    with pytest.raises(ValueError, match="came as"):
        write_safetensors(tmp_path / "wrong.safetensors", wrong)


def test_the_optimizer_state_takes_its_tensors_from_optimizer_safetensors(tmp_path):
    save_file(
        {"0.exp_avg": torch.ones(2), "0.step": torch.tensor(2.0), "1.exp_avg": torch.zeros(3)}, tmp_path / OPTIMIZER
    )
    saved = {"state": {1: {"other": 5}}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    state = optimizer_state(tmp_path, saved)
    assert state["param_groups"] == saved["param_groups"]
    assert sorted(state["state"]) == [0, 1] and state["state"][1]["other"] == 5
    assert state["state"][0]["step"].item() == 2.0 and state["state"][1]["exp_avg"].tolist() == [0.0, 0.0, 0.0]
    assert optimizer_state(tmp_path / "none", saved) is saved  # written without --fsdp: state.pt holds it all


# ---------------------------------------------------------------------------------------------------- two processes


def run_script(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """This file's `probe` under the real torchrun (2 processes, gloo)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)


@pytest.mark.slow
def test_a_sharded_model_holds_the_files_tensors_exactly(tmp_path):
    """Three folders: tied float32 weights in one file; untied weights stored in bfloat16 (loaded as float32) in
    several files with an index; pickle weights (read whole by each process, then sharded). Every tensor of the
    sharded model, gathered, equals the file's, and every tensor and buffer (rotary inv_freq, which the files do not
    hold) equals `load_causal_lm`'s; each process holds only its rows. Its final/ weights, written as they are
    gathered, are the files `save_pretrained` writes: one file, or several with the same index."""
    tied = save_model_folder(tmp_path / "tied", tie=True)
    split = tmp_path / "split"
    build_model(len(build_tokenizer()), seed=3).to(torch.bfloat16).save_pretrained(split, max_shard_size="40KB")
    assert (split / "model.safetensors.index.json").exists()
    pickled = save_model_folder(tmp_path / "pickled", seed=4)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    out = tmp_path / "probe.json"
    proc = run_script(tmp_path, str(out), str(tied), str(split), str(pickled))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("loaded sharded") == 2 and proc.stderr.count("is read whole by each process") == 1
    found = json.loads(out.read_text())
    for folder in (tied, split, pickled):
        result = found[str(folder)]
        assert result["differs"] == [], folder
        assert result["compared"] >= 20 and result["buffers"] >= 1
        assert result["held"] == [math.ceil(n / 2) for n in result["rows"]]  # rank 0's rows: half, rounded up
        assert result["final"]["files"] == result["expected"]["files"] and result["final"]["differs"] == []
        assert result["final"]["index"] == result["expected"]["index"]
        assert result["config_equal"] and result["generation_config_equal"]
    assert found[str(split)]["final"]["index"] is not None  # several files at 40 KB


def train_args(toy: dict, out: Path, batch_size: int, *extra: str) -> list[str]:
    """25 pairs, 8 per step in file order (4 steps of 8, 8, 8, 1: rank 1 has no pair in the last one) and 9 held-out
    pairs (5 + 4), a checkpoint at every step; warmup makes step 1's learning rate 0."""
    return [
        "train",
        *("--model", toy["model"], "--data", toy["train"], "--eval-data", toy["eval"], "--eval-every", "2"),
        *("--output", str(out), "--batch-size", str(batch_size), "--no-shuffle", "--epochs", "1"),
        *("--learning-rate", "1e-3", "--lr-scheduler", "linear", "--warmup-steps", "1", "--save-every", "1"),
        *extra,
    ]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp-loading")
    return {
        "root": root,
        "model": str(save_model_folder(root / "model", tie=True)),
        "train": str(write_jsonl(counting_pairs(25, seed=1), root / "train.jsonl")),
        "eval": str(write_jsonl(counting_pairs(9, seed=2), root / "eval.jsonl")),
    }


def one_process(toy: dict, name: str, *extra: str) -> Path:
    from preftune.cli import main

    out = toy["root"] / name
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_CACHE", str(toy["root"] / "cache-one"))
        assert main(train_args(toy, out, 8, *extra)) == 0
    return out


@pytest.fixture(scope="module")
def whole(toy):
    return one_process(toy, "whole")


@pytest.fixture(scope="module")
def sharded(toy):
    """2 processes, --fsdp, an empty reference cache: the sharded policy computes it."""
    out = toy["root"] / "sharded"
    proc = torchrun(train_args(toy, out, 4, "--fsdp"), toy["root"] / "cache-two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_a_sharded_run_trains_like_one_process(whole, sharded):
    out, proc = sharded
    assert_same_run(records(out), records(whole))
    assert_same_weights(out, whole)
    assert proc.stderr.count("loaded sharded") == 1  # the policy, logged by rank 0
    assert "Traceback" not in proc.stderr
    for step in ("step-00000001", "step-00000003"):
        checkpoint = out / "checkpoints" / step
        names = load_file(checkpoint / "model.safetensors").keys()
        assert names == load_file(whole / "checkpoints" / step / "model.safetensors").keys()
        optimizer = torch.load(checkpoint / "state.pt", weights_only=True)["optimizer"]
        assert optimizer["state"] == {}  # its tensors are in optimizer.safetensors: step, exp_avg, exp_avg_sq
        assert len(load_file(checkpoint / OPTIMIZER)) == 3 * len(names)


@pytest.mark.slow
def test_the_sharded_models_reference_cache_is_the_one_process_file(toy, sharded):
    """The sharded policy computed the reference log-probs (each process every other batch, the other taking part in
    its gathers): the files one process writes at the same --batch-size, byte for byte."""
    from preftune.cli import main

    single = toy["root"] / "cache-single"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFTUNE_CACHE", str(single))
        argv = ["precompute", "--model", toy["model"], "--data", toy["train"], "--eval-data", toy["eval"]]
        assert main([*argv, "--batch-size", "4"]) == 0
    shared = sorted((toy["root"] / "cache-two").iterdir())
    assert [p.name for p in shared] == sorted(p.name for p in single.iterdir()) and len(shared) == 2
    for path in shared:
        assert path.read_bytes() == (single / path.name).read_bytes(), path.name


@pytest.mark.slow
def test_final_is_an_ordinary_model_folder(whole, sharded):
    from preftune.loading import load_causal_lm

    final, expected = sharded[0] / "final", whole / "final"
    model = load_causal_lm(str(final))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert load_file(final / "model.safetensors").keys() == load_file(expected / "model.safetensors").keys()
    for name in ("config.json", "generation_config.json"):
        assert json.loads((final / name).read_text()) == json.loads((expected / name).read_text()), name


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_sharded(toy, whole, sharded, tmp_path):
    """The step-2 checkpoint (model.safetensors and optimizer.safetensors): 2 processes with --fsdp read their rows
    of it and finish the run as the uninterrupted one-process run."""
    out = copy_run(sharded[0], tmp_path / "run")
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-00000003")
    proc = torchrun(train_args(toy, out, 4, "--fsdp", "--resume"), toy["root"] / "cache-two")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("resumed from") == 1
    assert_same_run(records(out), records(whole))
    assert_same_weights(out, whole)


@pytest.mark.slow
def test_a_sharded_frozen_reference_trains_like_one_process(toy):
    """--no-ref-cache: the frozen reference is loaded sharded too (it runs in the rounds a process lacks)."""
    expected = one_process(toy, "live-whole", "--no-ref-cache")
    out = toy["root"] / "live-sharded"
    proc = torchrun(train_args(toy, out, 4, "--fsdp", "--no-ref-cache"), toy["root"] / "cache-live")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("loaded sharded") == 2  # the policy and the reference
    assert_same_run(records(out), records(expected))
    assert_same_weights(out, expected)


# ---------------------------------------------------------------------------------------------------- the probe


def probe(out: Path, folders: list[str]) -> None:
    """Run by each of 2 processes (`run_script`): load each folder sharded and whole, compare, write `out` (rank 0)."""
    from torch.distributed.tensor import DTensor

    from preftune import distributed, fsdp
    from preftune.loading import load_causal_lm

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # as the CLI logs: rank 0 only, at INFO
    me = distributed.init()
    cfg = SimpleNamespace(trust_remote_code=False, allow_pickle_weights=True, weights_dtype="float32")
    found = {}
    for folder in folders:
        model = fsdp.load_sharded(folder, cfg, torch.device("cpu"))
        plain = load_causal_lm(folder, allow_pickle_weights=True)
        files = {}
        for file in Path(folder).glob("*.safetensors"):
            files.update(load_file(file))
        for file in Path(folder).glob("*.bin"):
            files.update(torch.load(file, weights_only=True))
        result = {"differs": [], "compared": 0, "held": [], "rows": []}
        expected = {**plain.state_dict(), **dict(plain.named_buffers())}
        for name, tensor in {**model.state_dict(), **dict(model.named_buffers())}.items():
            whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            same = torch.equal(whole, expected[name]) and (name not in files or torch.equal(whole, files[name].float()))
            result["differs"] += [] if same else [name]
            result["compared"] += 1
            if isinstance(tensor, DTensor):
                result["held"].append(len(tensor.to_local()))
                result["rows"].append(tensor.shape[0])
        result["buffers"] = len(dict(plain.named_buffers()))
        config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
        result["config_equal"] = config == {k: v for k, v in plain.config.to_dict().items() if k != "_name_or_path"}
        result["generation_config_equal"] = model.generation_config.to_dict() == plain.generation_config.to_dict()
        written, reference = out.parent / f"final-{Path(folder).name}", out.parent / f"plain-{Path(folder).name}"
        weights = fsdp.final_weights(model, max_shard_size="40KB")
        fsdp.on_main(weights, lambda: written.mkdir() or weights.write(written))
        if me.is_main:
            plain.save_pretrained(reference, max_shard_size="40KB")
            result["final"], result["expected"] = folder_weights(written), folder_weights(reference)
            got, want = ({} for _ in range(2))
            for folder_, into in ((written, got), (reference, want)):
                for file in folder_.glob("*.safetensors"):
                    into.update(load_file(file))
            result["final"]["differs"] = [n for n in want if n not in got or not torch.equal(got[n], want[n])]
        found[folder] = result
    if me.is_main:
        out.write_text(json.dumps(found))
    distributed.teardown()


def folder_weights(folder: Path) -> dict:
    index = folder / "model.safetensors.index.json"
    return {
        "files": sorted(p.name for p in folder.glob("*.safetensors")),
        "index": json.loads(index.read_text()) if index.exists() else None,
    }


if __name__ == "__main__":
    probe(Path(sys.argv[1]), sys.argv[2:])
