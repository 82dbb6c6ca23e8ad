"""The reference a run trains against (see `reference` for its three kinds): by default its log-probs, computed
once before the first update and cached on disk (`refcache`), then the model is freed."""

from __future__ import annotations

import copy
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from preftune import distributed, fsdp, lora, refcache
from preftune.ches import logps_and_ches
from preftune.config import TrainConfig
from preftune.data.batching import collate
from preftune.data.tokenize import TokenizedPair
from preftune.errors import UserError
from preftune.loading import base_model_path, load_causal_lm
from preftune.logps import choose_layout, compute_logps
from preftune.refcache import RefLogps
from preftune.reference import CachedReference, Reference, ReferenceModel

log = logging.getLogger("preftune")


def build_references(
    cfg: TrainConfig, policy: torch.nn.Module, layout: str, train_pairs, eval_pairs, pad_id: int, device: torch.device
) -> tuple[Reference, Reference | None, str]:
    """(the reference of the training pairs, that of the eval pairs or None, the layout both models fit).

    The default reference is the policy as loaded (never re-read from disk). With the cache, the policy itself
    computes them before its first update, so no second copy is ever made; without it, a frozen copy runs at
    every step. A LoRA policy is its own reference, with or without the cache: its base with the adapter
    disabled, or its loaded adapter's initial state (see `lora`); no copy of the base is ever made. With a sharded
    policy (--fsdp) every reference model is sharded too, loaded as the policy was (`fsdp.load_sharded`).
    """
    sharded = fsdp.enabled(policy)
    loaded = _load_reference(cfg, cfg.ref_model, "--ref-model", device, sharded) if cfg.ref_model else None
    if loaded is not None and layout == "packed":  # both models must fit the layout their batches share
        layout = choose_layout(cfg.layout, loaded, train_pairs, pad_id)
    adapter = loaded is None and lora.enabled(cfg)
    if cfg.no_ref_cache or cfg.ref_update:  # TR-DPO's reference changes: a cache of it would be stale
        if adapter:
            live = lora.live_reference(policy, cfg)
        else:  # a frozen copy of the policy as loaded; a sharded one is read again from its files
            copied = _load_reference(cfg, base_model_path(cfg.model), "--model", device, True) if sharded else None
            live = ReferenceModel(loaded or copied or copy.deepcopy(policy), dtype=cfg.dtype)
        return live, live, layout
    model = loaded or policy
    digest = lora.reference_digest(model, cfg) if adapter else refcache.weights_digest(model)
    cache_dir = Path(cfg.ref_cache) if cfg.ref_cache else refcache.default_cache_dir()

    def cached(pairs, what: str, ches: bool = False) -> CachedReference:
        collate_fn = lambda ps, idx: collate(layout, ps, idx, pad_id, cfg.pack_tokens or None)  # noqa: E731
        return CachedReference(*_cached_logps(cfg, model, digest, pairs, cache_dir, what, collate_fn, device, ches))

    with lora.cache_context(model, cfg) if adapter else nullcontext():
        reference = cached(train_pairs, "--data", ches=cfg.drop_displacement is not None)
        eval_reference = cached(eval_pairs, "--eval-data") if eval_pairs else None
    return reference, eval_reference, layout  # a --ref-model is freed here: only its log-probs are kept


def _load_reference(cfg: TrainConfig, path: str, what: str, device: torch.device, sharded: bool) -> torch.nn.Module:
    """A reference model read from `path`: sharded like the policy, or whole on `device`."""
    if sharded:
        return fsdp.load_sharded(path, cfg, device, what=what)
    options = {"trust_remote_code": cfg.trust_remote_code, "allow_pickle_weights": cfg.allow_pickle_weights}
    return load_causal_lm(path, what=what, **options).to(device)


def _cached_logps(
    cfg: TrainConfig,
    model,
    digest: str,
    pairs: list[TokenizedPair],
    cache_dir: Path,
    what: str,
    collate_fn,
    device: torch.device,
    ches: bool = False,
) -> tuple[RefLogps, RefLogps | None]:
    """The reference log-probs of `pairs` from the cache, computed when missing; with `ches`, the pairs' CHES rows
    too (refcache's `ches_out`: the same pass), kept beside them as <key>.ches.npy."""
    # Options outside the weights that change log-probs (rope scaling, soft-capping...) live in the config.
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    extra = {"config": config}
    if cfg.ld_alpha is not None:  # LD-DPO's weighted log-probs; absent otherwise, so plain keys stay as they were
        extra["ld_alpha"] = cfg.ld_alpha
    if cfg.weights_dtype != "float32":  # bf16-rounded weights give other log-probs; float32 keys stay as they were
        extra["weights_dtype"] = cfg.weights_dtype
    key = refcache.cache_key(weights=digest, pairs=pairs, dtype=cfg.dtype, extra=extra)

    # No activations are kept for backward, so a GPU takes bigger batches; a CPU gains nothing from them.
    batch_size = cfg.batch_size * (4 if device.type == "cuda" else 1)

    ches_path = cache_dir / f"{key}.ches.npy" if ches else None

    def compute(some: list[TokenizedPair], out: Path, progress: bool = True):
        return refcache.compute(
            model,
            some,
            batch_size=batch_size,
            logps_fn=lambda m, batch: (logps_and_ches if ches else compute_logps)(m, batch, ld_alpha=cfg.ld_alpha),
            ches_out=ches_path,
            collate_fn=collate_fn,
            device=device,
            dtype=cfg.dtype,
            out=out,
            progress=progress,
        )

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--ref-cache {cache_dir}: cannot create the folder ({e.strerror})") from None
    start = time.perf_counter()
    if ches and distributed.world().size > 1:
        raise UserError("--drop-displacement: not supported with several processes yet (run it in one)")
    if ches and not _valid(ches_path, len(pairs)):  # the log-probs alone may be cached: compute both, once
        logps, hit = compute(pairs, cache_dir / f"{key}.npy"), False
    elif distributed.world().size == 1:
        logps, hit = refcache.load_or_compute(cache_dir, key, lambda out: compute(pairs, out), num_pairs=len(pairs))
    else:
        pad = _empty_rounds(cfg, model, collate_fn([pairs[0]], [0]).to(device)) if fsdp.enabled(model) else None
        logps, hit = refcache.load_or_compute_sharded(cache_dir / f"{key}.npy", pairs, batch_size, compute, pad)
    log.info(
        "%s reference log-probs: %s %s",
        what,
        "reused" if hit else f"computed in {time.perf_counter() - start:.1f} s,",
        logps.path,
    )
    return logps, (RefLogps(ches_path, len(pairs)) if ches else None)


def _empty_rounds(cfg: TrainConfig, model: torch.nn.Module, batch):
    """A sharded model's gathers involve every process: one with fewer batches of the cache pass than another runs
    this many more passes on `batch` (any pair), whose log-probs are dropped."""
    return lambda rounds: fsdp.run_empty_rounds(model, batch, rounds, False, cfg.dtype, cfg.ld_alpha)


def _valid(path: Path, num_pairs: int) -> bool:
    try:
        RefLogps(path, num_pairs)
        return True
    except ValueError:
        return False


def drop_displaced(cfg: TrainConfig, pairs: list[TokenizedPair], reference: CachedReference):
    """--drop-displacement P: the pairs without the top P% by length-normalised CHES (Razin et al. 2025, see
    `ches`), and the reference log-probs of the pairs kept, at their new positions. Logged with the count, the
    threshold and the riskiest pair: nothing is dropped silently."""
    scores = np.asarray(reference.ches.array[:, 1])
    dropped = np.argsort(-scores, kind="stable")[: math.floor(cfg.drop_displacement / 100 * len(pairs))]
    kept = np.setdiff1d(np.arange(len(pairs)), dropped)
    log.info(
        "--drop-displacement %g: dropped %d of %d pairs, CHES_norm ≥ %.4g (the riskiest: %s)",
        cfg.drop_displacement,
        len(dropped),
        len(pairs),
        scores[dropped].min() if len(dropped) else float("nan"),
        pairs[dropped[0]].where if len(dropped) else "none",
    )
    logps = copy.copy(reference.cached)
    logps.array = np.asarray(reference.cached.array[kept])  # batch.index counts positions among the kept pairs
    return [pairs[i] for i in kept], CachedReference(logps)
