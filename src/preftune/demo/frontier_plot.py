"""The frontier's figure and its log lines, from the points alone (frontier.json's content)."""

from __future__ import annotations

from pathlib import Path

ONLINE_STYLE = {  # the on-policy methods' markers, in demo/online.methods' order
    "iterative DPO (judge)": ("D-", "tab:green"),
    "iterative DPO (reward model)": ("v-", "tab:olive"),
    "RLOO (reward model)": ("^-", "tab:red"),
}


def plot(points: dict, path: Path) -> Path:
    """Reward vs KL: offline DPO by β, each on-policy method by round, best-of-N by N (the ground truth or the
    reward model picking the best), the SFT model at KL 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10.0, 5.0), dpi=110)
    for key, style, label in (
        ("best_of_n", "s--", "best-of-N, picked by the true reward (KL: log N − (N−1)/N)"),
        ("best_of_n_rm", "s:", "best-of-N, picked by the reward model"),
    ):
        bon = points.get(key) or []
        ax.plot([p["kl"] for p in bon], [p["reward"] for p in bon], style, color="tab:orange", label=label, alpha=0.8)
        for p in bon if key == "best_of_n" else []:
            ax.annotate(f"N={p['n']}", (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    _errorbars(ax, [p for p in points["dpo"] if p["kl"] is not None], "o", "tab:blue", "offline DPO (± SE)")
    for p in points["dpo"]:
        if p["kl"] is not None:
            ax.annotate(
                f"β={p['beta']:g}", (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    for method in points.get("online", []):
        marker, color = ONLINE_STYLE.get(method["name"], ("x-", "tab:gray"))
        rounds = [p for p in method["rounds"] if p["kl"] is not None]
        _errorbars(ax, rounds, marker, color, f"{method['name']}, rounds 1–{len(rounds)}")
        for p in rounds:
            ax.annotate(str(p["round"]), (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot([0], [points["sft"]["reward"]], "k*", markersize=10, label="SFT")
    ax.set_xlabel("KL(π ‖ π_SFT), nats per sequence")
    ax.set_ylabel("mean ground-truth reward (held-out prompts)")
    ax.set_title("reward vs KL: offline DPO, on-policy rounds, RLOO, best-of-N")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plane: no point hidden
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _errorbars(ax, pts: list[dict], fmt: str, color: str, label: str) -> None:
    ax.errorbar(
        [p["kl"] for p in pts],
        [p["reward"] for p in pts],
        xerr=[p["kl_se"] or 0 for p in pts],
        yerr=[p["reward_se"] or 0 for p in pts],
        fmt=fmt,
        color=color,
        label=label,
        capsize=2,
    )


def _pm(value: float | None, se: float | None, sign: str = "+") -> str:
    if value is None:
        return "not finite"
    return f"{value:{sign}.3f}" + ("" if se is None else f" ± {se:.3f}")


def _cost(c: dict | None) -> str:
    if not c:
        return ""
    return f" | {c['seconds']:.0f} s, {c['peak_rss_mb']} MB peak, {c['samples']} samples"


def point_lines(points: dict) -> list[str]:
    """One line per point: KL ± SE, reward ± SE, and what reaching it cost."""
    sft = points["sft"]
    lines = [f"SFT                 KL 0.000            reward {_pm(sft['reward'], sft['reward_se'])}"]
    for p in points["dpo"]:
        lines.append(
            f"offline DPO β={p['beta']:<5g} KL {_pm(p['kl'], p['kl_se'], ''):<16} reward "
            f"{_pm(p['reward'], p['reward_se'])}{_cost(p.get('cost'))}"
        )
    for method in points.get("online", []):
        for p in method["rounds"]:
            lines.append(
                f"{method['name']} round {p['round']}: KL {_pm(p['kl'], p['kl_se'], '')} reward "
                f"{_pm(p['reward'], p['reward_se'])}{_cost(p)}"
            )
    for key, how in (("best_of_n", "true reward"), ("best_of_n_rm", "reward model")):
        for p in points.get(key) or []:
            lines.append(
                f"best-of-{p['n']:<3} ({how}) KL {p['kl']:.3f} (analytic) reward "
                f"{_pm(p['reward'], p['reward_se'])}{_cost(p.get('cost'))}"
            )
    return lines
