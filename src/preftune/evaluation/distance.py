"""Out-of-distribution evaluation: held-out metrics by how far each eval prompt lies from the training prompts
(`preftune eval --train-data FILE`).

A preference-trained policy is usually good near its training prompts and worse away from them; one accuracy over
the whole held-out set hides that. Here every eval prompt (of --data pairs and of --prompts) gets a distance to
the training set, the prompts are bucketed from in-distribution to far (quartiles of the distances by default),
and accuracy, margin, KL and rewards are reported per bucket.

    embedding(x) = normalise(mean over x's tokens of the reference's last hidden state)
    distance(x)  = 1 − max over training prompts t of embedding(x) · embedding(t)      (nearest neighbour, exact)

Why the reference's own representation: it is the model both policy and reference started from, so "far" means
far in the space the trained model reads prompts in, with no second model to download, pick or keep in step
(an outside sentence encoder would measure its own notion of similarity, and need its own tokenizer). The last
hidden state (the input of the LM head) is the model's final summary of each position; the mean over the prompt's
tokens weighs every part of the prompt, where the last token alone mostly encodes what comes next. L2
normalisation makes the dot product a cosine, so prompt length and activation scale do not count as distance.

Torch, the models and pairs.py are imported inside the functions that compute: `plot_by_distance` and the bucket
summaries of an existing result stay importable where only matplotlib is (the report never imports torch).
"""

from __future__ import annotations

import inspect
import io
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from preftune.errors import UserError
from preftune.evaluation.stats import kl_estimate, mean_se, wilson_interval, win_rate

if TYPE_CHECKING:
    import torch

    from preftune.evaluation.sampling import Prompt

MEASURE = "1 − cosine similarity to the nearest --train-data prompt (reference's mean last hidden state, normalised)"
CHUNK = 1024  # training prompts embedded and compared with the eval prompts at a time: memory O(CHUNK · hidden)


# ------------------------------------------------------------------------------------------- training prompts


def _prompts_only(path: str, columns: dict[str, str]) -> bool:
    """A local file whose first row has a prompt and no response: a prompts file, not pairs or examples."""
    from preftune.data.formats import _rows_local

    if not os.path.isfile(path):
        return False
    row, _ = next(_rows_local(path), ({}, ""))
    responses = {columns.get(name) or name for name in ("chosen", "rejected", "completion")}
    return (columns.get("prompt") or "prompt") in row and not responses & set(row)


def read_train_prompts(path: str, columns: dict[str, str] | None = None) -> list[Prompt]:
    """The prompts of a training file as `preftune train` reads it (pairs of any shape, or unpaired examples;
    `columns` as --columns), or of a prompts file (rows with a 'prompt' field, as --prompts reads it)."""
    from preftune.data.formats import LoadReport, read_pairs
    from preftune.data.unpaired import ExampleReport, is_unpaired_source, read_examples
    from preftune.evaluation.sampling import Prompt, load_prompts

    columns = dict(columns or {})
    try:
        if _prompts_only(path, columns):
            return load_prompts(path, flag="--train-data")
        if is_unpaired_source(path, columns):
            rows = read_examples(path, ExampleReport(), columns=columns)
        else:
            rows = read_pairs(path, LoadReport(), columns=columns)
        return [Prompt(row.prompt, row.where) for row in rows]
    except UserError as e:
        message = str(e)
        raise UserError(message if message.startswith("--train-data") else f"--train-data: {message}") from None


def load_train_prompts(
    path: str, tokenizer, *, columns: dict[str, str] | None = None, max_prompt_length: int | None = None
) -> tuple[list[list[int]], dict]:
    """Token ids of the distinct training prompts, encoded as --prompts are (so that an eval prompt equal to a
    training prompt has the same ids), and what was read → (ids, info)."""
    from preftune.evaluation.sampling import encode_prompts

    prompts = read_train_prompts(path, columns)
    if not prompts:
        raise UserError(f"--train-data {path}: no prompts")
    ids, cut = encode_prompts(prompts, tokenizer, max_prompt_length)
    distinct = [list(t) for t in dict.fromkeys(map(tuple, ids))]
    info = {"train_data": path, "train_prompts": len(prompts), "train_distinct": len(distinct), "train_cut": cut}
    return distinct, info


# ------------------------------------------------------------------------------------------- embeddings


def _right_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.bool, device=device)
    return ids, mask


def _embed_batch(model, rows: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Right padding: causal attention keeps the real tokens' states independent of the padding after them."""
    import torch

    ids, mask = _right_padded(rows, pad_id, device)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask.long(), "output_hidden_states": True}
    accepts = set(inspect.signature(model.forward).parameters)
    if "use_cache" in accepts:
        kwargs["use_cache"] = False
    if "logits_to_keep" in accepts:  # the LM head's output is not needed: one position instead of all
        kwargs["logits_to_keep"] = 1
    hidden = model(**kwargs).hidden_states[-1].float()
    total = hidden.masked_fill(~mask[..., None], 0.0).sum(1)
    return torch.nn.functional.normalize(total / mask.sum(1, keepdim=True), dim=-1)


def prompt_embeddings(model, prompt_ids: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """[n, hidden] float32 unit vectors, one per prompt, on the model's device (see the module docstring).

    Prompts are batched by length (less padding), the rows put back in the given order; no gradients, the model's
    train/eval state restored."""
    import torch

    from preftune.evaluation.pairs import eval_mode

    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    parts = []
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = [list(prompt_ids[i]) for i in order[start : start + batch_size]]
            parts.append(_embed_batch(model, rows, pad_id, device))
    embeddings = torch.cat(parts)
    out = torch.empty_like(embeddings)
    out[torch.tensor(order, device=device)] = embeddings
    return out


# ------------------------------------------------------------------------------------------- distances


def nearest_distances(
    model,
    eval_ids: Sequence[Sequence[int]],
    train_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    chunk_size: int = CHUNK,
) -> list[float]:
    """Distance of each eval prompt to its nearest training prompt: 1 − max cosine similarity, exact.

    The distinct eval prompts are embedded once and kept; the training prompts (thousands) are embedded once each,
    `chunk_size` at a time, and each chunk's similarities to every eval prompt are one matrix product whose
    row-wise maximum updates the running best. Memory stays O((eval prompts + chunk_size) · hidden). A cosine of
    unit vectors may round a hair above 1: distances are clipped at 0. An eval prompt whose ids are a training
    prompt's is at 0 exactly, as its own cosine is 1 (computed, it is 1 only up to float rounding, ~1e-7, which
    would split copies of training prompts into buckets of noise).
    """
    import torch

    if not eval_ids:
        return []
    index = {key: i for i, key in enumerate(dict.fromkeys(map(tuple, eval_ids)))}
    queries = prompt_embeddings(model, list(index), pad_id=pad_id, batch_size=batch_size)
    best = torch.full((len(index),), -float("inf"), device=queries.device)
    for start in range(0, len(train_ids), chunk_size):
        keys = prompt_embeddings(model, train_ids[start : start + chunk_size], pad_id=pad_id, batch_size=batch_size)
        best = torch.maximum(best, (queries @ keys.T).max(dim=1).values)
    seen = set(map(tuple, train_ids))
    distances = [0.0 if key in seen else d for key, d in zip(index, (1.0 - best).clamp(min=0.0).tolist())]
    return [distances[index[tuple(ids)]] for ids in eval_ids]


# ------------------------------------------------------------------------------------------- buckets


def distance_label(low: float | None, high: float | None) -> str:
    """A bucket holds low < distance ≤ high: "≤ 0.0123", "0.0123–0.0456", "> 0.0456" (3 significant digits)."""
    if low is None and high is None:
        return "all"
    if low is None:
        return f"≤ {high:.3g}"
    if high is None:
        return f"> {low:.3g}"
    return f"{low:.3g}–{high:.3g}"


def _edges(distances: Sequence[float], edges: Sequence[float] | None) -> list[float]:
    from preftune.evaluation.pairs import quartile_edges

    return sorted(set(edges)) if edges is not None else quartile_edges(list(distances))


def _buckets(distances: Sequence[float], edges: list[float]) -> list[tuple[dict, list[int]]]:
    """(the bucket's label, edges and mean distance; its member indices) per bucket of `edges`."""
    from preftune.evaluation.pairs import bucket_members

    bounds = zip([None, *edges], [*edges, None])
    return [
        (
            {
                "distance": distance_label(low, high),
                "lower_edge": low,
                "upper_edge": high,
                "mean_distance": mean_se([distances[i] for i in members])[0],
            },
            members,
        )
        for (low, high), members in zip(bounds, bucket_members(distances, edges))
    ]


def pair_buckets(
    distances: Sequence[float], logps: dict[str, Sequence[float]], *, beta: float, edges: Sequence[float] | None = None
) -> dict:
    """Pair metrics per distance bucket from per-pair numbers: `logps` holds n summed log-probs per key
    ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected": `pairs.pair_logps`), `distances` n floats.
    `edges` None → quartiles of `distances`. Wins and ties use pairs.py's tie band; the accuracy's 95% interval
    is Wilson's on wins / pairs."""
    from preftune.evaluation.pairs import group_metrics, pair_rewards

    keys = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    chosen, rejected, bands = pair_rewards(*(logps[k] for k in keys), beta)
    edges = _edges(distances, edges)
    buckets = []
    for head, members in _buckets(distances, edges):
        group = group_metrics(*([values[i] for i in members] for values in (chosen, rejected, bands)))
        low, high = wilson_interval(group["wins"], len(members)) if members else (None, None)
        buckets.append({**head, **group, "accuracy_ci_low": low, "accuracy_ci_high": high})
    return {"edges": edges, "buckets": buckets}


def generation_buckets(
    distances: Sequence[float], per_prompt: dict[str, Sequence[float]], *, edges: Sequence[float] | None = None
) -> dict:
    """Sampling metrics per distance bucket: KL ± SE from "policy_logps"/"reference_logps" (each policy sample
    scored by both models), and with "policy_reward"/"reference_reward" the mean rewards ± SE and the win rate."""
    edges = _edges(distances, edges)
    buckets = []
    for head, members in _buckets(distances, edges):
        pick = lambda key: [per_prompt[key][i] for i in members]  # noqa: E731
        kl = kl_estimate(pick("policy_logps"), pick("reference_logps"))
        bucket = {**head, "prompts": len(members), "kl": kl["kl"], "kl_se": kl["kl_se"], "kl_infinite": kl["infinite"]}
        if "policy_reward" in per_prompt:
            (ours, ours_se), (theirs, theirs_se) = mean_se(pick("policy_reward")), mean_se(pick("reference_reward"))
            bucket["reward"] = {"policy": ours, "reference": theirs, "policy_se": ours_se, "reference_se": theirs_se}
            bucket["win_rate"] = win_rate(pick("policy_reward"), pick("reference_reward"))
        buckets.append(bucket)
    return {"edges": edges, "buckets": buckets}


def distance_eval(
    reference,
    train_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    beta: float = 0.1,
    batch_size: int = 8,
    pairs: tuple[Sequence[Sequence[int]], dict] | None = None,
    samples: tuple[Sequence[Sequence[int]], dict] | None = None,
) -> dict:
    """The by-distance section of eval.json. `pairs`: (prompt ids per held-out pair, `pairs.pair_logps`' per-pair
    log-probs); `samples`: (prompt ids per sampled prompt, per-prompt log-probs and rewards of `generation_eval`).
    One embedding pass covers the prompts of both."""
    import torch

    if not isinstance(reference, torch.nn.Module):
        raise TypeError("--train-data embeds prompts with the reference model itself, not cached log-probs")
    parts = [p for p in (pairs, samples) if p is not None]
    eval_ids = [ids for prompt_ids, _ in parts for ids in prompt_ids]
    distances = nearest_distances(reference, eval_ids, train_ids, pad_id=pad_id, batch_size=batch_size)
    out: dict[str, Any] = {"measure": MEASURE}
    if pairs is not None:
        out["pairs"] = pair_buckets(distances[: len(pairs[0])], pairs[1], beta=beta)
    if samples is not None:
        out["generation"] = generation_buckets(distances[len(eval_ids) - len(samples[0]) :], samples[1])
    return out


# ------------------------------------------------------------------------------------------- plot


def _nan(value) -> float:
    return float("nan") if value is None else value


def _draw_accuracy(ax, buckets: list[dict]) -> None:
    x = range(len(buckets))
    acc = [_nan(b["rewards/accuracies"]) for b in buckets]
    below = [a - _nan(b["accuracy_ci_low"]) for a, b in zip(acc, buckets)]
    above = [_nan(b["accuracy_ci_high"]) - a for a, b in zip(acc, buckets)]
    ax.errorbar(x, acc, yerr=[below, above], fmt="o-", color="C0", capsize=3)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("held-out accuracy (95% CI)")


def _draw_kl(ax, buckets: list[dict]) -> None:
    x = range(len(buckets))
    kl = [_nan(b["kl"]) for b in buckets]
    se = [0.0 if b["kl_se"] is None else b["kl_se"] for b in buckets]
    ax.errorbar(x, kl, yerr=se, fmt="o-", color="C1", capsize=3)
    ax.set_ylabel("KL(π‖π_ref), nats (± SE)")


def plot_by_distance(result: dict) -> bytes:
    """PNG of held-out accuracy and of KL per distance bucket, near to far: one panel each for the parts present.
    `result`: eval.json's content (or its "by_distance" section). Matplotlib's Agg canvas, no pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    section = result.get("by_distance", result)
    panels = [(key, draw) for key, draw in (("pairs", _draw_accuracy), ("generation", _draw_kl)) if key in section]
    if not panels:
        raise ValueError("no by-distance buckets in this result (run `preftune eval` with --train-data)")
    fig = Figure(figsize=(3.6 * len(panels), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.12 if len(panels) > 1 else 0.2, right=0.97, bottom=0.25, top=0.86, wspace=0.35)
    for k, (key, draw) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), k)
        buckets = section[key]["buckets"]
        draw(ax, buckets)
        ax.set_xticks(range(len(buckets)), [b["distance"] for b in buckets], rotation=20, fontsize=7)
        ax.set_xlabel("distance to the training prompts", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("by distance from the training prompts (near → far)", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
