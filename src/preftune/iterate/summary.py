"""`preftune iterate`'s summary: one record and one log line per round, and the plot over the rounds."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from preftune.files import write_file_atomically

# ---------------------------------------------------------------------------------------------------- summary


def gpu_peak() -> dict:
    """The GPU's peak allocated memory so far, where a GPU was used."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 1e6)}
    return {}


def round_summary(r: int, sampled: dict, trained: dict, result: dict, cost: dict) -> dict:
    """round.json: the round's numbers; `cost` is `cost.measured`'s (wall time and peak memory of the round)."""
    gen = result["generation"]
    reward, wins = gen["reward"], gen["win_rate"]
    pairs = trained["pairs"]
    seconds = {
        "sample": sampled["seconds"],
        "pairs": pairs["seconds"] if pairs else None,
        "train": trained["seconds"],
        "eval": result.get("seconds"),
    }
    return {
        "round": r,
        "policy": trained["final"],
        "samples": sampled["samples"],
        "sample_reward": sampled["reward"],
        "sample_reward_se": sampled["reward_se"],
        "pairs": pairs,
        "reward": reward["policy"],
        "reward_se": reward["policy_se"],
        "start_reward": reward["reference"],
        "start_reward_se": reward["reference_se"],
        "kl": gen["kl"],
        "kl_se": gen["kl_se"],
        "win_rate": wins["win_rate"],
        "win_rate_ci": [wins["ci_low"], wins["ci_high"]],
        "seconds": {**seconds, "total": round(sum(v for v in seconds.values() if v is not None), 3)},
        "wall_s": cost["wall_s"],
        "peak_rss_mb": cost["peak_rss_mb"],
        "peak_since_start": cost["peak_since_start"],
        **gpu_peak(),
    }


def signed(value: float | None, se: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" + (f" ± {se:.3f}" if se is not None else "")


def round_line(s: dict) -> str:
    """'round 2: reward +1.250 ± 0.310 (start +0.500 ± 0.200), KL 0.412 ± 0.090, win rate 0.69 [0.46, 0.85], ...'"""
    pairs = s["pairs"]
    made = f", {pairs['pairs']} pairs ({pairs['ties'] + pairs['near_ties']} ties skipped)" if pairs else ""
    kl = "not finite" if s["kl"] is None else signed(s["kl"], s["kl_se"]).lstrip("+")
    low, high = s["win_rate_ci"]
    wins = "n/a" if s["win_rate"] is None else f"{s['win_rate']:.2f} [{low:.2f}, {high:.2f}]"
    return (
        f"round {s['round']}: reward {signed(s['reward'], s['reward_se'])} (start "
        f"{signed(s['start_reward'], s['start_reward_se'])}), KL {kl}, win rate {wins}{made}, "
        f"{s['seconds']['total']:.1f} s"
    )


def plot(summary: dict, path: Path) -> Path:
    """Reward ± SE and KL(π_r‖π_0) ± SE per round, the starting model as round 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = summary["rounds"]
    xs = [0] + [s["round"] for s in rounds]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    rewards = [summary["start"]["reward"]] + [s["reward"] for s in rounds]
    errors = [summary["start"]["reward_se"]] + [s["reward_se"] for s in rounds]
    left.errorbar(xs, rewards, yerr=[e or 0 for e in errors], fmt="o-", color="tab:blue", capsize=3)
    left.set(xlabel="round (0: starting model)", ylabel="mean reward on --eval-prompts", title="reward ± SE")
    kls = [(s["round"], s["kl"], s["kl_se"] or 0) for s in rounds if s["kl"] is not None]
    right.errorbar(
        [0] + [x for x, _, _ in kls],
        [0] + [k for _, k, _ in kls],
        yerr=[0] + [e for *_, e in kls],
        fmt="s-",
        color="tab:orange",
        capsize=3,
    )
    right.set(xlabel="round", ylabel="KL(π_r ‖ π_0), nats per sequence", title="KL to the starting model ± SE")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.set_xticks(xs)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    write_file_atomically(path, image.getvalue())
    return path
