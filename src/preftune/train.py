"""The DPO recipe, top to bottom: setup → loop (micro-steps → clip → step → log → checkpoint) → final model.

One optimizer step sees `batch_size × grad_accum` pairs. Each micro-batch's loss is divided by the pair (or
token) count of the whole step, so the summed gradients equal those of one big batch exactly.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from preftune import checkpoint, distributed, fsdp, lora, observe, refcache
from preftune.config import TrainConfig, write_yaml
from preftune.data.batching import PackedBatch, PaddedBatch, collate_packed, collate_padded
from preftune.data.formats import LoadReport, PreferencePair, parse_columns, read_pairs
from preftune.data.groups import group_size, grouped_order
from preftune.data.store import TokenStore
from preftune.data.tokenize import TokenizedPair, TruncationReport, iter_tokenized
from preftune.data.unpaired import ExampleReport, KLReport, check_balance, read_examples, with_kl_completions
from preftune.errors import UserError
from preftune.files import write_file_atomically
from preftune.loading import causal_lm_config, load_causal_lm, load_tokenizer
from preftune.logps import compute_logps, compute_logps_wpo, packed_layout_works
from preftune.losses import (
    MASKED_MEANS,
    OPTIONS,
    TIE_RTOL,
    combined_loss,
    example_metrics,
    kl_estimate,
    loss_params,
    pair_metrics,
    reward_kind,
)
from preftune.reference import CachedReference, ReferenceModel

log = logging.getLogger("preftune")
METRICS = "metrics.jsonl"


@dataclass
class Setup:
    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    tokenizer: object
    policy: torch.nn.Module
    reference: ReferenceModel | CachedReference | None
    eval_reference: ReferenceModel | CachedReference | None
    train_pairs: list[TokenizedPair] | TokenStore  # a TokenStore (token ids on disk) with --stream
    eval_pairs: list[TokenizedPair] | TokenStore
    steps_per_epoch: int
    total_steps: int
    layout: str
    orders: dict[int, np.ndarray | list[int]] = field(default_factory=dict)  # the current epoch's pair order
    audit: object = None  # the data audit of --data (and --eval-data), written to audit.json
    generation: observe.GenerationEval | None = None  # sampling-based evaluation on --eval-prompts
    token_dir: Path | None = None  # --stream: the folder of the token stores
    group_size: int = 1  # a grouped loss: the pairs of one row, trained as one group (data/groups.py)


# ---------------------------------------------------------------------------------------------------- setup


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device '{name}' (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available")
    return device


def _read(path: str, cfg: TrainConfig) -> tuple[Iterator[PreferencePair], LoadReport | ExampleReport]:
    """The pairs of `path` (or, for an unpaired loss, its examples), one at a time, and the report they fill as they
    go (final once the iterator is exhausted)."""
    columns = parse_columns(cfg.columns)
    loaded = ExampleReport() if cfg.unpaired else LoadReport()
    read = read_examples if cfg.unpaired else read_pairs
    return read(path, loaded, columns=columns, on_identical=cfg.on_identical), loaded


def _tokens(pairs: Iterable[PreferencePair], cfg: TrainConfig,
            tokenizer) -> tuple[Iterator[TokenizedPair], TruncationReport, KLReport | None]:
    """Token ids of `pairs`, one at a time (unpaired examples with their KL completions), and the reports."""
    trunc = TruncationReport(unit="examples" if cfg.unpaired else "pairs")
    tokens = iter_tokenized(pairs, tokenizer, trunc, max_length=cfg.max_length,
                            max_prompt_length=cfg.max_prompt_length, on_overlength=cfg.on_overlength)
    if not cfg.unpaired:
        return tokens, trunc, None
    kl = KLReport()
    return with_kl_completions(tokens, global_batch(cfg), cfg.max_length, kl), trunc, kl


def _log_read(cfg: TrainConfig, flag: str, path: str, loaded, trunc: TruncationReport, kl: KLReport | None,
              where: str = "") -> None:
    log.info("%s %s: %s", flag, path, loaded.summary())
    log.info("%s tokens: %s%s", flag, trunc.summary(), where)
    if kl is not None:
        log.info("%s: %s", flag, kl.summary())
        if flag == "--data":
            check_balance(kl, cfg.desirable_weight, cfg.undesirable_weight)


def load_data(path: str, cfg: TrainConfig, tokenizer, flag: str) -> tuple[list[TokenizedPair], list[PreferencePair]]:
    """Token ids of the pairs (or unpaired examples) of `path`, and the pairs as read (for the audit)."""
    pairs, loaded = _read(path, cfg)
    pairs = list(pairs)
    tokens, trunc, kl = _tokens(pairs, cfg, tokenizer)
    tokenized = list(tokens)
    _log_read(cfg, flag, path, loaded, trunc, kl)
    if not tokenized:
        raise UserError(f"{flag} {path}: no {trunc.unit} left to train on")
    return tokenized, pairs


TOKENS = "tokens"  # --stream: <output>/tokens/{train,eval}, the token ids of --data and --eval-data


def stream_data(path: str, cfg: TrainConfig, tokenizer, flag: str, folder: Path) -> TokenStore:
    """`load_data` for --stream: pairs are read, tokenized and appended to a TokenStore in `folder` one at a time
    (a .jsonl file line by line, a .parquet file row group by row group), so memory does not grow with the data.
    The same pairs, ids, order, counts and errors as `load_data`."""
    pairs, loaded = _read(path, cfg)
    tokens, trunc, kl = _tokens(pairs, cfg, tokenizer)
    store = TokenStore.write(folder, tokens)
    _log_read(cfg, flag, path, loaded, trunc, kl, f" (on disk in {folder})")
    if not len(store):
        raise UserError(f"{flag} {path}: no {trunc.unit} left to train on")
    return store


def check_one_step(cfg: TrainConfig, num_pairs: int) -> None:
    if num_pairs < global_batch(cfg):
        raise UserError(f"--data {cfg.data}: {num_pairs} pairs, fewer than one optimizer step "
                        f"({batch_text(cfg.batch_size, cfg.grad_accum, distributed.world().size)})")


def token_dir(cfg: TrainConfig, run_dir: Path, training: bool) -> Path:
    """Where --stream keeps token ids: inside the run folder, so they live and go with the run and no two runs
    share (or must validate) them; rebuilt from --data at every start and resume, as the in-memory path re-reads
    it. Each process of several writes its own (their run folders may be on different machines). Without a run
    (`precompute`), a temporary folder the caller removes."""
    if not training:
        return Path(tempfile.mkdtemp(prefix="preftune-tokens-"))
    me = distributed.world()
    return run_dir / TOKENS / (f"rank{me.rank}" if me.size > 1 else "")


def load_streamed(cfg: TrainConfig, tokenizer, folder: Path) -> tuple[TokenStore, list | TokenStore, int]:
    """(train store, eval store or [], `pairs_per_group`) in `folder`; on any error the folder (and a run folder this
    made) is removed: a mistake in the data leaves nothing half-written."""
    made, p = [], folder  # the folders this makes, deepest first (the run folder itself on a first start)
    while not p.exists():
        made.append(p)
        p = p.parent
    shutil.rmtree(folder, ignore_errors=True)  # a previous start's ids (--resume), or a start killed while writing
    try:
        train_pairs = stream_data(cfg.data, cfg, tokenizer, "--data", folder / "train")
        check_one_step(cfg, len(train_pairs))  # here too, and the group check below: no error may leave the ids
        eval_pairs = stream_data(cfg.eval_data, cfg, tokenizer, "--eval-data", folder / "eval") if cfg.eval_data \
            else []
        group = pairs_per_group(cfg, train_pairs, eval_pairs)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        for p in made:
            _remove_if_empty(p)
        raise
    log.info("--stream: the data audit at the start is skipped (it holds every pair in memory); run "
             "`preftune audit %s` separately", cfg.data)
    return train_pairs, eval_pairs, group


def pairs_per_group(cfg: TrainConfig, train_pairs, eval_pairs) -> int:
    """k, the pairs of one data row, with a grouped loss (data/groups.py); 1 without."""
    if not cfg.grouped:
        return 1
    k = group_size(train_pairs, "--data", cfg.grouped)
    if eval_pairs and (k_eval := group_size(eval_pairs, "--eval-data", cfg.grouped)) != k:
        raise UserError(f"--loss {cfg.grouped}: the rows of --eval-data give {k_eval} pairs each but those of --data "
                        f"{k}; both must have the same number of rejected responses")
    if cfg.batch_size % k:
        raise UserError(f"--loss {cfg.grouped}: --batch-size {cfg.batch_size} is not a multiple of {k}, the pairs "
                        "of one row of --data (each row trains as one group, in one micro-batch)")
    return k


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another process's ids) or already gone
        pass


def prepare_run_dir(cfg: TrainConfig) -> Path:
    run_dir = Path(cfg.output)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output {cfg.output}: exists and is not a folder")
    if cfg.resume:
        # A run killed before its first checkpoint still has its config.yaml: it starts again from step 0.
        if checkpoint.latest(run_dir) is None and not (run_dir / "config.yaml").exists():
            raise UserError(f"--resume: no run to resume in {cfg.output} (no checkpoint, no config.yaml)")
        saved = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").exists() else ""
        _check_same_config(cfg, saved, run_dir)
    elif run_dir.exists() and any(p.name != TOKENS for p in run_dir.iterdir()):  # tokens/: a start killed early
        raise UserError(f"--output {cfg.output}: folder is not empty; pass --resume to continue it, "
                        "or choose a new folder")
    return run_dir


def _check_same_config(cfg: TrainConfig, saved_text: str, run_dir: Path) -> None:
    import yaml

    saved = yaml.safe_load(saved_text) or {}
    now = cfg.to_dict()
    # A checkpoint holds the whole model, so the number of processes may change between runs; what must not
    # change is the global batch (it fixes every step's pairs), so --batch-size and --grad-accum may change too.
    per_process = ("batch_size", "grad_accum", "fsdp")  # --fsdp too: its checkpoints hold the whole model
    for key, value in saved.items():
        if key not in ("resume", *per_process) and now.get(key) != value:
            raise UserError(f"--resume: option {key} is {now.get(key)!r} but the run in {run_dir} used {value!r}; "
                            "an exact resume needs the same options")
    if not saved:
        return
    last = _last_launch(run_dir, saved)
    before = (last["batch_size"], last["grad_accum"], last["processes"])
    after = (cfg.batch_size, cfg.grad_accum, distributed.world().size)
    if math.prod(before) != math.prod(after):
        raise UserError(f"--resume: the run in {run_dir} took {batch_text(*before)} pairs per optimizer step, now "
                        f"{batch_text(*after)}; an exact resume needs the same global batch")


LAUNCH = "launch.json"  # how the run was last started or resumed: processes and per-process batch


def _last_launch(run_dir: Path, saved_config: dict) -> dict:
    """{"processes", "batch_size", "grad_accum"} of the run's last start or resume (a run folder without
    launch.json ran in one process with the options of its config.yaml)."""
    path = run_dir / LAUNCH
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    return {"processes": 1, "batch_size": saved_config["batch_size"], "grad_accum": saved_config["grad_accum"]}


def _write_launch(cfg: TrainConfig, run_dir: Path) -> None:
    launch = {"processes": distributed.world().size, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    write_file_atomically(run_dir / LAUNCH, json.dumps(launch) + "\n")  # --resume reads it


def setup(cfg: TrainConfig, training: bool = True) -> Setup:
    """Validate and load everything before the run folder is touched: a mistake leaves nothing half-written."""
    fsdp.check_supported(cfg)
    run_dir = prepare_run_dir(cfg) if training else Path(cfg.output)
    device = distributed.local_device(resolve_device(cfg.device))  # cuda:LOCAL_RANK with several processes
    base = lora.base_model_path(cfg.model)  # cfg.model itself, unless that folder holds only a LoRA adapter
    causal_lm_config(base, trust_remote_code=cfg.trust_remote_code, allow_pickle_weights=cfg.allow_pickle_weights)
    if cfg.ref_model:
        causal_lm_config(cfg.ref_model, trust_remote_code=cfg.trust_remote_code,
                         allow_pickle_weights=cfg.allow_pickle_weights, what="--ref-model")
    if cfg.tokenizer or base == cfg.model:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code,
                                   what="--tokenizer" if cfg.tokenizer else "--model")
    else:
        tokenizer = lora.load_adapter_tokenizer(cfg.model, base, trust_remote_code=cfg.trust_remote_code)
    tokens = token_dir(cfg, run_dir, training) if cfg.stream else None
    if tokens is not None:  # the audit needs every pair in memory: --stream skips it
        train_pairs, eval_pairs, group = load_streamed(cfg, tokenizer, tokens)
        audit = None
    else:
        train_pairs, train_raw = load_data(cfg.data, cfg, tokenizer, "--data")
    per_step = global_batch(cfg)
    check_one_step(cfg, len(train_pairs))
    if tokens is None:
        eval_pairs, eval_raw = load_data(cfg.eval_data, cfg, tokenizer, "--eval-data") if cfg.eval_data else ([], [])
        group = pairs_per_group(cfg, train_pairs, eval_pairs)
        audit = observe.audit_data(train_raw, eval_raw, unpaired=cfg.unpaired)
        del train_raw, eval_raw  # training needs only the token ids
    observe.check_generation_options(cfg)

    # Wrapped on the CPU, before moving: a fresh LoRA adapter starts from the same seeded weights on any device.
    # (A quantized base is loaded onto the device directly; peft still draws the adapter's weights on the CPU.)
    policy = lora.wrap(load_causal_lm(base, trust_remote_code=cfg.trust_remote_code,
                                      allow_pickle_weights=cfg.allow_pickle_weights, bits=lora.bits(cfg),
                                      compute_dtype=cfg.dtype, device=device), cfg).to(device)
    layout = choose_layout(cfg, policy, train_pairs, tokenizer.pad_token_id)
    steps_per_epoch = math.ceil(len(train_pairs) / per_step)
    total = cfg.max_steps if cfg.max_steps is not None else math.ceil((cfg.epochs or 1) * steps_per_epoch)
    s = Setup(cfg, run_dir, device, tokenizer, policy, None, None, train_pairs, eval_pairs, steps_per_epoch, total,
              layout, audit=audit, token_dir=tokens, group_size=group)
    if cfg.needs_reference:
        attach_reference(s)
    if cfg.eval_prompts:
        live = s.reference.model if isinstance(s.reference, ReferenceModel) else None
        s.generation = observe.GenerationEval(cfg, tokenizer, device, live)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    if cfg.fsdp and training:
        # Last: the layout check and the reference (cached, or a frozen replicated copy) used the whole policy.
        fsdp.shard(policy, device)
    return s


def attach_reference(s: Setup) -> None:
    """The reference: by default its log-probs, computed once and cached on disk, then the model is freed.

    The default reference is the policy as loaded (never re-read from disk). With the cache, the policy itself
    computes them before its first update, so no second copy is ever made; without it, a frozen copy runs at
    every step. A LoRA policy is its own reference, with or without the cache: its base with the adapter
    disabled, or its loaded adapter's initial state (see `lora`); no copy of the base is ever made.
    """
    cfg = s.cfg
    loaded = (load_causal_lm(cfg.ref_model, trust_remote_code=cfg.trust_remote_code,
                             allow_pickle_weights=cfg.allow_pickle_weights, what="--ref-model").to(s.device)
              if cfg.ref_model else None)
    if loaded is not None and s.layout == "packed":  # both models must fit the layout their batches share
        s.layout = choose_layout(cfg, loaded, s.train_pairs, s.tokenizer.pad_token_id)
    adapter = loaded is None and lora.enabled(cfg)
    if cfg.no_ref_cache or cfg.ref_update:  # TR-DPO's reference changes: a cache of it would be stale
        s.reference = s.eval_reference = (lora.live_reference(s.policy, cfg) if adapter else
                                          ReferenceModel(loaded or copy.deepcopy(s.policy), dtype=cfg.dtype))
        return
    model = loaded or s.policy
    digest = lora.reference_digest(model, cfg) if adapter else refcache.weights_digest(model)
    cache_dir = Path(cfg.ref_cache) if cfg.ref_cache else refcache.default_cache_dir()
    with lora.cache_context(model, cfg) if adapter else nullcontext():
        s.reference = CachedReference(_cached_logps(s, model, digest, s.train_pairs, cache_dir, "--data"))
        if s.eval_pairs:
            s.eval_reference = CachedReference(_cached_logps(s, model, digest, s.eval_pairs, cache_dir,
                                                             "--eval-data"))
    # Returning drops the last reference to a --ref-model: only its log-probs are kept.


def _cached_logps(s: Setup, model, digest: str, pairs: list[TokenizedPair], cache_dir: Path, what: str):
    cfg = s.cfg
    # Options outside the weights that change log-probs (rope scaling, soft-capping...) live in the config.
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    extra = {"config": config}
    if cfg.ld_alpha is not None:  # LD-DPO's weighted log-probs; absent otherwise, so plain keys stay as they were
        extra["ld_alpha"] = cfg.ld_alpha
    key = refcache.cache_key(weights=digest, pairs=pairs, dtype=cfg.dtype, extra=extra)

    # No activations are kept for backward, so a GPU takes bigger batches; a CPU gains nothing from them.
    batch_size = cfg.batch_size * (4 if s.device.type == "cuda" else 1)

    def compute(some: list[TokenizedPair], out: Path, progress: bool = True):
        return refcache.compute(model, some, batch_size=batch_size,
                                logps_fn=lambda m, batch: compute_logps(m, batch, ld_alpha=cfg.ld_alpha),
                                collate_fn=lambda ps, idx: collate(s, ps, idx), device=s.device, dtype=cfg.dtype,
                                out=out, progress=progress)

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--ref-cache {cache_dir}: cannot create the folder ({e.strerror})") from None
    start = time.perf_counter()
    if distributed.world().size == 1:
        logps, hit = refcache.load_or_compute(cache_dir, key, lambda out: compute(pairs, out), num_pairs=len(pairs))
    else:
        logps, hit = refcache.load_or_compute_sharded(cache_dir / f"{key}.npy", pairs, batch_size, compute)
    log.info("%s reference log-probs: %s %s", what, "reused" if hit else
             f"computed in {time.perf_counter() - start:.1f} s,", logps.path)
    return logps


def choose_layout(cfg: TrainConfig, policy, pairs: list[TokenizedPair], pad_id: int) -> str:
    """The packed layout when it gives this model's exact log-probs on a few pairs, else the plain one."""
    if cfg.layout == "padded":
        return "padded"
    # Short pieces of two real pairs: the check is about the model, and full-length plain logits are large.
    probe = [TokenizedPair(p.prompt_ids[-16:], p.chosen_ids[:8], p.rejected_ids[:8], p.where) for p in pairs[:2]]
    problem = packed_layout_works(policy, probe, pad_id)
    if problem:
        log.warning("packed layout does not fit %s (%s): using the plain padded layout",
                    type(policy).__name__, problem)
        return "padded"
    return "packed"


# ---------------------------------------------------------------------------------------------------- data order


def global_batch(cfg: TrainConfig) -> int:
    """Pairs per optimizer step over all processes: --batch-size × --grad-accum × processes."""
    return cfg.batch_size * cfg.grad_accum * distributed.world().size


def batch_text(batch_size: int, grad_accum: int, processes: int) -> str:
    """'--batch-size 4 × --grad-accum 2 × 2 processes = 16' (the processes only when more than one)."""
    many = f" × {processes} processes" if processes > 1 else ""
    return f"--batch-size {batch_size} × --grad-accum {grad_accum}{many} = {batch_size * grad_accum * processes}"


def step_pairs(s: Setup, step: int) -> list[int]:
    """Dataset indices of the pairs of optimizer step `step` (0-based), over all processes (see `global_batch`);
    each process trains on its contiguous share of them (`distributed.share`).

    The order is a pure function of (seed, epoch): resuming at a step needs no saved data-loader state, and with
    the same global batch a step holds the same pairs whatever the number of processes. It is computed once per
    epoch (a shuffle, and a sort with --group-by-length, are O(n) or more per call).
    """
    epoch, k = divmod(step, s.steps_per_epoch)
    if epoch not in s.orders:
        s.orders = {epoch: epoch_order(s.train_pairs, s.cfg, epoch, s.group_size)}
    size = global_batch(s.cfg)
    chunk = s.orders[epoch][k * size:(k + 1) * size]
    return chunk.tolist() if isinstance(chunk, np.ndarray) else chunk


def epoch_order(pairs: list[TokenizedPair], cfg: TrainConfig, epoch: int, group: int = 1) -> np.ndarray | list[int]:
    """The epoch's dataset indices: an int64 array (8 bytes a pair, where a list of ints takes ~36: with --stream it
    is the one thing held per pair), or with --group-by-length a list (its sort reads every pair's length anyway).
    `group` > 1 (a grouped loss): the groups of `group` consecutive pairs are shuffled, each kept whole."""
    n = len(pairs) // group
    generator = torch.Generator().manual_seed(cfg.seed + epoch)
    order = grouped_order(np.arange(n) if cfg.no_shuffle else torch.randperm(n, generator=generator).numpy(), group)
    if not cfg.group_by_length:
        return order
    order = order.tolist()
    # Sort windows of 16 steps by length, cut them into steps, then shuffle the steps: pairs of a step have
    # similar lengths (little padding) while the step order stays random.
    size = global_batch(cfg)
    length = lambda i: len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids)  # noqa: E731
    window = 16 * size
    grouped = [i for w in range(0, n, window) for i in sorted(order[w:w + window], key=length, reverse=True)]
    steps = [grouped[i:i + size] for i in range(0, n, size)]
    if not cfg.no_shuffle:
        steps = [steps[j] for j in torch.randperm(len(steps), generator=generator).tolist()]
    return [i for chunk in steps for i in chunk]


def collate(s: Setup, pairs: list[TokenizedPair], indices: list[int]) -> PackedBatch | PaddedBatch:
    if s.layout == "packed":
        return collate_packed(pairs, indices, s.tokenizer.pad_token_id, s.cfg.pack_tokens or None)
    return collate_padded(pairs, indices, s.tokenizer.pad_token_id)


def micro_batches(s: Setup, pairs: list[TokenizedPair], indices: list[int]) -> list[PackedBatch | PaddedBatch]:
    size = s.cfg.batch_size
    chunks = [indices[i:i + size] for i in range(0, len(indices), size)]
    return [collate(s, [pairs[i] for i in c], c).to(s.device) for c in chunks]


# ---------------------------------------------------------------------------------------------------- one step


def autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def batch_loss(s: Setup, batch: PackedBatch | PaddedBatch, reference, num_pairs: int, num_chosen_tokens: int):
    """Loss of one micro-batch, normalised by the whole step's counts, and its per-pair metrics.

    Rewards, margins and accuracies are logged with the normalisation of the loss trained (`reward_kind`).
    """
    cfg = s.cfg
    pair_weights = None
    with autocast(s.device, cfg.dtype):
        if cfg.wpo:  # WPO: each pair weighted by exp(mean aligned log-prob) of its chosen × its rejected response
            chosen, rejected, chosen_len, rejected_len, chosen_w, rejected_w = compute_logps_wpo(
                s.policy, batch, ld_alpha=cfg.ld_alpha)
            pair_weights = torch.exp(chosen_w + rejected_w)
        else:
            chosen, rejected, chosen_len, rejected_len = compute_logps(s.policy, batch, ld_alpha=cfg.ld_alpha)
    if reference is not None:
        ref_chosen, ref_rejected = reference.logps(batch, ld_alpha=cfg.ld_alpha)
    else:  # reference-free losses: no reference exists; the losses ignore these zeros
        ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
    kl = reference_point(rejected, ref_rejected) if needs_kl(cfg) else None
    loss = combined_loss(cfg.losses, cfg.weights, policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                         ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected, chosen_lengths=chosen_len,
                         rejected_lengths=rejected_len, num_pairs=num_pairs, num_chosen_tokens=num_chosen_tokens,
                         pair_weights=pair_weights, labels=batch.labels, kl=kl, group_size=s.group_size,
                         **{option: getattr(cfg, option) for option in OPTIONS})
    if cfg.unpaired:
        return loss, example_metrics(chosen, ref_chosen, batch.labels, cfg.beta, kl)
    metrics = pair_metrics(chosen.detach(), rejected.detach(), ref_chosen, ref_rejected, cfg.beta,
                           reward=reward_kind(cfg.losses), chosen_lengths=chosen_len, rejected_lengths=rejected_len,
                           tie_rtol=TIE_RTOL[cfg.dtype])
    if pair_weights is not None:
        metrics["wpo/weights"] = pair_weights
    return loss, metrics


def needs_kl(cfg: TrainConfig) -> bool:
    return any("kl" in loss_params(name) for name in cfg.losses)


def reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z for a micro-batch: max(0, mean log-ratio of the mismatched completions) over this micro-batch and
    those the other processes run at the same time (as TRL's gather over devices); see `pad_kl_rounds`."""
    total = distributed.all_reduce_sum(kl_estimate(policy_kl_logps, ref_kl_logps))
    return (total[0] / total[1]).clamp(min=0)


def pad_kl_rounds(s: Setup, done: int, num_items: int) -> None:
    """Every process takes part in each micro-batch's KL all-reduce; a process with fewer micro-batches this step
    (shares differ by one item) adds zeros for the rounds it has no micro-batch for, so none waits forever."""
    if not needs_kl(s.cfg) or distributed.world().size == 1:
        return
    largest_share = -(-num_items // distributed.world().size)
    for _ in range(-(-largest_share // s.cfg.batch_size) - done):
        distributed.all_reduce_sum(torch.zeros(2, device=s.device))


def _add(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    """Sum per-pair metrics on the device: no host sync until the step is logged."""
    for key, value in metrics.items():
        total = value.float().sum()
        sums[key] = sums[key] + total if key in sums else total


def step_counts(pairs: list[TokenizedPair], indices: list[int]) -> tuple[int, int]:
    """(pairs, chosen response tokens) of a step over all processes: the loss's denominators. Every process holds
    every pair, so each one counts them itself, without communication."""
    return len(indices), sum(len(pairs[i].chosen_ids) for i in indices)


def run_pairs(s: Setup, batches: list[PackedBatch | PaddedBatch], reference, backward: bool,
              counts: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Forward (and backward) over this process's micro-batches of one step; returns device sums of the metrics.

    `counts` = `step_counts` of the whole step: each micro-batch's loss is divided by them, so the gradients summed
    over micro-batches and processes are those of the whole step as one batch."""
    num_pairs, num_chosen_tokens = counts
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        with nullcontext() if backward else torch.no_grad():
            loss, metrics = batch_loss(s, batch, reference, num_pairs, num_chosen_tokens)
        if backward:
            loss.backward()
        _add(sums, metrics)
        _add(sums, {"loss": loss.detach()})
    pad_kl_rounds(s, len(batches), num_pairs)
    return sums


def per_pair(sums: dict[str, torch.Tensor], num_pairs: int) -> dict[str, torch.Tensor]:
    """Per-pair means of summed metrics, still on the device (the loss is already normalised by the step).

    Unpaired examples: the desirable ("chosen") and undesirable ("rejected") metrics are means over their own
    examples (MASKED_MEANS; NaN when the step has none, left out of the log), the margin their difference, and the
    label counts become `desirable_share`."""
    means = {k: v if k == "loss" else v / num_pairs for k, v in sums.items()}
    if "count/desirable" not in sums:
        return means
    for key, count in MASKED_MEANS.items():
        means[key] = sums[key] / sums[count]
    means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    means["desirable_share"] = means.pop("count/desirable")
    del means["count/undesirable"]
    return means


def evaluate(s: Setup, step: int) -> dict[str, float]:
    """eval/* metrics: held-out pairs (split across processes) and sampling on --eval-prompts (rank 0)."""
    metrics = evaluate_pairs(s) if s.eval_pairs else {}
    if s.generation is not None and distributed.world().is_main:
        metrics.update(s.generation(s.policy, step, s.run_dir))
    return metrics


def evaluate_pairs(s: Setup) -> dict[str, float]:
    s.policy.eval()
    indices = list(range(len(s.eval_pairs)))
    me = distributed.world()
    batches = micro_batches(s, s.eval_pairs, distributed.share(indices, me.rank, me.size, s.group_size))
    sums = run_pairs(s, batches, s.eval_reference, backward=False, counts=step_counts(s.eval_pairs, indices))
    fsdp.pad_rounds(s, len(batches), len(indices), backward=False)
    metrics = per_pair(distributed.sum_scalars(sums, s.device, len(indices) // s.group_size), len(indices))
    values = torch.stack(list(metrics.values())).tolist()  # one host sync
    s.policy.train()
    return {"eval/" + k: v for k, v in without_empty_means(dict(zip(metrics, values))).items()}


def without_empty_means(metrics: dict[str, float]) -> dict[str, float]:
    """Unpaired examples: drop the means over the desirable (or undesirable) examples of a step that had none (NaN,
    0 / 0), as TRL's KTOTrainer logs nothing for them; pair metrics are returned as they are."""
    if "desirable_share" not in metrics:
        return metrics
    empty = {k for k in (*MASKED_MEANS, "rewards/margins") if math.isnan(metrics[k])}
    return {k: v for k, v in metrics.items() if k not in empty}


# ---------------------------------------------------------------------------------------------------- the loop


def make_optimizer(s: Setup):
    from transformers import get_scheduler

    params = [p for p in s.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.cfg.learning_rate, weight_decay=s.cfg.weight_decay)
    name = {"constant": "constant_with_warmup"}.get(s.cfg.lr_scheduler, s.cfg.lr_scheduler)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=s.cfg.warmup_steps, num_training_steps=s.total_steps)
    return optimizer, scheduler


def start_or_resume(s: Setup, optimizer, scheduler) -> int:
    """Write the run's config, or restore the newest checkpoint; return the first step to run.

    Every process restores the same checkpoint (whatever number of processes wrote it: it holds the whole model);
    only rank 0 writes."""
    cfg = s.cfg
    distributed.barrier()  # every process has checked the run folder (in `setup`) before rank 0 writes into it
    path = checkpoint.latest(s.run_dir) if cfg.resume else None
    if path is None:

        def start() -> None:
            s.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.resume:
                log.info("no checkpoint in %s yet: starting again from step 0", s.run_dir)
                _truncate_metrics(s.run_dir / METRICS, 0)
            _write_launch(cfg, s.run_dir)
            write_yaml(cfg, s.run_dir / "config.yaml")

        distributed.on_main(start)
        torch.manual_seed(cfg.seed)
        return 0
    step = checkpoint.load(path, s.policy, optimizer, scheduler, reference=_drifted_reference(s, step=None),
                           sharded=fsdp.enabled(s.policy))
    distributed.on_main(_truncate_metrics, s.run_dir / METRICS, step)
    distributed.on_main(_write_launch, cfg, s.run_dir)
    log.info("resumed from %s (step %d of %d)", path, step, s.total_steps)
    return step


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines written after the checkpoint: they are about to be recomputed."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and not lines[-1].endswith("}"):  # a line cut by a kill mid-write
        lines.pop()
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def check_finite(record: dict[str, float], step: int) -> None:
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(record[k])]
    if bad and not record.get("skipped"):
        raise UserError(f"step {step}: {bad[0]} is {record[bad[0]]}; stopping before a broken model is saved "
                        "(try a lower --learning-rate or --dtype float32)")


@dataclass
class StepMetrics:
    """One optimizer step's metrics, still on the device until the log interval ends."""

    step: int
    lr: float
    pairs: int
    tokens: int
    keys: list[str]
    values: torch.Tensor


def train_step(s: Setup, step: int, optimizer, scheduler) -> StepMetrics:
    cfg = s.cfg
    indices = step_pairs(s, step)  # the whole step's pairs, over all processes
    me = distributed.world()
    batches = micro_batches(s, s.train_pairs, distributed.share(indices, me.rank, me.size, s.group_size))
    optimizer.zero_grad(set_to_none=True)
    sums = run_pairs(s, batches, s.reference, backward=True, counts=step_counts(s.train_pairs, indices))
    fsdp.pad_rounds(s, len(batches), len(indices), backward=True)
    # Every process adds up the others' gradients and metric sums: all replicas take the same update.
    if not fsdp.enabled(s.policy):  # FSDP2 has already reduce-scattered them, in backward
        distributed.sum_gradients(s.policy.parameters())
    sums = distributed.sum_scalars(sums, s.device, len(indices) // s.group_size)  # the groups shared out
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = fsdp.full_tensor(torch.nn.utils.clip_grad_norm_(s.policy.parameters(), max_norm))
    lr = scheduler.get_last_lr()[0]
    metrics = {**per_pair(sums, len(indices)), "grad_norm": grad_norm.float()}
    # --skip-nonfinite looks at the values before the update: one host sync per step.
    skip = cfg.skip_nonfinite and not bool(torch.isfinite(sums["loss"]) & torch.isfinite(grad_norm))
    if cfg.skip_nonfinite:
        metrics["skipped"] = torch.tensor(float(skip), device=grad_norm.device)
    if skip:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    scheduler.step()  # a skipped step still counts: the schedule follows the step number, as on resume
    if cfg.ref_update and (step + 1) % cfg.ref_update_every == 0:  # TR-DPO, after the update as TRL's callback
        s.reference.update(s.policy, 1.0 if cfg.ref_update == "hard" else cfg.ref_update_alpha)
    # Tokens as `num_tokens` of the batches counts them (both prompts), over all processes.
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                 for p in (s.train_pairs[i] for i in indices))
    return StepMetrics(step + 1, lr, len(indices), tokens, list(metrics), torch.stack(list(metrics.values())))


def to_records(pending: list[StepMetrics], elapsed: float) -> list[dict[str, float]]:
    """Bring the interval's metrics to the host in one transfer (the only sync) and check they are finite."""
    rows = torch.stack([p.values for p in pending]).tolist()
    per_step = elapsed / len(pending)  # steps of an interval are timed together: timing one would sync
    records = []
    for p, row in zip(pending, rows):
        record = {"step": p.step, **without_empty_means(dict(zip(p.keys, row))), "lr": p.lr,
                  "pairs_per_s": p.pairs / per_step, "tokens_per_s": p.tokens / per_step, "step_time_s": per_step}
        check_finite(record, p.step)
        records.append(record)
    return records


def progress_fields(record: dict[str, float]) -> dict[str, str]:
    """The progress bar's loss, and the pair accuracy (or, for unpaired examples, KTO's KL estimate)."""
    shown = {"loss": f"{record['loss']:.4f}"}
    for key, name in (("rewards/accuracies", "acc"), ("kl", "kl")):
        if key in record:
            shown[name] = f"{record[key]:.2f}"
    return shown


def save_final(s: Setup, state: dict | None = None) -> Path:
    """final/: the model, or with LoRA the adapter (PeftModel.from_pretrained loads it onto its base); with
    --merge also final-merged/, the base with the adapter merged in (a plain model folder). Tokenizer in both."""
    final = s.run_dir / "final"
    adapter = lora.enabled(s.cfg)

    def fill(tmp: Path) -> None:
        if adapter:
            lora.save_adapter(s.policy, tmp, s.cfg)
        else:
            s.policy.save_pretrained(tmp, safe_serialization=True, state_dict=state)  # state: gathered by --fsdp
        s.tokenizer.save_pretrained(tmp)

    checkpoint.write_atomically(final, fill)
    if adapter and s.cfg.merge:  # after final/: merging changes the policy in place

        def fill_merged(tmp: Path) -> None:
            lora.merge(s.policy, s.cfg).save_pretrained(tmp, safe_serialization=True)
            s.tokenizer.save_pretrained(tmp)

        checkpoint.write_atomically(s.run_dir / "final-merged", fill_merged)
    return final


@distributed.launched  # under torchrun: join the other processes first (a no-op for one process)
def train(cfg: TrainConfig) -> Path:
    s = setup(cfg)
    optimizer, scheduler = make_optimizer(s)
    first = start_or_resume(s, optimizer, scheduler)
    s.policy.train()
    main = distributed.world().is_main  # only rank 0 writes files and shows progress
    unit = "examples" if cfg.unpaired else "pairs"
    log.info("training %d steps of %d %s (%d %s, %d steps per epoch) on %s%s", s.total_steps, global_batch(cfg), unit,
             len(s.train_pairs), unit, s.steps_per_epoch, s.device,
             f" × {distributed.world().size} processes" if distributed.world().size > 1 else "")
    has_eval = bool(s.eval_pairs) or s.generation is not None
    watcher = observe.Watcher(cfg, s.total_steps, observe.kept_records(s.run_dir / METRICS) if main else [])
    if s.audit is not None:  # None with --stream
        distributed.on_main(observe.write_audit, s.audit, s.run_dir)
    pending: list[StepMetrics] = []
    skipped = 0
    clock = time.perf_counter()
    # The bar closes before an error propagates, so the error stays the last line the user sees.
    with (tqdm(total=s.total_steps, initial=first, desc="train", unit="step", dynamic_ncols=True,
               disable=not main) as bar,
          open(s.run_dir / METRICS if main else os.devnull, "a", encoding="utf-8") as metrics_file):
        for step in range(first, s.total_steps):
            pending.append(train_step(s, step, optimizer, scheduler))
            done = step + 1
            last = done == s.total_steps
            evaluate_now = has_eval and ((cfg.eval_every and done % cfg.eval_every == 0) or last)
            save_now = bool(cfg.save_every) and done % cfg.save_every == 0 and not last
            if done % cfg.log_every == 0 or evaluate_now or save_now or last:
                records = to_records(pending, time.perf_counter() - clock)  # raises before a NaN model is saved
                if evaluate_now:
                    records[-1].update(evaluate(s, done))
                if main:
                    watcher.observe(records)
                distributed.on_main(writing, s, METRICS, lambda records=records: (
                    metrics_file.write("".join(json.dumps(r) + "\n" for r in records)), metrics_file.flush()))
                skipped += sum(int(r.get("skipped", 0)) for r in records)
                bar.set_postfix(progress_fields(records[-1]), refresh=False)
                bar.update(len(records))
                pending, clock = [], time.perf_counter()
            if save_now:
                states = fsdp.full_states(s.policy, optimizer) if fsdp.enabled(s.policy) else None  # all gather
                distributed.on_main(save_checkpoint, s, done, optimizer, scheduler, states)
                clock = time.perf_counter()
            after_step(done)
    if skipped:
        log.warning("skipped %d step%s with a non-finite loss or gradient (--skip-nonfinite)", skipped,
                    "s" * (skipped != 1))
    whole = fsdp.full_model_state(s.policy, drop_tied=False) if fsdp.enabled(s.policy) else None  # all gather
    final = distributed.on_main(writing, s, "the final model",
                                lambda: save_final(s) if whole is None else save_final(s, whole),
                                default=s.run_dir / "final")
    if not cfg.no_report:
        distributed.on_main(observe.write_report, s.run_dir)
    log.info("done: %s", final)
    return final


def _drifted_reference(s: Setup, step: int | None) -> torch.nn.Module | None:
    """The live reference model when TR-DPO has updated it by `step` (None: at any step; a checkpoint holds it only
    then), else None: an unchanged reference is the loaded model again, so it is not saved."""
    if not s.cfg.ref_update or (step is not None and step < s.cfg.ref_update_every):
        return None
    return s.reference.model


def save_checkpoint(s: Setup, step: int, optimizer, scheduler, states: tuple[dict, dict] | None = None) -> None:
    """`states`: the whole model and optimizer state gathered from --fsdp's shards (`fsdp.full_states`)."""
    writing(s, f"checkpoint step {step}", lambda: checkpoint.save(s.run_dir, step, s.policy, optimizer, scheduler,
                                                                  reference=_drifted_reference(s, step), states=states))
    if s.cfg.keep_last:
        checkpoint.prune(s.run_dir, s.cfg.keep_last)


def writing(s: Setup, what: str, write):
    """Run `write`; a full disk or a permission error becomes one line that says what is still intact."""
    try:
        return write()
    except OSError as e:
        previous = checkpoint.latest(s.run_dir)
        kept = f"the newest checkpoint {previous} is intact" if previous else "no checkpoint was written yet"
        raise UserError(f"--output {s.run_dir}: cannot write {what} ({e.strerror or e}); {kept}") from None


def precompute(cfg: TrainConfig) -> None:
    """Fill the reference cache for --data (and --eval-data) so that `train` with the same options skips it."""
    if not cfg.needs_reference or cfg.no_ref_cache or cfg.ref_update:
        live = "--no-ref-cache" if cfg.no_ref_cache else "--ref-update"
        raise UserError(f"precompute: nothing to do with --loss {cfg.loss}" +
                        (f" and {live}" if cfg.no_ref_cache or cfg.ref_update else ": it uses no reference"))
    s = setup(cfg, training=False)
    if s.token_dir is not None:  # --stream: the ids served the reference pass only
        shutil.rmtree(s.token_dir, ignore_errors=True)


def after_step(step: int) -> None:
    """A hook for tests that interrupt a run at a given step; does nothing."""
