"""`preftune demo`, stages 1–3 and DPO training: the controlled-sentiment experiment of the DPO paper (§6.1) in
miniature, offline, in minutes on a CPU.

    1 corpus   seeded grammar → a few thousand short movie reviews of mixed sentiment      corpus.txt
    2 sft      tokenizer + tiny Llama trained from scratch on the corpus (the SFT model)   sft/
    3 pairs    two SFT samples per prompt, labelled by the ground-truth sentiment reward
               with Bradley–Terry noise                                                  pairs/{train,heldout,prompts}.jsonl
    4 dpo      `preftune.recipe.train` on the pairs, the SFT model as policy and reference  dpo/ (final/ = the DPO model)

Stages 5–6 (eval, report) are in module `command` (`preftune demo`); module `frontier` reuses stages 1–3 and
`run_dpo` for a β sweep. Everything is seeded: the same sizes give the same files (up to float rounding across
machines).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from preftune.demo import preferences, sentiment, sft
from preftune.errors import UserError
from preftune.rundir import METRICS

log = logging.getLogger("preftune")
SFT_LR = 3e-3  # peak learning rate of the from-scratch language model (warmup, then cosine to a tenth)


@dataclass(frozen=True)
class Sizes:
    """How much of everything; QUICK and DEFAULT are `--quick` and the default, tests use smaller ones."""

    reviews: int  # corpus size
    sft_steps: int  # AdamW steps of the from-scratch language model
    sft_batch: int  # reviews per SFT step
    train_prompts: int  # prompts of the training pairs (one pair each, before skips)
    heldout_prompts: int  # prompts of the held-out pairs, also the eval prompts (none of them occurs in training)
    dpo_steps: int
    dpo_batch: int  # pairs per DPO step
    hidden: int = 64  # model width (2 layers, 4 heads)
    max_new_tokens: int = 32  # sampling cap; reviews continue for 8–20 tokens and then end with EOS
    tau: float = preferences.TAU  # Bradley–Terry temperature of the labels (module preferences)
    # 4e-4 (quick: 5e-4, for its fewer steps) raised the mean reward by 0.2–0.3 at a KL of about 3 nats; 1e-3
    # raised it more at 4× the KL, and the samples stopped being grammatical.
    dpo_lr: float = 4e-4
    iterate_prompts: int = 512  # frontier: training prompts each on-policy round samples from (k each)
    seed: int = 0


QUICK = Sizes(
    reviews=3000,
    sft_steps=300,
    sft_batch=64,
    train_prompts=2048,
    heldout_prompts=256,
    dpo_steps=64,
    dpo_batch=32,
    dpo_lr=5e-4,
)
DEFAULT = Sizes(
    reviews=4000,
    sft_steps=600,
    sft_batch=64,
    train_prompts=4096,
    heldout_prompts=256,
    dpo_steps=128,
    dpo_batch=32,
    iterate_prompts=1024,  # 512 left every on-policy method within the intervals of offline DPO's 4 000 pairs
)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _stage(stages: dict, name: str, start: tuple[float, float], line: str, **numbers) -> None:
    """Record and log one stage. CPU seconds are this process's own: on a machine shared with other work they
    are what the stage costs, while wall seconds also count the waiting."""
    wall, cpu = (now - then for now, then in zip(_clock(), start))
    stages[name] = {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "summary": line, **numbers}
    log.info("stage %d %s (%.1f s): %s", len(stages), name, wall, line)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values)


# ---------------------------------------------------------------------------------------------- stages


def make_corpus(out: Path, sizes: Sizes, stages: dict) -> tuple[Path, list[str]]:
    start = _clock()
    texts = sentiment.reviews(sizes.reviews, seed=sizes.seed)
    path = out / "corpus.txt"
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    rewards = sentiment.score(texts)
    mean, sd = _mean_sd(rewards)
    words = len({w for t in texts for w in sentiment.words(t)})
    neutral = sum(r == 0 for r in rewards) / len(rewards)
    _stage(
        stages,
        "corpus",
        start,
        f"{len(texts)} reviews, {words} words; reward {mean:+.2f} ± {sd:.2f} (sd), {neutral:.0%} neutral → {path}",
        reviews=len(texts),
        words=words,
        reward_mean=mean,
        reward_sd=sd,
    )
    return path, texts


def make_sft(out: Path, texts: list[str], sizes: Sizes, stages: dict):
    start = _clock()
    tokenizer = sft.build_tokenizer(texts)
    model = sft.build_model(len(tokenizer), hidden=sizes.hidden, seed=sizes.seed)
    report = sft.train_lm(
        model,
        sft.encode(texts, tokenizer),
        steps=sizes.sft_steps,
        batch_size=sizes.sft_batch,
        lr=SFT_LR,
        seed=sizes.seed,
    )
    folder = sft.save_model(model, tokenizer, out / "sft")
    params = sum(p.numel() for p in model.parameters())
    _stage(
        stages,
        "sft",
        start,
        f"tokenizer of {len(tokenizer)} tokens, Llama of {params / 1e6:.2f} M parameters, "
        f"{report.steps} steps: loss {report.first_loss:.2f} → {report.last_loss:.2f} nats/token → {folder}",
        vocab=len(tokenizer),
        parameters=params,
        **asdict(report),
    )
    return folder, model, tokenizer


@dataclass
class SampleStats:
    """The SFT samples behind one set of pairs (two per prompt)."""

    reward_mean: float
    reward_sd: float
    cut: int  # samples that reached max_new_tokens without EOS (kept as they are)
    retokenized: int  # samples whose text tokenizes to other ids than were sampled, e.g. ",," is one <unk> (kept)


def _retokenized(prompts: list[str], samples: list[sft.Sample], tokenizer) -> int:
    prompt_ids = tokenizer(prompts)["input_ids"]
    full_ids = tokenizer([p + s.text for p, s in zip(prompts, samples)])["input_ids"]
    return sum(list(f) != list(p) + s.ids for p, f, s in zip(prompt_ids, full_ids, samples))


def _pairs(prompts: list[str], model, tokenizer, sizes: Sizes, seed: int, desc: str):
    """Two samples per prompt → labelled rows, the label report and what the samples were like."""
    both = prompts + prompts
    samples = sft.sample(model, tokenizer, both, max_new_tokens=sizes.max_new_tokens, seed=seed, desc=desc)
    texts = [s.text for s in samples]
    rewards = sentiment.score([p + t for p, t in zip(both, texts)])
    n = len(prompts)
    rows, report = preferences.preference_rows(
        prompts, texts[:n], texts[n:], rewards[:n], rewards[n:], tau=sizes.tau, seed=seed
    )
    stats = SampleStats(
        *_mean_sd(rewards), cut=sum(not s.finished for s in samples), retokenized=_retokenized(both, samples, tokenizer)
    )
    return rows, report, stats


def _write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_pairs(out: Path, model, tokenizer, sizes: Sizes, stages: dict) -> dict[str, Path]:
    start = _clock()
    folder = out / "pairs"
    folder.mkdir()
    train_prompts = sentiment.prompts(sizes.train_prompts, seed=sizes.seed + 1)
    heldout_prompts = sentiment.prompts(sizes.heldout_prompts, seed=sizes.seed + 2, heldout=True)
    train_rows, train_report, stats = _pairs(train_prompts, model, tokenizer, sizes, sizes.seed + 1, "sample")
    heldout_rows, heldout_report, _ = _pairs(heldout_prompts, model, tokenizer, sizes, sizes.seed + 2, "held-out")
    paths = {
        "train_pairs": _write_jsonl(train_rows, folder / "train.jsonl"),
        "heldout_pairs": _write_jsonl(heldout_rows, folder / "heldout.jsonl"),
        "prompts": _write_jsonl([{"prompt": p} for p in heldout_prompts], folder / "prompts.jsonl"),
    }
    _stage(
        stages,
        "pairs",
        start,
        f"2 SFT samples per prompt, reward {stats.reward_mean:+.2f} ± "
        f"{stats.reward_sd:.2f} (sd), {stats.cut} of {2 * len(train_prompts)} cut at {sizes.max_new_tokens} "
        f"tokens; train: {train_report.summary()}; held-out: {heldout_report.pairs} pairs, "
        f"{len(heldout_prompts)} prompts → {folder}",
        samples=asdict(stats),
        train=asdict(train_report),
        heldout=asdict(heldout_report),
    )
    return paths


def run_dpo(
    out: Path,
    sft_folder: Path,
    paths: dict[str, Path],
    sizes: Sizes,
    stages: dict,
    *,
    beta: float = 0.1,
    name: str = "dpo",
) -> Path:
    """DPO through preftune's normal training path, exactly as `preftune train` runs it, into out/name. Every β
    shares out/ref-cache: the reference log-probs do not depend on β, so runs after the first reuse them."""
    from preftune.config import resolve
    from preftune.recipe import train

    start = _clock()
    run = out / name
    cfg, _ = resolve(
        {
            "model": str(sft_folder),
            "data": str(paths["train_pairs"]),
            "eval_data": str(paths["heldout_pairs"]),
            "output": str(run),
            "beta": beta,
            "learning_rate": sizes.dpo_lr,
            "lr_scheduler": "constant",
            "warmup_steps": 5,
            "batch_size": sizes.dpo_batch,
            "max_steps": sizes.dpo_steps,
            "eval_every": max(1, sizes.dpo_steps // 4),
            "seed": sizes.seed,
            # The reference log-probs belong to this demo's SFT model: keep them in its folder.
            "ref_cache": str(out / "ref-cache"),
            "device": "cpu",
        }
    )  # every stage runs on the CPU: a tiny model gains nothing from a GPU
    train(cfg)
    records = [json.loads(line) for line in (run / METRICS).read_text(encoding="utf-8").splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    first, last = records[0], records[-1]
    _stage(
        stages,
        name,
        start,
        f"{len(records)} steps: loss {first['loss']:.3f} → {last['loss']:.3f}; held-out "
        f"reward accuracy {last['eval/rewards/accuracies']:.2f}, margin {last['eval/rewards/margins']:.3f} "
        f"→ {run / 'final'}",
        steps=len(records),
        first_loss=first["loss"],
        last_loss=last["loss"],
        eval_accuracy=[r["eval/rewards/accuracies"] for r in evals],
        eval_margin=[r["eval/rewards/margins"] for r in evals],
    )
    return run


# ---------------------------------------------------------------------------------------------- all stages


def _check_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out}: folder is not empty; choose a new folder")


def run_stages(output: Path, quick: bool = False, sizes: Sizes | None = None) -> dict:
    """Run stages 1–3 and DPO training into `output` (a new or empty folder).

    Returns {"corpus": corpus.txt, "sft": SFT model folder (tokenizer included), "train_pairs", "heldout_pairs":
    {prompt, chosen, rejected} jsonl, "prompts": held-out {prompt} jsonl for eval, "run": the DPO run folder
    (its final/ is the DPO model), "stages": {name: {"seconds", "summary" (the line logged), stage numbers}}}.
    The stages dict is also written to `output/stages.json`. `sizes` overrides QUICK/DEFAULT (tests).
    """
    out = Path(output)
    _check_output(out)
    sizes = sizes or (QUICK if quick else DEFAULT)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict] = {}
    with sft.one_cpu_thread():
        corpus, texts = make_corpus(out, sizes, stages)
        sft_folder, model, tokenizer = make_sft(out, texts, sizes, stages)
        paths = make_pairs(out, model, tokenizer, sizes, stages)
        del model  # DPO loads the saved folder, as a user's run would
        run = run_dpo(out, sft_folder, paths, sizes, stages)
    (out / "stages.json").write_text(json.dumps(stages, indent=1) + "\n", encoding="utf-8")
    return {"corpus": corpus, "sft": sft_folder, **paths, "run": run, "stages": stages}
