"""`preftune frontier`: reward vs KL of DPO at several β and of best-of-N sampling, as in Figure 2 of the DPO paper.

    1–3        the demo's corpus, SFT model and pairs (module pipeline)
    dpo β=…    one DPO run per β through the normal training path, all sharing out/ref-cache: the first run
               computes the reference log-probs, the others log "reference log-probs: reused"
    eval       each DPO model vs the SFT model on the held-out prompts with the eval path's functions
               (`load_inputs` once, `evaluate_models` per β): sampled KL(π‖π_SFT) ± SE and mean reward ± SE
    best-of-N  64 SFT samples per held-out prompt, scored by the ground-truth reward; for N = 2, 4, … 64 the
               reward is the mean best of N, and the KL the analytic log N − (N − 1)/N
    plot       frontier.png (reward vs KL) and frontier.json

The KL of best-of-N is not measured: log N − (N − 1)/N is the usual analytic value (Stiennon et al. 2020, Beirami et
al. 2024 show it is an upper bound on the true KL), so best-of-N points may sit somewhat right of where they belong.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from preftune.demo import pipeline, sentiment, sft
from preftune.demo.command import REWARD
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


def best_of_n(rewards: list[list[float]], n: int) -> tuple[float, float | None]:
    """rewards[i]: k samples' rewards for prompt i (k a multiple of n) → (mean, SE over prompts) of the best of n.
    Each prompt's k samples form k/n disjoint groups; the prompt's value is the mean of the groups' maxima, which
    uses every sample (less variance than the first n alone). e.g. [[1, 3, 2, 0]], n = 2 → (3 + 2)/2 = 2.5."""
    per_prompt = []
    for row in rewards:
        if len(row) % n:
            raise ValueError(f"{len(row)} samples per prompt is not a multiple of n = {n}")
        groups = [max(row[k : k + n]) for k in range(0, len(row), n)]
        per_prompt.append(math.fsum(groups) / len(groups))
    return mean_se(per_prompt)


def sample_rewards(model, tokenizer, prompts: list[str], k: int, sizes: pipeline.Sizes) -> list[list[float]]:
    """k SFT samples per prompt, each scored by the ground-truth reward → [len(prompts)][k] rewards."""
    repeated = [p for p in prompts for _ in range(k)]
    samples = sft.sample(
        model, tokenizer, repeated, max_new_tokens=sizes.max_new_tokens, seed=sizes.seed + 4, desc="best-of-N"
    )
    scores = sentiment.score([p + s.text for p, s in zip(repeated, samples)])
    return [scores[i * k : (i + 1) * k] for i in range(len(prompts))]


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


def plot(points: dict, path: Path) -> Path:
    """Reward vs KL: DPO points labelled by β, the best-of-N curve labelled by N, the SFT model at KL 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    bon = points["best_of_n"]
    ax.plot(
        [p["kl"] for p in bon],
        [p["reward"] for p in bon],
        "s--",
        color="tab:orange",
        label="best-of-N from SFT (KL: log N − (N−1)/N)",
    )
    for p in bon:
        ax.annotate(f"N={p['n']}", (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    dpo = [p for p in points["dpo"] if p["kl"] is not None]
    ax.errorbar(
        [p["kl"] for p in dpo],
        [p["reward"] for p in dpo],
        xerr=[p["kl_se"] for p in dpo],
        yerr=[p["reward_se"] for p in dpo],
        fmt="o",
        color="tab:blue",
        label="DPO (± SE)",
    )
    for p in dpo:
        ax.annotate(f"β={p['beta']:g}", (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([0], [points["sft"]["reward"]], "k*", markersize=10, label="SFT")
    ax.set_xlabel("KL(π ‖ π_SFT), nats per sequence")
    ax.set_ylabel("mean ground-truth reward")
    ax.set_title("reward vs KL frontier (held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_frontier(
    output: str | Path,
    quick: bool = False,
    betas: list[float] | tuple[float, ...] = DEFAULT_BETAS,
    sizes: pipeline.Sizes | None = None,
    best_of: tuple[int, ...] = BEST_OF,
) -> dict:
    """Stages 1–3, one DPO run per β, their evaluation and best-of-N → the points, also in frontier.json:
    {"sft": {"reward", "reward_se"}, "dpo": [{"beta", "kl", "kl_se", "reward", "reward_se", "run"}],
    "best_of_n": [{"n", "kl", "reward", "reward_se"}], "kl_of_best_of_n", "prompts", "png", "stages"}."""
    out = Path(output)
    pipeline._check_output(out)
    sizes = sizes or (pipeline.QUICK if quick else pipeline.DEFAULT)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict] = {}
    with sft.one_cpu_thread():
        _, texts = pipeline.make_corpus(out, sizes, stages)
        sft_folder, model, tokenizer = pipeline.make_sft(out, texts, sizes, stages)
        paths = pipeline.make_pairs(out, model, tokenizer, sizes, stages)
        runs = {
            beta: pipeline.run_dpo(out, sft_folder, paths, sizes, stages, beta=beta, name=f"dpo-beta{beta:g}")
            for beta in betas
        }
        start = pipeline._clock()
        results = evaluate_runs(runs, sft_folder, paths["prompts"], sizes)
        dpo = [_dpo_point(beta, runs[beta], results[beta]) for beta in betas]
        pipeline._stage(
            stages,
            "eval",
            start,
            f"{len(dpo)} DPO models vs SFT on {results[betas[0]]['generation']['prompts']} held-out prompts",
        )
        start = pipeline._clock()
        prompts = [json.loads(line)["prompt"] for line in paths["prompts"].read_text(encoding="utf-8").splitlines()]
        rewards = sample_rewards(model, tokenizer, prompts, max(best_of), sizes)
        bon = [_bon_point(n, rewards) for n in best_of]
        pipeline._stage(
            stages,
            "best-of-N",
            start,
            f"{max(best_of)} SFT samples for each of {len(prompts)} "
            f"held-out prompts, best of N = {', '.join(map(str, best_of))}",
        )
    reference = results[betas[0]]["generation"]["reward"]
    points = {
        "sft": {"reward": reference["reference"], "reward_se": reference["reference_se"]},
        "dpo": dpo,
        "best_of_n": bon,
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


def _dpo_point(beta: float, run: Path, result: dict) -> dict:
    gen = result["generation"]
    return {
        "beta": beta,
        "kl": gen["kl"],
        "kl_se": gen["kl_se"],
        "reward": gen["reward"]["policy"],
        "reward_se": gen["reward"]["policy_se"],
        "run": str(run),
    }


def _bon_point(n: int, rewards: list[list[float]]) -> dict:
    reward, se = best_of_n(rewards, n)
    return {"n": n, "kl": kl_best_of_n(n), "reward": reward, "reward_se": se}


def point_lines(points: dict) -> list[str]:
    """One line per point of the frontier."""
    sft_point = points["sft"]
    lines = [f"SFT          KL 0.000            reward {sft_point['reward']:+.3f} ± {sft_point['reward_se']:.3f}"]
    for p in points["dpo"]:
        kl = "not finite" if p["kl"] is None else f"{p['kl']:.3f} ± {p['kl_se']:.3f}"
        lines.append(f"DPO β={p['beta']:<6g} KL {kl:<16} reward {p['reward']:+.3f} ± {p['reward_se']:.3f}")
    for p in points["best_of_n"]:
        lines.append(
            f"best-of-{p['n']:<4} KL {p['kl']:.3f} (analytic) reward {p['reward']:+.3f} ± {p['reward_se']:.3f}"
        )
    return lines
