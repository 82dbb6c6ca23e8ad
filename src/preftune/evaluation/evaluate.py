"""The evaluation itself, shared by `preftune eval` (command.py, the CLI layer), training (observe.py) and the
demo: options, inputs, measurements, the flat metrics training logs, and the whole path with eval.json.

    run_eval(options)                        load everything named in `options`, evaluate, write --json → dict
    load_inputs(options, tokenizer)          the files, reward and detector only (training loads them once)
    evaluate_models(inputs, policy, reference, tokenizer, options)   the measurements → dict (eval.json's content)
    flat_metrics(result)                     that dict as flat metrics ("kl", "reward/policy", ...) for
                                             metrics.jsonl, where training prefixes them with "eval/"

From training, every N steps (the models stay in memory and keep their train/eval state; sampling forks the RNG):

    options = EvalOptions(prompts="prompts.jsonl", reward="pkg.rewards:score", max_new_tokens=64)
    inputs = load_inputs(options, tokenizer)                                   # once, before the loop
    result = evaluate_models(inputs, policy, reference_model, tokenizer, options)   # at an eval step
    record.update({"eval/" + k: v for k, v in flat_metrics(result).items()})

Pair metrics alone also take cached reference log-probs: `pairs.pair_eval(policy, cached_reference, pairs, ...)`.
Nothing here imports training or the CLI: they import this.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune import __version__
from preftune.data.formats import load_pairs, parse_columns
from preftune.data.tokenize import TokenizedPair, tokenize_pairs
from preftune.device import resolve_device
from preftune.errors import UserError
from preftune.evaluation.distance import distance_eval, load_train_prompts
from preftune.evaluation.pairs import pair_logps, summarize_pairs
from preftune.evaluation.refusal import Detector, load_detector, refusal_rates
from preftune.evaluation.rewards import Reward, load_reward
from preftune.evaluation.sampling import (
    GenerationSettings,
    Prompt,
    encode_prompts,
    generate,
    load_prompts,
    pad_id_of,
    prompt_text,
    sampled_logps,
)
from preftune.evaluation.stats import distinct_n, kl_estimate, mean_se, win_rate
from preftune.files import write_json
from preftune.loading import causal_lm_config, load_causal_lm, load_tokenizer

log = logging.getLogger("preftune")
MAX_SAMPLES = 5  # sample continuations kept in eval.json for reports


def _opt(default: Any, help: str, metavar: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass
class EvalOptions:
    model: str | None = _opt(None, "Policy model folder (e.g. runs/dpo1/final).", "FOLDER")
    ref: str | None = _opt(None, "Reference model folder (e.g. the SFT model the policy started from).", "FOLDER")
    data: str | None = _opt(None, "Held-out preference pairs: pair metrics (accuracy, ties, margins, rewards).", "FILE")
    prompts: str | None = _opt(
        None,
        "Prompts to sample from policy and reference: rows with a 'prompt' field "
        "(text or messages); a pairs file works. KL, lengths, distinct-n, rewards.",
        "FILE",
    )
    reward: str | None = _opt(
        None,
        "Score samples of --prompts: a sequence-classification model folder or a Python "
        "function module:function (texts → scores); win rate and mean rewards.",
        "SPEC",
    )
    refusal_prompts: str | None = _opt(
        None, "Rows with 'prompt' and 'label' (safe or unsafe): over-refusal and unsafe-compliance rates.", "FILE"
    )
    refusal_detector: str | None = _opt(
        None, "Replace the default refusal detector: module:function (response text → True when it refuses).", "SPEC"
    )
    train_data: str | None = _opt(
        None,
        "The training pairs or prompts (any format `preftune train` reads; only prompts are used): --data and "
        "--prompts metrics by each prompt's distance from them, near to far.",
        "FILE",
    )
    beta: float = _opt(0.1, "β of the implicit rewards β·(log π − log π_ref).")
    max_length: int | None = _opt(1024, "Pairs: longest prompt + response in tokens (longer pairs are cut, counted).")
    max_prompt_length: int | None = _opt(
        None, "Longest prompt in tokens (pairs and sampling); longer prompts lose their beginning, counted."
    )
    columns: str | None = _opt(
        None, "Column mapping of --data, e.g. prompt=question,chosen=response_j,rejected=response_k.", "MAPPING"
    )
    length_edges: str | None = _opt(
        None,
        "Pair length buckets: comma-separated token counts, e.g. 64,128,256 "
        "(default: quartiles of chosen + rejected tokens).",
        "EDGES",
    )
    batch_size: int = _opt(8, "Pairs or prompts per batch.")
    temperature: float = _opt(1.0, "Sampling temperature.")
    top_p: float = _opt(1.0, "Nucleus sampling: smallest set of tokens with this much probability (1: all).")
    max_new_tokens: int = _opt(64, "Longest sampled response in tokens.")
    seed: int = _opt(0, "Sampling seed.")
    num_prompts: int | None = _opt(None, "Use the first N prompts of --prompts (default: all).", "N")
    json: str | None = _opt(None, "Also write the results as JSON to this file (e.g. eval.json).", "OUT")
    device: str = _opt("auto", "cpu, cuda, cuda:N, or auto (cuda when available).")
    trust_remote_code: bool = _opt(False, "Allow model code shipped with a model folder to run.")

    @property
    def settings(self) -> GenerationSettings:
        return GenerationSettings(
            temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens, seed=self.seed
        )


@dataclass
class EvalInputs:
    """What `load_inputs` read: each part None when its flag was not given."""

    pairs: list[TokenizedPair] | None = None
    pairs_info: dict = field(default_factory=dict)
    prompts: list[Prompt] | None = None
    prompt_ids: list[list[int]] | None = None
    prompts_info: dict = field(default_factory=dict)
    refusal: list[Prompt] | None = None
    refusal_ids: list[list[int]] | None = None
    refusal_info: dict = field(default_factory=dict)
    train_prompt_ids: list[list[int]] | None = None  # distinct prompts of --train-data
    train_info: dict = field(default_factory=dict)
    reward: Reward | None = None
    detector: Detector | None = None
    detector_name: str | None = None


# ------------------------------------------------------------------------------------------------ checks


def parse_edges(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        edges = [int(part) for part in spec.split(",")]
    except ValueError:
        raise UserError(
            f"--length-edges: expected comma-separated token counts like 64,128,256, got '{spec}'"
        ) from None
    if any(e < 1 for e in edges) or edges != sorted(set(edges)):
        raise UserError(f"--length-edges: token counts must be positive and increasing, got '{spec}'")
    return edges


def check_options(options: EvalOptions) -> None:
    """Every mistake in the options but a missing --model or --ref (training passes models instead)."""
    if not (options.data or options.prompts or options.refusal_prompts):
        raise UserError("eval: nothing to evaluate; give --data, --prompts or --refusal-prompts")
    if options.reward and not options.prompts:
        raise UserError("--reward scores samples of --prompts; give --prompts too")
    if options.refusal_detector and not options.refusal_prompts:
        raise UserError("--refusal-detector needs --refusal-prompts")
    if options.train_data and not (options.data or options.prompts):
        raise UserError("--train-data buckets the pairs of --data and the prompts of --prompts; give one of them")
    if options.length_edges is not None and not options.data:
        raise UserError("--length-edges buckets the pairs of --data; give --data too")
    if options.columns is not None and not options.data:
        raise UserError("--columns maps the columns of --data; give --data too")
    if not options.beta > 0:
        raise UserError(f"--beta must be greater than 0, got {options.beta}")
    if options.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.max_length is not None and options.max_length < 2:
        raise UserError(
            f"--max-length must be at least 2 (one prompt and one response token), got {options.max_length}"
        )
    if options.max_prompt_length is not None and options.max_prompt_length < 1:
        raise UserError(f"--max-prompt-length must be at least 1, got {options.max_prompt_length}")
    if options.num_prompts is not None and options.num_prompts < 1:
        raise UserError(f"--num-prompts must be at least 1, got {options.num_prompts}")
    options.settings.check()
    parse_edges(options.length_edges)
    if options.json:
        folder = Path(options.json).resolve().parent
        if not folder.is_dir():
            raise UserError(f"--json {options.json}: no folder {folder} to write into")
        if Path(options.json).is_dir():
            raise UserError(f"--json {options.json}: is a folder; give a file name such as eval.json")


# ------------------------------------------------------------------------------------------------ inputs


def _load_eval_pairs(options: EvalOptions, tokenizer) -> tuple[list[TokenizedPair], dict]:
    pairs, report = load_pairs(options.data, columns=parse_columns(options.columns))
    tokenized, trunc = tokenize_pairs(
        pairs, tokenizer, max_length=options.max_length, max_prompt_length=options.max_prompt_length
    )
    if not tokenized:
        raise UserError(f"--data {options.data}: no pairs to evaluate ({report.summary()})")
    return tokenized, {"data": options.data, "load": report.summary(), "tokens": trunc.summary()}


def load_inputs(options: EvalOptions, tokenizer) -> EvalInputs:
    """Check the options, then read and check every input file, the reward and the refusal detector (models are
    not loaded here)."""
    check_options(options)
    inputs = EvalInputs()
    if options.data:
        inputs.pairs, inputs.pairs_info = _load_eval_pairs(options, tokenizer)
        log.info("eval --data %s: %s; %s", options.data, inputs.pairs_info["load"], inputs.pairs_info["tokens"])
    if options.prompts:
        prompts = load_prompts(options.prompts)
        inputs.prompts = prompts[: options.num_prompts] if options.num_prompts else prompts
        inputs.prompt_ids, cut = encode_prompts(inputs.prompts, tokenizer, options.max_prompt_length)
        inputs.prompts_info = {
            "data": options.prompts,
            "prompts": len(inputs.prompts),
            "prompts_in_file": len(prompts),
            "prompts_truncated": cut,
        }
    if options.refusal_prompts:
        inputs.refusal = load_prompts(options.refusal_prompts, flag="--refusal-prompts", labelled=True)
        inputs.refusal_ids, cut = encode_prompts(inputs.refusal, tokenizer, options.max_prompt_length)
        inputs.refusal_info = {
            "data": options.refusal_prompts,
            "prompts": len(inputs.refusal),
            "prompts_truncated": cut,
        }
        inputs.detector, inputs.detector_name = load_detector(options.refusal_detector)
    if options.train_data:
        inputs.train_prompt_ids, inputs.train_info = load_train_prompts(
            options.train_data,
            tokenizer,
            columns=parse_columns(options.columns),
            max_prompt_length=options.max_prompt_length,
        )
    if options.reward:
        inputs.reward = load_reward(
            options.reward,
            trust_remote_code=options.trust_remote_code,
            device=resolve_device(options.device),
            batch_size=options.batch_size,
        )
    return inputs


# ------------------------------------------------------------------------------------------------ measurements


def _both(policy_value, reference_value) -> dict:
    return {"policy": policy_value, "reference": reference_value}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def generation_eval(
    policy,
    reference,
    tokenizer,
    prompts: list[Prompt],
    prompt_ids: list[list[int]],
    settings: GenerationSettings,
    *,
    batch_size: int = 8,
    reward: Reward | None = None,
    per_prompt: dict | None = None,
) -> tuple[dict, list[dict]]:
    """Sample from both models on the prompts → (metrics, up to MAX_SAMPLES sample records). A `per_prompt` dict
    is filled with each prompt's numbers ("policy_logps", "reference_logps", "policy_reward", "reference_reward"),
    which the by-distance buckets summarize.

    KL(π‖π_ref) is estimated on the policy's samples, each scored by both models under the sampling distribution
    (temperature and top-p applied: see `sampling.processed_log_softmax`); the reference's samples serve the
    length, diversity and reward comparisons.
    """
    if not isinstance(reference, torch.nn.Module):
        raise TypeError("sampling needs the reference model itself, not cached log-probs")
    pad_id = pad_id_of(tokenizer)
    log.info("eval: sampling %d prompts from policy and reference", len(prompt_ids))
    ours = generate(policy, tokenizer, prompt_ids, settings, batch_size)
    theirs = generate(reference, tokenizer, prompt_ids, settings, batch_size)
    scores = {
        "policy_logps": sampled_logps(policy, ours, settings, pad_id, batch_size),
        "reference_logps": sampled_logps(reference, ours, settings, pad_id, batch_size),
    }
    kl = kl_estimate(scores["policy_logps"], scores["reference_logps"])
    ours_len, ours_len_se = mean_se(ours.lengths)
    theirs_len, theirs_len_se = mean_se(theirs.lengths)
    metrics: dict[str, Any] = {
        "kl": kl["kl"],
        "kl_se": kl["kl_se"],
        "kl_samples": kl["samples"],
        "kl_infinite": kl["infinite"],
        "kl_of": (
            "the sampling distributions: softmax(logits / temperature) within the top-p nucleus"
            if settings.processed
            else "the models' own distributions"
        ),
        "length": {
            **_both(ours_len, theirs_len),
            "policy_se": ours_len_se,
            "reference_se": theirs_len_se,
            "ratio": _ratio(ours_len, theirs_len),
        },
        "ended": _both(sum(ours.ended) / len(ours.ended), sum(theirs.ended) / len(theirs.ended)),
        "distinct_1": _both(distinct_n(ours.content_ids, 1), distinct_n(theirs.content_ids, 1)),
        "distinct_2": _both(distinct_n(ours.content_ids, 2), distinct_n(theirs.content_ids, 2)),
    }
    texts = [prompt_text(p, tokenizer) for p in prompts]
    records = [{"prompt": t, "policy": a, "reference": b} for t, a, b in zip(texts, ours.texts, theirs.texts)]
    if reward is not None:
        ours_scores, theirs_scores = reward(texts, ours.texts), reward(texts, theirs.texts)
        (ours_mean, ours_se), (theirs_mean, theirs_se) = mean_se(ours_scores), mean_se(theirs_scores)
        metrics["reward"] = {**_both(ours_mean, theirs_mean), "policy_se": ours_se, "reference_se": theirs_se}
        metrics["win_rate"] = {**win_rate(ours_scores, theirs_scores), "interval": "Wilson 95%, ties count half"}
        for record, a, b in zip(records, ours_scores, theirs_scores):
            record.update(policy_reward=a, reference_reward=b)
        scores.update(policy_reward=ours_scores, reference_reward=theirs_scores)
    if per_prompt is not None:
        per_prompt.update(scores)
    return metrics, records[:MAX_SAMPLES]


def refusal_eval(
    policy,
    reference,
    tokenizer,
    prompts: list[Prompt],
    prompt_ids: list[list[int]],
    settings: GenerationSettings,
    detector: Detector,
    *,
    batch_size: int = 8,
) -> dict:
    """Sample from both models on a labelled prompt set and apply the detector → rates per model."""
    labels = [p.label for p in prompts]
    out: dict[str, Any] = {"safe": labels.count("safe"), "unsafe": labels.count("unsafe")}
    for name, model in (("policy", policy), ("reference", reference)):
        samples = generate(model, tokenizer, prompt_ids, settings, batch_size)
        out[name] = refusal_rates(labels, [detector(text) for text in samples.texts])
    return out


def evaluate_models(inputs: EvalInputs, policy, reference, tokenizer, options: EvalOptions) -> dict:
    """Every measurement `inputs` asks for → the result dict (what eval.json holds)."""
    settings = options.settings
    result: dict[str, Any] = {"preftune": __version__, "model": options.model, "reference": options.ref}
    logps, per_prompt = None, {}  # per pair and per prompt, for the by-distance buckets
    if inputs.pairs is not None:
        log.info("eval: pair metrics on %d pairs", len(inputs.pairs))
        logps = pair_logps(policy, reference, inputs.pairs, pad_id=pad_id_of(tokenizer), batch_size=options.batch_size)
        keys = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "lengths")
        metrics = summarize_pairs(
            *(logps[k] for k in keys), beta=options.beta, length_edges=parse_edges(options.length_edges)
        )
        result["pairs"] = {**inputs.pairs_info, **metrics}
    if inputs.prompts is not None:
        metrics, samples = generation_eval(
            policy,
            reference,
            tokenizer,
            inputs.prompts,
            inputs.prompt_ids,
            settings,
            batch_size=options.batch_size,
            reward=inputs.reward,
            per_prompt=per_prompt,
        )
        result["generation"] = {**inputs.prompts_info, "settings": dataclasses.asdict(settings), **metrics}
        if options.reward:
            result["generation"]["reward"]["spec"] = options.reward
        result["samples"] = samples
    if inputs.refusal is not None:
        log.info("eval: refusal prompts (%d)", len(inputs.refusal))
        rates = refusal_eval(
            policy,
            reference,
            tokenizer,
            inputs.refusal,
            inputs.refusal_ids,
            settings,
            inputs.detector,
            batch_size=options.batch_size,
        )
        result["refusal"] = {
            **inputs.refusal_info,
            "detector": inputs.detector_name,
            "settings": dataclasses.asdict(settings),
            **rates,
        }
    if inputs.train_prompt_ids is not None:
        result["by_distance"] = _by_distance(inputs, reference, tokenizer, options, logps, per_prompt)
    return result


def _by_distance(inputs: EvalInputs, reference, tokenizer, options: EvalOptions, logps, per_prompt: dict) -> dict:
    """--train-data: the pair and sampling numbers just measured, bucketed by distance (distance.py)."""
    log.info("eval: distances to %d training prompts", len(inputs.train_prompt_ids))
    buckets = distance_eval(
        reference,
        inputs.train_prompt_ids,
        pad_id=pad_id_of(tokenizer),
        beta=options.beta,
        batch_size=options.batch_size,
        pairs=None if logps is None else ([p.prompt_ids for p in inputs.pairs], logps),
        samples=None if inputs.prompts is None else (inputs.prompt_ids, per_prompt),
    )
    return {**inputs.train_info, **buckets}


def flat_metrics(result: dict) -> dict[str, float]:
    """The headline numbers of a result as one flat dict of finite floats, named like training's metrics:
    "rewards/accuracies", "rewards/ties", "rewards/margins", ..., "kl", "kl_se", "length/policy",
    "distinct_2/policy", "reward/policy", "win_rate", "win_rate/ci_low", "refusal/over_refusal_rate/policy", ...
    Missing or non-finite values are left out."""
    out: dict[str, Any] = {}
    pairs = result.get("pairs", {})
    for key in (
        "rewards/accuracies",
        "rewards/ties",
        "rewards/margins",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
    ):
        out[key] = pairs.get(key)
    gen = result.get("generation", {})
    out["kl"], out["kl_se"] = gen.get("kl"), gen.get("kl_se")
    for group in ("length", "ended", "distinct_1", "distinct_2", "reward"):
        for key, value in gen.get(group, {}).items():
            out[f"{group}/{key}"] = value
    wins = gen.get("win_rate", {})
    out["win_rate"], out["win_rate/ci_low"], out["win_rate/ci_high"] = (
        wins.get("win_rate"),
        wins.get("ci_low"),
        wins.get("ci_high"),
    )
    refusal = result.get("refusal", {})
    for model in ("policy", "reference"):
        for key in ("over_refusal_rate", "unsafe_compliance_rate"):
            out[f"refusal/{key}/{model}"] = refusal.get(model, {}).get(key)
    return {
        k: float(v)
        for k, v in out.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


# ------------------------------------------------------------------------------------------------ the path


def _check_same_vocabulary(options: EvalOptions, tokenizer) -> None:
    """The reference scores the policy's token ids, so both must share one vocabulary."""
    try:
        ref_tokenizer = load_tokenizer(options.ref, trust_remote_code=options.trust_remote_code, what="--ref")
    except UserError:
        log.info("--ref %s: no tokenizer of its own; it is given --model's", options.ref)
        return
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"--ref {options.ref}: its tokenizer's vocabulary differs from --model's; the reference "
            "must score the same token ids"
        )


def run_eval(options: EvalOptions, *, policy=None, reference=None, tokenizer=None) -> dict:
    """The whole evaluation: check options, load the tokenizer, inputs and models (those not given), measure,
    write --json atomically. Training passes its in-memory `policy`, `reference` and `tokenizer`."""
    check_options(options)
    if policy is None and not options.model:
        raise UserError("eval: --model is required")
    if reference is None and not options.ref:
        raise UserError("eval: --ref is required (the reference model the policy is compared with)")
    device = resolve_device(options.device)
    if policy is None:
        causal_lm_config(options.model, trust_remote_code=options.trust_remote_code)
    if reference is None:
        causal_lm_config(options.ref, trust_remote_code=options.trust_remote_code, what="--ref")
    if tokenizer is None:
        tokenizer = load_tokenizer(options.model, trust_remote_code=options.trust_remote_code)
        if reference is None:
            _check_same_vocabulary(options, tokenizer)
    inputs = load_inputs(options, tokenizer)  # every file is checked before the models load
    if policy is None:
        policy = load_causal_lm(options.model, trust_remote_code=options.trust_remote_code).to(device)
    if reference is None:
        reference = load_causal_lm(options.ref, trust_remote_code=options.trust_remote_code, what="--ref").to(device)
    result = evaluate_models(inputs, policy, reference, tokenizer, options)
    if options.json:
        write_json(options.json, result)
    return result
