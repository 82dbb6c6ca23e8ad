"""Likelihood-displacement risk of each preference pair: the CHES score of Razin et al., "Unintentional Unalignment:
Likelihood Displacement in Direct Preference Optimization" (ICLR 2025, arXiv 2410.08847).

DPO pushes log π(y−|x) down and log π(y+|x) up. Both pushes act on the LM head's input, the last hidden states,
so when the rejected response's hidden states resemble the chosen one's, the push down on y− also pushes y+ down:
the chosen response's likelihood falls during training (likelihood displacement), and its probability mass may go
to responses unlike either. The paper measures the resemblance per pair (its Definition 2) with the centered hidden
embedding similarity: with h_{x,y,<k} the last hidden state (what the LM head multiplies) at the position that
predicts token k of response y after prompt x, and the sums a = Σ_{k=1..|y+|} h_{x,y+,<k}, b = Σ_{k=1..|y−|}
h_{x,y−,<k},

    CHES(x, y+, y−)      = ⟨a, b⟩ − ‖a‖²                                  (= ⟨a, b − a⟩)
    CHES_norm(x, y+, y−) = ⟨a, b⟩ / (|y+|·|y−|) − ‖a‖² / |y+|²            (the same of the means a/|y+|, b/|y−|)

High means risky; CHES(x, y, y) = ⟨a, a⟩ − ‖a‖² = 0. The paper ranks pairs by CHES (its Section 5) and filters
data by the length-normalised score (Section 6), which `displacement_report` ranks by: raw CHES is a sum of
|y+|·|y−| and |y+|² inner products, so its size grows with the lengths and it would rank long pairs first.

Where this comes from: the paper's own text was not reachable here; its authors' code was
(github.com/princeton-nlp/unintentional-unalignment: ches/ches.py, which their README names as Definition 2 and
its length-normalised variant, the one used to filter data in Section 6). It sums the final hidden states from the
last prompt position up to the one before the last token, i.e. exactly the |y| positions that predict y's tokens,
and normalises by those |y|: the formulas above, as here. (Their per-example script also adds the state after the
last response token; ches.py does not, nor do we.) Responses here end with their EOS token (tokenization appends
it), so the state predicting EOS counts and none after it.

The tokens are those training scores (truncated ids), the positions those whose log-probs DPO sums: `target_pos`
of a `PackedBatch`, `response_mask[:, 1:]` of a `PaddedBatch`. Each sequence's states are summed in float32 (a
bf16 state is widened first), and so are the inner products. `logps_and_ches` gives log-probs and CHES from one
forward, so `refcache.compute(..., ches_out=...)` scores every pair in the pass that fills the reference cache.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from preftune import refcache
from preftune.data.batching import PackedBatch, PaddedBatch, collate
from preftune.data.tokenize import TokenizedPair
from preftune.errors import UserError
from preftune.logps import choose_layout, packed_from_hidden, packed_hidden, padded_from_logits

DEFAULT_TOP = 10


class LogpsAndChes(NamedTuple):
    """`logps.SequenceLogps` of a batch and its pairs' CHES scores ([B] each): what `refcache.compute` with
    `ches_out` needs from its logps_fn."""

    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ches: Tensor
    ches_norm: Tensor


# ---------------------------------------------------------------------------------------------------- scores


def ches_scores(sums: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """(CHES [B], CHES_norm [B]) of the module docstring's formulas, from each sequence's summed hidden states
    sums [2B, H] (pair i's chosen is row i, its rejected row B + i) and response lengths [2B]."""
    a, b = sums.chunk(2)
    n_a, n_b = lengths.to(sums.dtype).chunk(2)
    cross, own = (a * b).sum(-1), (a * a).sum(-1)  # ⟨a, b⟩ and ‖a‖², the same sum order: b = a gives 0 exactly
    return cross - own, cross / (n_a * n_b) - own / (n_a * n_a)


def _packed_sums(picked: Tensor, batch: PackedBatch) -> tuple[Tensor, Tensor]:
    """([2B, H] float32 sum of each sequence's states, [2B] lengths) from `logps.packed_hidden`'s [N, H]."""
    sums = torch.zeros(2 * batch.num_pairs, picked.shape[-1], dtype=torch.float32, device=picked.device)
    return sums.index_add(0, batch.target_seq, picked.float()), batch.lengths


def _padded_sums(hidden: Tensor, batch: PaddedBatch) -> tuple[Tensor, Tensor]:
    """As `_packed_sums`, from the last hidden states [2B, T, H] of a `PaddedBatch`: token t is predicted at
    t − 1, so the states at t − 1 for the response tokens t (masked_fill, not a product: padding may hold nan)."""
    predicts = batch.response_mask[:, 1:].bool()
    states = hidden[:, :-1].float().masked_fill(~predicts[..., None], 0.0)
    return states.sum(1), predicts.sum(-1)


def _padded_forward(model: torch.nn.Module, batch: PaddedBatch) -> tuple[Tensor, Tensor]:
    """(logits [2B, T, V], LM head input [2B, T, H]) of one forward. The head's input is caught by a pre-hook on
    the head itself: by construction what it multiplies, whatever the architecture calls its hidden states, and no
    copy of every layer's states (output_hidden_states) is kept."""
    caught = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: caught.append(args[0]))
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    finally:
        hook.remove()
    if not caught:
        raise ValueError(f"{type(model).__name__} never calls its output embeddings: no LM head input to score")
    return logits, caught[-1]


@torch.no_grad()
def ches(model: torch.nn.Module, batch: PackedBatch | PaddedBatch) -> tuple[Tensor, Tensor]:
    """(CHES [B], CHES_norm [B]) float32 of a batch's pairs under `model` (not an FSDP-sharded one), no gradient."""
    if isinstance(batch, PackedBatch):
        sums, lengths = _packed_sums(packed_hidden(model, batch), batch)
    else:
        sums, lengths = _padded_sums(_padded_forward(model, batch)[1], batch)
    return ches_scores(sums, lengths)


@torch.no_grad()
def logps_and_ches(model: torch.nn.Module, batch: PackedBatch | PaddedBatch, ld_alpha: float | None = None):
    """`logps.compute_logps` (the same numbers, bit for bit) and `ches` from one forward → `LogpsAndChes`."""
    if isinstance(batch, PackedBatch):
        picked = packed_hidden(model, batch)
        logps = packed_from_hidden(model, batch, picked, None, False, ld_alpha)
        sums, lengths = _packed_sums(picked, batch)
    else:
        logits, hidden = _padded_forward(model, batch)
        logps = padded_from_logits(logits, batch, False, ld_alpha)
        sums, lengths = _padded_sums(hidden, batch)
    return LogpsAndChes(*logps, *ches_scores(sums, lengths))


def score_pairs(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    pad_id: int,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
) -> np.ndarray:
    """[N, 2] float32 (CHES, CHES_norm) of each pair with `model` as the reference: the reference-cache pass with
    `ches_out` (one forward per batch), into a temporary folder that is removed."""
    layout = choose_layout("packed", model, pairs, pad_id)
    with tempfile.TemporaryDirectory(prefix="preftune-ches-") as tmp:
        refcache.compute(
            model,
            pairs,
            batch_size=batch_size,
            logps_fn=logps_and_ches,
            collate_fn=lambda ps, idx: collate(layout, ps, idx, pad_id),
            device=device,
            dtype=dtype,
            out=Path(tmp) / "logps.npy",
            progress=progress,
            ches_out=Path(tmp) / "ches.npy",
        )
        return np.array(refcache.RefLogps(Path(tmp) / "ches.npy", len(pairs)).array)


# ---------------------------------------------------------------------------------------------------- audit


def check_displacement(displacement: bool, model: str | None, top: int | None) -> None:
    """`preftune audit --displacement [--top K]`: its options make sense (before any data is read)."""
    if top is not None and not displacement:
        raise UserError("--top ranks the pairs of --displacement: give --displacement too")
    if displacement and model is None:
        raise UserError("--displacement scores pairs with a model: give --model (a --tokenizer is not enough)")
    if top is not None and top < 1:
        raise UserError(f"--top must be at least 1, got {top}")


def audit_displacement(inputs: Any, model_path: str, *, top: int | None = None, **options: Any):
    """`preftune audit DATA --model M --displacement`: `displacement_report` of the pairs `api.audit_inputs` read,
    with the model at `model_path` as the reference, on a GPU when there is one. options: max_length,
    max_prompt_length, trust_remote_code."""
    from preftune.device import resolve_device
    from preftune.loading import load_causal_lm

    if inputs.unpaired:
        raise UserError("--displacement compares a chosen and a rejected response: DATA holds unpaired examples")
    trust = options.pop("trust_remote_code", False)
    device = resolve_device("auto")
    model = load_causal_lm(model_path, trust_remote_code=trust, what="--model").to(device)
    return displacement_report(inputs.rows, model, inputs.tokenizer, top=top or DEFAULT_TOP, device=device, **options)


def displacement_report(
    rows: list,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    top: int = DEFAULT_TOP,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[list[str], dict[str, Any]]:
    """(terminal lines, summary) of the CHES scores of `rows` (`formats.PreferencePair`s, e.g. `iter_pairs`'s):
    quantiles of both scores, and the `top` riskiest pairs by CHES_norm. The pairs scored are those training can
    use (as the audit's lengths: not identical, no empty response, encodable), tokenized and truncated as
    training does with these `max_length` and `max_prompt_length`."""
    from preftune.data.audit import _measurable, _pair_encoding_kinds
    from preftune.data.tokenize import tokenize_pairs

    measured = [pair for pair in rows if _measurable(pair, _pair_encoding_kinds(pair))]
    summary: dict[str, Any] = {"pairs": len(measured), "excluded": len(rows) - len(measured), "ranked_by": "ches_norm"}
    if not measured:
        return [f"likelihood displacement: no pair to score ({summary['excluded']} excluded)"], summary
    tokenized, _ = tokenize_pairs(measured, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    scores = score_pairs(
        model, tokenized, tokenizer.pad_token_id, batch_size=batch_size, device=device, progress=progress
    )
    summary.update(ches=_quantiles(scores[:, 0]), ches_norm=_quantiles(scores[:, 1]))
    summary["riskiest"] = [_pair_entry(measured[i], scores[i]) for i in np.argsort(-scores[:, 1], kind="stable")[:top]]
    return _report_lines(summary), summary


QUANTILES = {"p10": 0.1, "p25": 0.25, "median": 0.5, "p75": 0.75, "p90": 0.9}


def _quantiles(values: np.ndarray) -> dict[str, float]:
    """min, nearest-rank p10 … p90 (as the audit's length percentiles), max, mean: [1, 2, 3, 4] → median 2."""
    ordered = np.sort(values.astype(np.float64))
    ranked = {name: float(ordered[max(math.ceil(q * len(ordered)) - 1, 0)]) for name, q in QUANTILES.items()}
    return {"min": float(ordered[0]), **ranked, "max": float(ordered[-1]), "mean": float(ordered.mean())}


def _pair_entry(pair: Any, scores: np.ndarray) -> dict[str, Any]:
    """One ranked pair: where it is, (CHES, CHES_norm) `scores`, and its responses' beginnings."""
    return {
        "where": pair.where,
        "ches": float(scores[0]),
        "ches_norm": float(scores[1]),
        "chosen": _preview(pair.chosen),
        "rejected": _preview(pair.rejected),
    }


def _preview(response: str | list, width: int = 40) -> str:
    """A response's first `width` characters on one line (a message list: its contents joined)."""
    text = response if isinstance(response, str) else " ".join(str(m.get("content", "")) for m in response)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _report_lines(summary: dict[str, Any]) -> list[str]:
    head = (
        f"likelihood displacement (CHES, Razin et al. 2025; --model as the reference): {summary['pairs']} pairs "
        f"scored, {summary['excluded']} excluded (identical, empty or unencodable)"
    )
    names = ["min", *QUANTILES, "max", "mean"]
    out = [head, f"  {'':<10}" + "".join(f"{name:>11}" for name in names)]
    for key in ("ches", "ches_norm"):
        out.append(f"  {key:<10}" + "".join(f"{summary[key][name]:>11.4g}" for name in names))
    out.append(
        f"riskiest {len(summary['riskiest'])} pairs by ches_norm (high: DPO's push down on the rejected response "
        "also pushes the chosen one down)"
    )
    for rank, entry in enumerate(summary["riskiest"], 1):
        out.append(
            f"  {rank:>3}. {entry['where']}  ches_norm {entry['ches_norm']:.4g}  ches {entry['ches']:.4g}  "
            f"chosen {entry['chosen']!r}  rejected {entry['rejected']!r}"
        )
    return out
