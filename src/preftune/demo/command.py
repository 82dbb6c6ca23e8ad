"""`preftune demo`: stages 1–4 of `pipeline` (corpus, SFT, pairs, DPO), then the normal evaluation and report.

    5 eval     `run_eval` (the `preftune eval` path): DPO model vs SFT model on the held-out prompts and pairs,
               rewards by the ground-truth sentiment function                                dpo/eval.json
    6 report   `write_report` on the DPO run: plots, eval results, sample continuations      dpo/report.html

The last line compares the SFT and DPO models: mean reward of each with the difference and its 95% interval, the
sampled KL(DPO ‖ SFT) ± SE and the paired win rate.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from preftune.demo import pipeline, sft
from preftune.evaluation.stats import Z95
from preftune.rundir import EVAL, FINAL

log = logging.getLogger("preftune")
REWARD = "preftune.demo.sentiment:score"


def eval_options(result: dict, sizes: pipeline.Sizes, json_path: Path | None):
    """The `preftune eval` options of the demo: policy = DPO model, reference = SFT model, fresh held-out prompts.
    Sampling settings are the ones the pairs were sampled with (temperature 1, no top-p, same length cap)."""
    from preftune.evaluation.evaluate import EvalOptions

    return EvalOptions(
        model=str(result["run"] / FINAL),
        ref=str(result["sft"]),
        prompts=str(result["prompts"]),
        reward=REWARD,
        data=str(result["heldout_pairs"]),
        beta=0.1,
        batch_size=64,
        max_new_tokens=sizes.max_new_tokens,
        seed=sizes.seed + 3,
        device="cpu",
        json=None if json_path is None else str(json_path),
    )


def reward_difference(reward: dict) -> dict:
    """Policy − reference mean reward with a 95% interval, from eval.json's {"policy", "reference", "policy_se",
    "reference_se"}: Welch's (unpaired) standard error √(se_p² + se_r²) and the normal quantile 1.96 (n is in the
    hundreds, where Welch's t quantile is 1.96 to two decimals). The samples of both models share their prompts,
    but eval.json keeps no per-prompt scores; ignoring the pairing only widens the interval when prompt effects
    correlate. e.g. 0.3 ± 0.03 vs 0.1 ± 0.04 → 0.2, se 0.05, [0.0980, 0.3020]."""
    diff = reward["policy"] - reward["reference"]
    se = math.sqrt(reward["policy_se"] ** 2 + reward["reference_se"] ** 2)
    return {
        "difference": diff,
        "se": se,
        "ci_low": diff - Z95 * se,
        "ci_high": diff + Z95 * se,
        "interval": "Welch 95% (unpaired), normal quantile",
    }


def summary_line(generation: dict, difference: dict, report: Path) -> str:
    reward, wins = generation["reward"], generation["win_rate"]
    kl = (
        "KL(DPO‖SFT) not finite"
        if generation["kl"] is None
        else f"KL(DPO‖SFT) {generation['kl']:.2f} ± {generation['kl_se']:.2f} nats (SE)"
    )
    return (
        f"reward SFT {reward['reference']:+.3f} → DPO {reward['policy']:+.3f}: {difference['difference']:+.3f} "
        f"(95% CI {difference['ci_low']:+.3f} … {difference['ci_high']:+.3f}, Welch); {kl}; win rate "
        f"{wins['win_rate']:.2f} (95% CI {wins['ci_low']:.2f} … {wins['ci_high']:.2f}, Wilson) on "
        f"{wins['prompts']} held-out prompts; report: {report}"
    )


def run_demo(
    output: str | Path, quick: bool = False, sizes: pipeline.Sizes | None = None, *, risks: bool = False
) -> dict:
    """Every stage into `output` (a new or empty folder) → {"eval": eval.json's content plus "reward_difference",
    "report": report.html, "summary": the last line, and run_stages' paths}. `sizes` overrides QUICK/DEFAULT.

    risks: the risk stage (module `risks`) instead of the normal demo. Instead, not after: its corpus has words
    the normal one lacks ("!", the refusal), so it needs its own SFT model and pairs, and running both would
    double the time while the normal demo's files stay exactly what they were."""
    if risks:
        from preftune.demo.risks import run_risks

        return run_risks(output, quick=quick, sizes=sizes)
    from preftune.evaluation.evaluate import run_eval
    from preftune.files import write_json
    from preftune.report import write_report

    sizes = sizes or (pipeline.QUICK if quick else pipeline.DEFAULT)
    result = pipeline.run_stages(output, sizes=sizes)
    out, stages = Path(output), result["stages"]
    start = pipeline._clock()
    eval_json = result["run"] / EVAL
    with sft.one_cpu_thread():
        evaluation = run_eval(eval_options(result, sizes, json_path=None))
    generation = evaluation["generation"]
    evaluation["reward_difference"] = reward_difference(generation["reward"])
    write_json(eval_json, evaluation)
    difference = evaluation["reward_difference"]
    pipeline._stage(
        stages,
        "eval",
        start,
        f"{generation['prompts']} held-out prompts sampled from SFT and DPO: "
        f"reward {difference['difference']:+.3f} (95% CI {difference['ci_low']:+.3f} … "
        f"{difference['ci_high']:+.3f}); held-out pair accuracy "
        f"{evaluation['pairs']['rewards/accuracies']:.2f} → {eval_json}",
        reward_difference=difference,
    )
    start = pipeline._clock()
    report = write_report(result["run"])
    pipeline._stage(
        stages, "report", start, f"plots, eval results and sample continuations (after = DPO, before = SFT) → {report}"
    )
    (out / "stages.json").write_text(json.dumps(stages, indent=1) + "\n", encoding="utf-8")
    line = summary_line(generation, difference, report)
    log.info("demo: %s", line)
    return {**result, "eval": evaluation, "report": report, "summary": line}
