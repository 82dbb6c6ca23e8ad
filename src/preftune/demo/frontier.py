"""`preftune frontier`: reward vs KL, on held-out prompts, of what a team can do with the demo's preference pairs:
offline DPO at several β, on-policy rounds (iterative DPO, RLOO on a learned reward model) and best-of-N sampling,
each point with what it cost. Figure 2 of the DPO paper, with the RL pipeline DPO replaces beside it.

    1–3        the demo's corpus, SFT model and pairs (module pipeline)
    reward     `preftune reward-model` on the pairs: held-out accuracy beside the labels' ceiling, agreement with
               the true reward on fresh samples (module reward_stage)
    dpo β=…    one DPO run per β through the normal training path, all sharing out/ref-cache: the first run
               computes the reference log-probs, the others log "reference log-probs: reused"
    eval       each DPO model vs the SFT model on the held-out prompts with the eval path's functions
               (`load_inputs` once, `evaluate_models` per β): sampled KL(π‖π_SFT) ± SE and mean reward ± SE
    on-policy  `preftune iterate` for iterative DPO (labelled by a judge as noisy as the pairs' labels, and by the
               learned reward model) and RLOO (learned reward model), evaluated after every round (module online)
    best-of-N  64 SFT samples per held-out prompt; for N = 2, 4, … 64 the reward is the mean best of N, picked by
               the ground truth or by the reward model, and the KL the analytic log N − (N − 1)/N
    plot       frontier.png (reward vs KL) and frontier.json, one log line per point with its cost

The KL of best-of-N is not measured: log N − (N − 1)/N is the usual analytic value (Stiennon et al. 2020, Beirami et
al. 2024 show it is an upper bound on the true KL), so best-of-N points may sit somewhat right of where they belong.
Best-of-N's cost is per held-out prompt at inference, the others' once, in training: the wall time of N samples is
the measured time of 64 scaled by N/64.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from preftune.cost import measured
from preftune.demo import online, pipeline, reward_stage, sentiment, sft
from preftune.demo.command import REWARD
from preftune.demo.frontier_plot import plot, point_lines
from preftune.errors import UserError
from preftune.evaluation.stats import mean_se
from preftune.rundir import EVAL, FINAL

log = logging.getLogger("preftune")
DEFAULT_BETAS = (0.05, 0.1, 0.3, 1.0)
BEST_OF = (2, 4, 8, 16, 32, 64)


def parse_betas(spec: str) -> list[float]:
    """'0.05,0.1' → [0.05, 0.1]; every β positive, none repeated."""
    try:
        betas = [float(part) for part in spec.split(",")]
    except ValueError:
        raise UserError(f"--betas: expected comma-separated numbers like 0.05,0.1,0.3,1, got '{spec}'") from None
    if any(not (math.isfinite(b) and b > 0) for b in betas):
        raise UserError(f"--betas: every β must be a positive number, got '{spec}'")
    if len(set(betas)) != len(betas):
        raise UserError(f"--betas: a β is repeated in '{spec}'")
    return betas


def kl_best_of_n(n: int) -> float:
    """Analytic KL of best-of-n sampling from the model it samples: log n − (n − 1)/n (n = 1 → 0; 4 → 0.636)."""
    return math.log(n) - (n - 1) / n


def best_of_n(rewards: list[list[float]], n: int, by: list[list[float]] | None = None) -> tuple[float, float | None]:
    """rewards[i]: k samples' rewards for prompt i (k a multiple of n) → (mean, SE over prompts) of the best of n.
    Each prompt's k samples form k/n disjoint groups; the prompt's value is the mean of the groups' best, which
    uses every sample (less variance than the first n alone). e.g. [[1, 3, 2, 0]], n = 2 → (3 + 2)/2 = 2.5.
    `by`: the scores that pick the best of a group (a learned reward model's), in place of `rewards` themselves;
    e.g. by [[0, 1, 5, 0]] → (3 + 2)/2 still, by [[1, 0, 0, 5]] → (1 + 0)/2 = 0.5."""
    per_prompt = []
    for i, row in enumerate(rewards):
        if len(row) % n:
            raise ValueError(f"{len(row)} samples per prompt is not a multiple of n = {n}")
        pick = row if by is None else by[i]
        groups = [row[max(range(k, k + n), key=pick.__getitem__)] for k in range(0, len(row), n)]
        per_prompt.append(math.fsum(groups) / len(groups))
    return mean_se(per_prompt)


def sample_rewards(model, tokenizer, prompts: list[str], k: int, sizes: pipeline.Sizes, reward=None):
    """k SFT samples per prompt → ([len(prompts)][k] ground-truth rewards, the same shape of `reward`'s scores, or
    None without a `reward`: a learned reward model that picks the best instead of the ground truth)."""
    repeated = [p for p in prompts for _ in range(k)]
    samples = sft.sample(
        model, tokenizer, repeated, max_new_tokens=sizes.max_new_tokens, seed=sizes.seed + 4, desc="best-of-N"
    )
    texts = [s.text for s in samples]
    rows = lambda scores: [scores[i * k : (i + 1) * k] for i in range(len(prompts))]  # noqa: E731
    true = rows(sentiment.score([p + t for p, t in zip(repeated, texts)]))
    return true, None if reward is None else rows(reward(repeated, texts))


def evaluate_runs(runs: dict[float, Path], sft_folder: Path, prompts: Path, sizes: pipeline.Sizes) -> dict:
    """Each DPO model vs the SFT model on the held-out prompts → {β: eval result}; writes <run>/eval.json."""
    from preftune.evaluation.evaluate import EvalOptions, evaluate_models, load_inputs
    from preftune.files import write_json
    from preftune.loading import load_causal_lm, load_tokenizer

    options = EvalOptions(
        ref=str(sft_folder),
        prompts=str(prompts),
        reward=REWARD,
        batch_size=64,
        max_new_tokens=sizes.max_new_tokens,
        seed=sizes.seed + 3,
        device="cpu",
    )
    tokenizer = load_tokenizer(str(sft_folder))
    inputs = load_inputs(options, tokenizer)
    reference = load_causal_lm(str(sft_folder), what="--ref")
    results = {}
    for beta, run in runs.items():
        options.model = str(run / FINAL)
        results[beta] = evaluate_models(inputs, load_causal_lm(options.model), reference, tokenizer, options)
        write_json(run / EVAL, results[beta])
    return results


def run_frontier(
    output: str | Path,
    quick: bool = False,
    betas: list[float] | tuple[float, ...] = DEFAULT_BETAS,
    sizes: pipeline.Sizes | None = None,
    best_of: tuple[int, ...] = BEST_OF,
) -> dict:
    """Stages 1–3, the reward model, offline DPO per β, the on-policy methods, best-of-N → the points, also in
    frontier.json: {"sft": {"reward", "reward_se"}, "reward_model": reward_stage's numbers, "dpo": [{"beta", "kl",
    "kl_se", "reward", "reward_se", "run", "cost"}], "online": [{"name", "folder", "rounds": [point per round],
    "cost"}], "best_of_n", "best_of_n_rm": [{"n", "kl", "reward", "reward_se", "cost"}], "prompts", "png", "stages"}.
    A cost is {"seconds", "peak_rss_mb", "samples"}: wall time and peak memory of reaching the point, responses
    sampled for it (the offline pairs' 2 per training prompt; k per prompt per round; N per held-out prompt)."""
    out = Path(output)
    pipeline._check_output(out)
    sizes = sizes or (pipeline.QUICK if quick else pipeline.DEFAULT)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict] = {}
    with sft.one_cpu_thread():
        _, texts = pipeline.make_corpus(out, sizes, stages)
        sft_folder, model, tokenizer = pipeline.make_sft(out, texts, sizes, stages)
        paths = pipeline.make_pairs(out, model, tokenizer, sizes, stages)
        rm = learn_reward(out, sft_folder, paths, model, tokenizer, sizes, stages)
        dpo = offline_dpo(out, sft_folder, paths, sizes, stages, betas)
        online_points = on_policy(out, sft_folder, paths, rm["folder"], sizes, stages)
        prompts = [json.loads(line)["prompt"] for line in paths["prompts"].read_text(encoding="utf-8").splitlines()]
        bon, bon_rm = best_of_n_points(model, tokenizer, prompts, rm["folder"], sizes, best_of, stages)
    points = {
        "sft": dpo.pop("sft"),
        "reward_model": rm,
        "dpo": dpo["points"],
        "online": online_points,
        "best_of_n": bon,
        "best_of_n_rm": bon_rm,
        "kl_of_best_of_n": "analytic log N − (N − 1)/N (an upper bound), not measured",
        "prompts": len(prompts),
    }
    png = plot(points, out / "frontier.png")
    for line in point_lines(points):
        log.info("frontier: %s", line)
    points.update(png=str(png), stages=stages)
    (out / "frontier.json").write_text(json.dumps(points, indent=1) + "\n", encoding="utf-8")
    log.info("frontier: wrote %s and %s", png, out / "frontier.json")
    return points


def learn_reward(out: Path, sft_folder: Path, paths: dict, model, tokenizer, sizes: pipeline.Sizes, stages) -> dict:
    """`preftune reward-model` on the training pairs, its accuracy beside the labels' ceiling, its agreement."""
    start, cost = pipeline._clock(), {}
    with measured(cost):
        rm = reward_stage.reward_model_stage(out, sft_folder, paths, model, tokenizer, sizes)
    agree, ceiling = rm["agreement"], rm["ceiling"]
    pipeline._stage(
        stages,
        "reward model",
        start,
        f"held-out accuracy {rm['accuracy']:.3f} (the true reward's on the same labels: {ceiling['accuracy']:.3f}); "
        f"orders {agree['share']:.2f} [{agree['low']:.2f}, {agree['high']:.2f}] of {agree['pairs']} fresh "
        f"sample pairs as the true reward does → {rm['folder']}",
    )
    return {**rm, "cost": cost}


def offline_dpo(out: Path, sft_folder: Path, paths: dict, sizes: pipeline.Sizes, stages: dict, betas) -> dict:
    """One DPO run per β (each measured), then their evaluation → {"points", "sft"}."""
    runs, costs = {}, {}
    for beta in betas:
        with measured(costs.setdefault(beta, {})):
            runs[beta] = pipeline.run_dpo(out, sft_folder, paths, sizes, stages, beta=beta, name=f"dpo-beta{beta:g}")
    start = pipeline._clock()
    results = evaluate_runs(runs, sft_folder, paths["prompts"], sizes)
    samples = 2 * sizes.train_prompts  # the offline pairs' samples (every β trains on the same pairs)
    dpo = [_dpo_point(beta, runs[beta], results[beta], costs[beta], samples) for beta in betas]
    line = f"{len(dpo)} DPO models vs SFT on {results[betas[0]]['generation']['prompts']} held-out prompts"
    pipeline._stage(stages, "eval", start, line)
    reference = results[betas[0]]["generation"]["reward"]
    return {"points": dpo, "sft": {"reward": reference["reference"], "reward_se": reference["reference_se"]}}


def on_policy(out: Path, sft_folder: Path, paths: dict, reward_model: str, sizes: pipeline.Sizes, stages) -> list:
    """Each of `online.methods`, its rounds as points (`online.run_method`)."""
    prompts = online.iterate_prompts(out, paths["train_pairs"], sizes.iterate_prompts)
    n = len(prompts.read_text(encoding="utf-8").splitlines())
    results = []
    for name, method in online.methods(reward_model).items():
        start = pipeline._clock()
        opts = online.options(sft_folder, prompts, paths["prompts"], method, out, sizes)
        results.append(online.run_method(name, opts, n))
        last = results[-1]["rounds"][-1]
        line = f"{name}: {last['round']} rounds, reward {last['reward']:+.3f}, KL {last['kl']:.3f} → {opts.output}"
        pipeline._stage(stages, name, start, line)
    return results


def best_of_n_points(model, tokenizer, prompts: list[str], reward_model: str, sizes, best_of, stages):
    """Best-of-N from the SFT model, the best picked by the ground truth and by the learned reward model."""
    from preftune.evaluation.rewards import load_reward

    start, cost = pipeline._clock(), {}
    with measured(cost):
        rewards, scores = sample_rewards(model, tokenizer, prompts, max(best_of), sizes, load_reward(reward_model))
    per_sample = cost["wall_s"] / (len(prompts) * max(best_of))  # sampling and scoring, per response
    points = [
        [_bon_point(n, rewards, by, per_sample * n * len(prompts), cost["peak_rss_mb"], len(prompts)) for n in best_of]
        for by in (None, scores)
    ]
    pipeline._stage(
        stages,
        "best-of-N",
        start,
        f"{max(best_of)} SFT samples for each of {len(prompts)} "
        f"held-out prompts, best of N = {', '.join(map(str, best_of))}",
    )
    return points


def _dpo_point(beta: float, run: Path, result: dict, cost: dict, samples: int) -> dict:
    gen = result["generation"]
    return {
        "beta": beta,
        "kl": gen["kl"],
        "kl_se": gen["kl_se"],
        "reward": gen["reward"]["policy"],
        "reward_se": gen["reward"]["policy_se"],
        "run": str(run),
        "cost": {"seconds": cost["wall_s"], "peak_rss_mb": cost["peak_rss_mb"], "samples": samples},
    }


def _bon_point(n: int, rewards, by, seconds: float, peak: int, prompts: int) -> dict:
    reward, se = best_of_n(rewards, n, by)
    cost = {"seconds": round(seconds, 1), "peak_rss_mb": peak, "samples": n * prompts}
    return {"n": n, "kl": kl_best_of_n(n), "reward": reward, "reward_se": se, "cost": cost}
