"""The rounds of `preftune iterate`: on-policy (iterative) preference training from a prompt file.

Round r starts from policy π_{r−1} (π_0: --model, the starting model) and runs four stages:

    sample    k responses per --prompts prompt from π_{r−1} (`evaluation.sampling.generate`: batched, KV cache,
              seeded with 1000 · --seed + r), scored by --reward (`evaluation.rewards.load_reward`)
    train     dpo: pairs (`pairs.build_pairs`), then `recipe.train` on them, exactly as `preftune train` runs
              (audit, reference log-probs computed once and cached, checkpoints, report); rloo: `rloo.train_round`
              on the samples and their rewards. The reference is π_0 (--reference start) or π_{r−1} (previous).
    eval      `evaluation.evaluate` of π_r against π_0 on --eval-prompts: reward ± SE, KL(π_r‖π_0) ± SE, win rate;
              the reward is --eval-reward when given (e.g. a ground truth the trained --reward only estimates)
    summary   round.json, then OUTPUT/iterate.json and iterate.png over all rounds so far

Files (each written atomically; a stage's last file is its marker, so a rerun with --resume skips a stage whose
marker exists and resumes training from the run's newest checkpoint):

    OUTPUT/iterate-config.json   the settings; --resume refuses others (--rounds may change)
    OUTPUT/iterate.json, .png    per round: reward, KL, win rate, pairs and skips, seconds, peak memory
    OUTPUT/ref-cache/            reference log-probs of every round's pairs (unless --ref-cache names another)
    OUTPUT/round-N/samples.jsonl, samples.json    per prompt: its k responses (text, token ids, ended), rewards
                   pairs.jsonl, pairs.json        (dpo) the pairs as `preftune train` reads them; the counts
                   run/                           the training run folder (config.yaml, metrics.jsonl, audit.json,
                                                  checkpoints/, report.html, final/: π_r)
                   train.json, eval.json, round.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune import __version__, rundir
from preftune.config import TrainConfig, resolve
from preftune.cost import measured
from preftune.device import resolve_device
from preftune.errors import UserError
from preftune.evaluation.evaluate import EvalOptions, evaluate_models, load_inputs
from preftune.evaluation.rewards import Reward, load_reward
from preftune.evaluation.sampling import (
    GenerationSettings,
    Prompt,
    encode_prompts,
    generate,
    load_prompts,
    prompt_text,
)
from preftune.evaluation.stats import mean_se
from preftune.files import write_file_atomically, write_json
from preftune.iterate.options import (
    EVAL,
    PAIRS,
    PAIRS_INFO,
    PLOT,
    REF_CACHE,
    ROUND,
    RUN,
    SAMPLES,
    SAMPLES_INFO,
    SUMMARY,
    TRAINED,
    IterateOptions,
    check_options,
    prepare_output,
    rloo_options,
    settings_of,
)
from preftune.iterate.pairs import Pair, build_pairs
from preftune.iterate.summary import plot, round_line, round_summary, signed
from preftune.loading import causal_lm_config, load_causal_lm, load_tokenizer

log = logging.getLogger("preftune")


@dataclass
class Iteration:
    """A checked run of rounds: the options, the train options resolved, and what every round reuses."""

    opts: IterateOptions
    out: Path
    cfg: TrainConfig  # resolved and checked once; model, data and output are round 1's
    device: torch.device
    prompts: list[Prompt]
    reward: Reward
    eval_reward: Reward  # `reward` itself unless --eval-reward names another

    def folder(self, r: int) -> Path:
        return self.out / f"round-{r}"

    def settings(self, seed: int) -> GenerationSettings:
        o = self.opts
        return GenerationSettings(o.temperature, o.top_p, o.max_new_tokens, seed)


# ---------------------------------------------------------------------------------------------------- the loop


def run(opts: IterateOptions) -> dict:
    """Check everything, then run (or resume) the rounds → the summary (what iterate.json holds)."""
    cfg = check_options(opts)
    causal_lm_config(opts.model, trust_remote_code=cfg.trust_remote_code, allow_pickle_weights=cfg.allow_pickle_weights)
    prompts = load_prompts(opts.prompts, flag="--prompts")
    load_prompts(opts.eval_prompts, flag="--eval-prompts")  # read again, tokenized, by each evaluation
    device = resolve_device(cfg.device)
    load = lambda spec: load_reward(  # noqa: E731
        spec, trust_remote_code=cfg.trust_remote_code, device=device, batch_size=cfg.batch_size
    )
    reward = load(opts.reward)
    eval_reward = reward if opts.eval_reward in (None, opts.reward) else load(opts.eval_reward)
    out = prepare_output(opts, settings_of(opts, cfg))
    it = Iteration(opts, out, cfg, device, prompts, reward, eval_reward)
    for r in range(1, opts.rounds + 1):
        if not (it.folder(r) / ROUND).exists():  # a finished round is skipped: --resume
            run_round(it, r)
            write_summary(it)  # after every round: the summary of a run stopped later is up to date
    return write_summary(it)


def run_round(it: Iteration, r: int) -> dict:
    """One round's stages, each skipped when its marker exists (--resume) → round.json's content."""
    folder = it.folder(r)
    folder.mkdir(exist_ok=True)
    policy = policy_of(it, r)
    log.info("iterate: round %d of %d, policy %s", r, it.opts.rounds, policy)
    cost: dict = {}
    with measured(cost):  # this round's wall time and peak memory (of the part run now, after a --resume)
        rows, sampled = sample(it, r, policy)
        trained = TRAINERS[it.opts.algorithm](it, r, policy, rows)  # dpo: pairs, then train; rloo: the samples
        result = evaluate(it, r, it.out / trained["final"])
    summary = round_summary(r, sampled, trained, result, cost)
    write_json(folder / ROUND, summary)
    log.info("iterate: %s", round_line(summary))
    return summary


def policy_of(it: Iteration, r: int) -> str:
    """π_{r−1}: the starting model, or the final model of the round before."""
    if r == 1:
        return it.opts.model
    return str(it.out / _read(it.folder(r - 1) / TRAINED)["final"])


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_file_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------- stages


def sample(it: Iteration, r: int, policy: str) -> tuple[list[dict], dict]:
    """Stage 1: k responses per prompt from `policy`, scored → (samples.jsonl's rows, samples.json)."""
    folder = it.folder(r)
    if (folder / SAMPLES_INFO).exists():
        return _read_jsonl(folder / SAMPLES), _read(folder / SAMPLES_INFO)
    start, cfg, k = time.perf_counter(), it.cfg, it.opts.samples
    tokenizer = load_tokenizer(policy, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(
        policy, trust_remote_code=cfg.trust_remote_code, allow_pickle_weights=cfg.allow_pickle_weights
    ).to(it.device)
    prompt_ids, cut = encode_prompts(it.prompts, tokenizer, cfg.max_prompt_length)
    settings = it.settings(seed=1000 * cfg.seed + r)
    # Each prompt k times in a row: one batched `generate`, each batch seeded on its own.
    drawn = generate(model, tokenizer, [ids for ids in prompt_ids for _ in range(k)], settings, cfg.batch_size)
    del model
    texts = [prompt_text(p, tokenizer) for p in it.prompts]
    rewards = it.reward([t for t in texts for _ in range(k)], drawn.texts)
    rows = [
        {
            "prompt": p.prompt,
            "prompt_ids": prompt_ids[i],
            "responses": drawn.texts[i * k : (i + 1) * k],
            "response_ids": drawn.response_ids[i * k : (i + 1) * k],
            "ended": drawn.ended[i * k : (i + 1) * k],
            "rewards": rewards[i * k : (i + 1) * k],
        }
        for i, p in enumerate(it.prompts)
    ]
    mean, se = mean_se(rewards)
    info = {
        "prompts": len(rows),
        "samples": len(rewards),
        "per_prompt": k,
        "ended": sum(drawn.ended),
        "prompts_truncated": cut,
        "reward": mean,
        "reward_se": se,
        "settings": dataclasses.asdict(settings),
        "seconds": _since(start),
    }
    _write_jsonl(folder / SAMPLES, rows)
    write_json(folder / SAMPLES_INFO, info)
    log.info("iterate: round %d sampled %d × %d responses, reward %s", r, len(rows), k, signed(mean, se))
    return rows, info


def make_pairs(it: Iteration, r: int, rows: list[dict]) -> dict:
    """dpo's stage 2: the round's pairs → pairs.jsonl and pairs.json (the counts)."""
    folder = it.folder(r)
    if (folder / PAIRS_INFO).exists():
        return _read(folder / PAIRS_INFO)
    start = time.perf_counter()
    pairs, counts = build_pairs(
        [row["responses"] for row in rows], [row["rewards"] for row in rows], it.opts.pairs, it.opts.min_gap
    )
    log.info("iterate: round %d %s", r, counts.summary())
    cfg = it.cfg
    if counts.pairs < cfg.batch_size * cfg.grad_accum:  # said here, in the words of this round, not of --data
        raise UserError(
            f"round {r}: {counts.pairs} pairs, fewer than one optimizer step "
            f"({rundir.batch_text(cfg.batch_size, cfg.grad_accum, 1)}): {counts.summary()}; give more "
            "--prompts, a larger --samples or --temperature, or a smaller --batch-size"
        )
    _write_jsonl(folder / PAIRS, pair_rows(rows, pairs))
    info = {**counts.to_dict(), "seconds": _since(start)}
    write_json(folder / PAIRS_INFO, info)
    return info


def pair_rows(rows: list[dict], pairs: list[Pair]) -> list[dict]:
    """The pairs as `preftune train` reads them, with their rewards; a chat prompt's responses as assistant turns."""

    def response(row: dict, i: int):
        text = row["responses"][i]
        return [{"role": "assistant", "content": text}] if isinstance(row["prompt"], list) else text

    return [
        {
            "prompt": rows[p.prompt]["prompt"],
            "chosen": response(rows[p.prompt], p.chosen),
            "rejected": response(rows[p.prompt], p.rejected),
            "chosen_reward": p.chosen_reward,
            "rejected_reward": p.rejected_reward,
        }
        for p in pairs
    ]


def _started(run: Path) -> bool:
    """The round's training has written its config or a checkpoint: `preftune train --resume` continues it."""
    return (run / rundir.CONFIG).exists() or rundir.latest_checkpoint(run) is not None


def train_dpo(it: Iteration, r: int, policy: str, rows: list[dict]) -> dict:
    """Pairs, then `preftune train`'s recipe on them into round-N/run → train.json."""
    folder, opts = it.folder(r), it.opts
    if (folder / TRAINED).exists():
        return _read(folder / TRAINED)
    pairs = make_pairs(it, r, rows)
    start, run = time.perf_counter(), folder / RUN
    args = {**opts.train, "model": policy, "data": str(folder / PAIRS), "output": str(run), "resume": _started(run)}
    if it.cfg.needs_reference:
        args["ref_cache"] = opts.train.get("ref_cache") or str(it.out / REF_CACHE)
        if opts.reference == "start" and r > 1:
            # Loaded for the cache pass over this round's pairs, then freed: one policy in memory while training.
            args["ref_model"] = opts.model
    cfg, _ = resolve(args)
    from preftune import recipe  # torch's training stack, loaded when a round trains

    final = recipe.train(cfg)
    trained = {"final": _inside(final, it.out), "pairs": pairs, "seconds": _since(start)}
    write_json(folder / TRAINED, trained)
    return trained


def train_rloo(it: Iteration, r: int, policy: str, rows: list[dict]) -> dict:
    """RLOO on the round's samples and rewards (no pairs) into round-N/run → train.json."""
    folder, opts, cfg = it.folder(r), it.opts, it.cfg
    if (folder / TRAINED).exists():
        return _read(folder / TRAINED)
    from preftune import rloo  # imported only for --algorithm rloo

    start, run = time.perf_counter(), folder / RUN
    final = rloo.train_round(
        policy,
        opts.model if opts.reference == "start" else policy,
        load_tokenizer(policy, trust_remote_code=cfg.trust_remote_code),
        [row["prompt_ids"] for row in rows],
        [row["response_ids"] for row in rows],
        [row["rewards"] for row in rows],
        rloo_options(opts, cfg),
        run,
        resume=run.exists(),  # a round stopped in training goes on from its newest checkpoint
    )
    trained = {"final": _inside(Path(final), it.out), "pairs": None, "seconds": _since(start)}
    write_json(folder / TRAINED, trained)
    return trained


TRAINERS = {"dpo": train_dpo, "rloo": train_rloo}


def _inside(path: Path, out: Path) -> str:
    """`path` relative to OUTPUT when it lies inside it (the folder may move between a stop and --resume)."""
    try:
        return str(Path(path).relative_to(out))
    except ValueError:
        return str(Path(path).absolute())


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def evaluate(it: Iteration, r: int, policy: Path) -> dict:
    """Stage 3: `preftune eval` of π_r against the starting model on --eval-prompts → eval.json's content.
    The same seed every round: the starting model's samples, and so its reward, are the same each time."""
    path = it.folder(r) / EVAL
    if path.exists():
        return _read(path)
    start, cfg, o = time.perf_counter(), it.cfg, it.opts
    options = EvalOptions(
        model=str(policy),
        ref=o.model,
        prompts=o.eval_prompts,
        reward=o.eval_reward or o.reward,
        max_prompt_length=cfg.max_prompt_length,
        batch_size=cfg.batch_size,
        temperature=o.temperature,
        top_p=o.top_p,
        max_new_tokens=o.max_new_tokens,
        seed=cfg.seed,
        device=cfg.device,
        trust_remote_code=cfg.trust_remote_code,
    )
    tokenizer = load_tokenizer(str(policy), trust_remote_code=cfg.trust_remote_code)
    inputs = load_inputs(dataclasses.replace(options, reward=None), tokenizer)
    inputs.reward = it.eval_reward  # loaded once for every round
    load = lambda folder, what: load_causal_lm(  # noqa: E731
        folder, trust_remote_code=cfg.trust_remote_code, allow_pickle_weights=cfg.allow_pickle_weights, what=what
    ).to(it.device)
    result = evaluate_models(inputs, load(str(policy), "--model"), load(o.model, "--model"), tokenizer, options)
    result["seconds"] = _since(start)
    write_json(path, result)
    return result


def write_summary(it: Iteration) -> dict:
    """iterate.json and iterate.png from the round.json files written so far."""
    rounds = [_read(it.folder(r) / ROUND) for r in range(1, it.opts.rounds + 1) if (it.folder(r) / ROUND).exists()]
    summary = {
        "preftune": __version__,
        "start": {
            "model": it.opts.model,
            "reward": rounds[0]["start_reward"],
            "reward_se": rounds[0]["start_reward_se"],
        },
        "rounds": rounds,
        "plot": PLOT,
    }
    plot(summary, it.out / PLOT)
    write_json(it.out / SUMMARY, summary)
    return summary
