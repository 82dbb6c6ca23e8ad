"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, arXiv 2405.14782), as TRL 1.16's
`RLOOTrainer` computes it, on k sampled responses per prompt that come with their rewards.

One round trains the policy on fixed samples: prompts in batches of `batch_prompts` (shuffled by `seed`), each
batch scored once and then used for `num_iterations` optimizer steps. Per batch, with y_i a sampled response
(its tokens up to and including EOS when it ended), T = `temperature`, and sums over y_i's tokens:

    log π(y_t | ·)  = log_softmax(logits_t / T)[y_t]                 policy and reference alike (TRL's fused head)
    logp_old(y_i)   = Σ_t log π_old(y_t)                             the policy at the batch's start, no gradient
    kl_i            = Σ_t (log π_old(y_t) − log π_ref(y_t))          first-order, so it can be negative
    r̃_i            = r_i − beta · kl_i                              the reference is not loaded when beta = 0
    A_i             = r̃_i − 1/(k−1) · Σ_{j≠i} r̃_j                  over the k responses of y_i's prompt
    (normalize_advantages)  A ← (A − mean A) / (std A + 1e-4)       over the batch, std with Bessel's correction
    ρ_i             = exp(logp_θ(y_i) − logp_old(y_i))              one ratio per sequence, not per token
    loss            = mean_i −min(ρ_i A_i, clip(ρ_i, 1 − epsilon, 1 + epsilon_high) A_i)   over the batch's B·k

then `clip_grad_norm_(max_grad_norm)` and AdamW (weight decay 0, TRL's `adamw_torch` defaults). The logged
`kl_mean` is TRL's `kl`: Σ_i kl_i / (number of response tokens); `clip_fraction` is TRL's `clip_ratio/region_mean`
(ρ_i < 1 − ε with A_i < 0, or ρ_i > 1 + ε_high with A_i > 0). tests/test_trl_rloo_parity.py checks the advantages,
the KL, the loss and its gradients against RLOOTrainer's own code on a fixed batch.

Departures from RLOOTrainer: the learning rate is constant (TRL decays it linearly over its run; one round here is
one step of an outer loop), and the policy runs in eval mode (no dropout, so logp_θ = logp_old exactly at the first
iteration). A checkpoint is written at batch ends only: the old log-probs of a batch come from the weights at its
start, so a resumed run starts again at the batch in progress and repeats exactly what the first run did.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from preftune import checkpoint
from preftune.device import resolve_device
from preftune.errors import UserError
from preftune.loading import load_causal_lm
from preftune.logps import sequence_logps
from preftune.metrics import append_records
from preftune.rundir import CHECKPOINTS, FINAL, METRICS, latest_checkpoint, truncate_metrics


@dataclass(frozen=True)
class RlooOptions:
    """RLOOConfig's defaults where it has the option (beta, epsilon, learning_rate, num_iterations, max_grad_norm,
    temperature, seed, normalize_advantages); `batch_prompts` × k responses is one optimizer step's batch (TRL's
    default: 8 completions, k = 2); `micro_batch` responses go through the model at once (gradients accumulate,
    the loss is the same); a checkpoint every `save_every` batches."""

    beta: float = 0.05
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon
    learning_rate: float = 1e-6
    num_iterations: int = 1
    batch_prompts: int = 4
    micro_batch: int = 8
    max_grad_norm: float = 1.0
    normalize_advantages: bool = False
    temperature: float = 1.0
    seed: int = 42
    save_every: int = 50
    device: str = "auto"


# ------------------------------------------------------------------------------------------------ the math


def sequence_kl(old_logps: Tensor, ref_logps: Tensor) -> Tensor:
    """kl_i = Σ_t (log π_old − log π_ref): the difference of the per-sequence sums, [N]."""
    return old_logps - ref_logps


def shaped_rewards(rewards: Tensor, kl: Tensor, beta: float) -> Tensor:
    """r_i − beta · kl_i, [N]; beta = 0 leaves the rewards as they are (no reference)."""
    return rewards - beta * kl if beta != 0.0 else rewards


def leave_one_out_advantages(rewards: Tensor, k: int, normalize: bool = False) -> Tensor:
    """[N] rewards, k consecutive responses per prompt → A_i = r_i − mean of the other k − 1 of its prompt."""
    grouped = rewards.view(-1, k)
    baselines = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    advantages = (grouped - baselines).view(-1)
    if normalize:  # over the whole batch, as TRL (its nanstd is Bessel-corrected, as torch.std)
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    return advantages


def clipped_losses(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, epsilon: float, epsilon_high: float
) -> tuple[Tensor, Tensor]:
    """Per-sequence −min(ρA, clip(ρ)A) and whether the clip region holds it (TRL's region clip), each [N]."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    losses = -torch.min(ratio * advantages, clipped * advantages)
    in_region = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return losses, in_region


def rloo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, epsilon: float, epsilon_high: float) -> Tensor:
    """TRL's aggregation: the mean of the per-sequence losses over the batch."""
    return clipped_losses(logps, old_logps, advantages, epsilon, epsilon_high)[0].mean()


# ------------------------------------------------------------------------------------------------ the inputs


def check_samples(prompt_ids: list[list[int]], response_ids: list[list[list[int]]], rewards: list[list[float]]) -> int:
    """The number k of responses per prompt; a UserError naming the first prompt that breaks the shape."""
    if not prompt_ids or not (len(prompt_ids) == len(response_ids) == len(rewards)):
        raise UserError(
            f"rloo: expected one list of responses and one of rewards per prompt, got {len(prompt_ids)} prompts, "
            f"{len(response_ids)} response lists, {len(rewards)} reward lists"
        )
    k = len(response_ids[0])
    for i, (prompt, responses, scores) in enumerate(zip(prompt_ids, response_ids, rewards)):
        if not prompt:
            raise UserError(f"rloo: prompt {i} is empty; its first response token would have nothing to follow")
        if len(responses) < 2:
            raise UserError(f"rloo: prompt {i} has {len(responses)} response(s); RLOO needs k ≥ 2 per prompt")
        if len(responses) != k:
            raise UserError(f"rloo: prompt {i} has {len(responses)} responses, prompt 0 has {k}; expected k for all")
        if len(scores) != len(responses):
            raise UserError(f"rloo: prompt {i} has {len(scores)} rewards for {len(responses)} responses")
        if not all(math.isfinite(float(r)) for r in scores):
            raise UserError(f"rloo: prompt {i} has a reward that is not a finite number: {scores}")
    return k


def check_options(o: RlooOptions) -> None:
    rules = [
        ("beta", o.beta >= 0, "≥ 0"),
        ("epsilon", 0 < o.epsilon < 1, "in (0, 1)"),
        ("epsilon_high", o.epsilon_high is None or o.epsilon_high > 0, "> 0"),
        ("learning_rate", o.learning_rate > 0, "> 0"),
        ("max_grad_norm", o.max_grad_norm > 0, "> 0"),
        ("temperature", o.temperature > 0, "> 0"),
    ]
    rules += [(name, getattr(o, name) >= 1, "≥ 1") for name in ("num_iterations", "batch_prompts", "micro_batch")]
    rules += [("save_every", o.save_every >= 1, "≥ 1")]
    for name, ok, expected in rules:
        if not ok:
            raise UserError(f"--{name.replace('_', '-')} {getattr(o, name)}: expected {expected}")


class Rows(NamedTuple):
    """prompt + response per row, right-padded: input_ids, attention_mask, response_mask (1 on response tokens)."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor

    def take(self, part: slice) -> Rows:
        return Rows(*(t[part] for t in self))


def pad_rows(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> Rows:
    """Right padding: every token keeps its position, and causal attention never looks at the padding after it."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids)
    for n, (p, r) in enumerate(zip(prompts, responses)):
        ids[n, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention[n, : len(p) + len(r)] = 1
        response[n, len(p) : len(p) + len(r)] = 1
    return Rows(ids.to(device), attention.to(device), response.to(device))


def completion_logps(model, rows: Rows, temperature: float) -> Tensor:
    """Σ_t log_softmax(logits_t / T)[y_t] over each row's response tokens, [N] float32."""
    logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False).logits
    if temperature != 1.0:
        logits = logits / temperature
    return sequence_logps(logits, rows.input_ids, rows.response_mask)[0]


@torch.no_grad()
def chunked_logps(model, rows: Rows, temperature: float, chunk: int) -> Tensor:
    n = len(rows.input_ids)
    return torch.cat([completion_logps(model, rows.take(slice(s, s + chunk)), temperature) for s in range(0, n, chunk)])


class Batch(NamedTuple):
    """What a batch's `num_iterations` steps share: its rows, old log-probs and advantages, and its metrics."""

    rows: Rows
    old_logps: Tensor
    advantages: Tensor
    metrics: dict[str, float]


def score_batch(policy, reference, rows: Rows, rewards: Tensor, k: int, o: RlooOptions) -> Batch:
    """Once per batch, as TRL's `_generate_and_score_completions`: old and reference log-probs, KL, advantages."""
    old = chunked_logps(policy, rows, o.temperature, o.micro_batch)
    kl = torch.zeros_like(old)
    if o.beta != 0.0:
        kl = sequence_kl(old, chunked_logps(reference, rows, o.temperature, o.micro_batch))
    advantages = leave_one_out_advantages(shaped_rewards(rewards, kl, o.beta), k, o.normalize_advantages)
    tokens = rows.response_mask[:, 1:].sum().clamp(min=1)  # the tokens `sequence_logps` scores
    metrics = {
        "reward_mean": rewards.mean().item(),
        "kl_mean": (kl.sum() / tokens).item(),
        "advantage_std": advantages.std().item(),
    }
    return Batch(rows, old, advantages, metrics)


def update(policy, optimizer, batch: Batch, o: RlooOptions) -> dict[str, float]:
    """One optimizer step on the whole batch; micro-batches add up to the loss's mean over all its rows."""
    optimizer.zero_grad(set_to_none=True)
    n = len(batch.old_logps)
    loss, clipped = torch.zeros((), device=batch.old_logps.device), 0
    high = o.epsilon if o.epsilon_high is None else o.epsilon_high
    for s in range(0, n, o.micro_batch):
        part = slice(s, s + o.micro_batch)
        logps = completion_logps(policy, batch.rows.take(part), o.temperature)
        losses, region = clipped_losses(logps, batch.old_logps[part], batch.advantages[part], o.epsilon, high)
        (losses.sum() / n).backward()
        loss += losses.detach().sum() / n
        clipped += int(region.sum())
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], o.max_grad_norm)
    optimizer.step()
    return {"loss": loss.item(), "clip_fraction": clipped / n, "grad_norm": grad_norm.item()}


def after_step(step: int) -> None:
    """A hook for tests that interrupt a round at a given step; does nothing."""


# ------------------------------------------------------------------------------------------------ a round


def train_round(
    policy_folder: str,
    reference_folder: str,
    tokenizer,
    prompt_ids: list[list[int]],
    response_ids: list[list[list[int]]],
    rewards: list[list[float]],
    options: RlooOptions,
    output: Path,
    resume: bool,
) -> Path:
    """Train the policy on the samples; `output/final/` (model and tokenizer), returned. `output/metrics.jsonl`
    holds one record per optimizer step; with `resume`, a finished round returns its final/ and an interrupted
    one goes on from its newest checkpoint (metrics after it are dropped and recomputed)."""
    k = check_samples(prompt_ids, response_ids, rewards)
    check_options(options)
    output = Path(output)
    if resume and (output / FINAL).is_dir():
        return output / FINAL
    if not resume and output.exists() and any(output.iterdir()):
        raise UserError(f"rloo: output {output} is not empty; resume it or choose a new folder")
    device = resolve_device(options.device)
    torch.manual_seed(options.seed)
    policy = load_causal_lm(policy_folder, what="policy").to(device)
    reference = None
    if options.beta != 0.0:  # as TRL: no reference model at beta = 0
        reference = load_causal_lm(reference_folder, what="reference").to(device).requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # constant; a checkpoint holds it
    output.mkdir(parents=True, exist_ok=True)
    path = latest_checkpoint(output) if resume else None
    step = checkpoint.load(path, policy, optimizer, scheduler) if path is not None else 0
    truncate_metrics(output / METRICS, step)

    # The order is a function of the seed alone, so a resumed round sees the same batches.
    order = torch.randperm(len(prompt_ids), generator=torch.Generator().manual_seed(options.seed)).tolist()
    batches = [order[s : s + options.batch_prompts] for s in range(0, len(order), options.batch_prompts)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with open(output / METRICS, "a", encoding="utf-8") as metrics_file:
        for b in range(step // options.num_iterations, len(batches)):
            ids = batches[b]
            rows = pad_rows(
                [prompt_ids[i] for i in ids for _ in range(k)],
                [r for i in ids for r in response_ids[i]],
                pad_id,
                device,
            )
            scores = torch.tensor([float(r) for i in ids for r in rewards[i]], dtype=torch.float32, device=device)
            batch = score_batch(policy, reference, rows, scores, k, options)
            for iteration in range(options.num_iterations):
                step += 1
                record = {"step": step, "batch": b + 1, "iteration": iteration + 1, "lr": scheduler.get_last_lr()[0]}
                record |= update(policy, optimizer, batch, options) | batch.metrics
                append_records(metrics_file, [record])
                scheduler.step()
                last = iteration + 1 == options.num_iterations and b + 1 < len(batches)  # the round's end: final/
                if last and (b + 1) % options.save_every == 0:
                    checkpoint.save(output, step, policy, optimizer, scheduler)
                    checkpoint.prune(output, keep=1)
                after_step(step)
    return save_final(output, policy, tokenizer)


def save_final(output: Path, policy, tokenizer) -> Path:
    """final/: an ordinary model folder with the tokenizer; then the checkpoints go (final/ is what resumes)."""

    def fill(tmp: Path) -> None:
        policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    checkpoint.write_atomically(output / FINAL, fill)
    shutil.rmtree(output / CHECKPOINTS, ignore_errors=True)
    return output / FINAL
