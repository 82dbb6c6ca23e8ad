"""The DPO recipe, top to bottom: setup → loop (micro-steps → clip → step → log → checkpoint) → final model.

One optimizer step sees `batch_size × grad_accum` pairs. Each micro-batch's loss is divided by the pair (or
token) count of the whole step, so the summed gradients equal those of one big batch exactly.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from preftune import checkpoint, distributed, fsdp, lora, observe, rundir
from preftune.config import TrainConfig, write_yaml
from preftune.data.audit import AuditReport
from preftune.data.batching import PackedBatch, PaddedBatch, collate
from preftune.data.load import check_one_step, epoch_order, global_batch, load_data, load_streamed, pairs_per_group
from preftune.data.store import TokenStore
from preftune.data.tokenize import TokenizedPair
from preftune.device import autocast, resolve_device
from preftune.errors import UserError
from preftune.loading import base_model_path, causal_lm_config, checkpoint_activations, load_run_tokenizer
from preftune.logps import choose_layout, compute_logps, compute_logps_wpo
from preftune.losses import OPTIONS, TIE_RTOL, combined_loss, example_metrics, kl_estimate, pair_metrics, reward_kind
from preftune.malloc import fix_malloc_thresholds
from preftune.metrics import (
    StepMetrics,
    add_sums,
    append_records,
    per_pair,
    progress_fields,
    step_counts,
    to_records,
    without_empty_means,
)
from preftune.reference import Reference
from preftune.refsetup import build_references, drop_displaced

log = logging.getLogger("preftune")
Pairs = list[TokenizedPair] | TokenStore  # a TokenStore (token ids on disk) with --stream


@dataclass
class Setup:
    """Everything a run holds, loaded and checked by `setup` before the run folder is touched."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    policy: torch.nn.Module
    train_pairs: Pairs
    eval_pairs: Pairs | list
    layout: str  # "packed" or "padded" (logps.choose_layout)
    reference: Reference | None = None  # None: a reference-free loss
    eval_reference: Reference | None = None
    orders: dict[int, np.ndarray | list[int]] = field(default_factory=dict)  # the current epoch's pair order
    audit: AuditReport | None = None  # the data audit of --data (and --eval-data), written to audit.json
    generation: observe.GenerationEval | None = None  # sampling-based evaluation on --eval-prompts
    token_dir: Path | None = None  # --stream: the folder of the token stores
    group_size: int = 1  # a grouped loss: the pairs of one row, trained as one group (data/groups.py)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_pairs) / global_batch(self.cfg))

    @property
    def total_steps(self) -> int:
        """--max-steps, else --epochs (default 1) passes over the data."""
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        return math.ceil((self.cfg.epochs or 1) * self.steps_per_epoch)


# ---------------------------------------------------------------------------------------------------- setup


def setup(cfg: TrainConfig, training: bool = True) -> Setup:
    """Validate and load everything before the run folder is touched: a mistake leaves nothing half-written."""
    fsdp.check_supported(cfg)
    run_dir = rundir.prepare_run_dir(cfg, distributed.world().size) if training else Path(cfg.output)
    device = distributed.local_device(resolve_device(cfg.device))  # cuda:LOCAL_RANK with several processes
    base = base_model_path(cfg.model)  # cfg.model itself, unless that folder holds only a LoRA adapter
    for folder, what in ((base, "--model"), (cfg.ref_model, "--ref-model")):
        if folder:  # checked before any data is read: a wrong folder is the quickest mistake to report
            causal_lm_config(
                folder,
                trust_remote_code=cfg.trust_remote_code,
                allow_pickle_weights=cfg.allow_pickle_weights,
                what=what,
            )
    tokenizer = load_run_tokenizer(cfg.model, base, cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    me = distributed.world()
    tokens = rundir.token_dir(run_dir, training, me.rank, me.size) if cfg.stream else None
    train_pairs, eval_pairs, group, audit = load_pairs(cfg, tokenizer, tokens)
    observe.check_generation_options(cfg)

    # --fsdp: sharded as it is loaded; the layout check and the reference then run on the sharded model.
    policy = (fsdp.load_policy if cfg.fsdp and training else lora.load_policy)(base, cfg, device)
    layout = choose_layout(cfg.layout, policy, train_pairs, tokenizer.pad_token_id)
    s = Setup(
        cfg,
        run_dir,
        device,
        tokenizer,
        policy,
        train_pairs,
        eval_pairs,
        layout,
        audit=audit,
        token_dir=tokens,
        group_size=group,
    )
    if cfg.needs_reference:
        attach_reference(s)
    if cfg.drop_displacement is not None:
        s.train_pairs, s.reference = drop_displaced(cfg, s.train_pairs, s.reference)
        check_one_step(cfg, len(s.train_pairs))
    if cfg.eval_prompts:
        live = getattr(s.reference, "model", None)  # a frozen copy to sample from, when there is one
        s.generation = observe.GenerationEval(cfg, tokenizer, device, live)
    if cfg.gradient_checkpointing:
        checkpoint_activations(policy)
    policy.config.use_cache = False
    return s


def load_pairs(cfg: TrainConfig, tokenizer, tokens: Path | None) -> tuple[Pairs, Pairs | list, int, AuditReport | None]:
    """(training pairs, eval pairs, pairs per group, the data audit): in memory and audited, or with --stream
    (`tokens`: their folder) on disk and not audited (the audit needs every pair in memory)."""
    if tokens is not None:
        return *load_streamed(cfg, tokenizer, tokens), None
    train_pairs, train_raw = load_data(cfg.data, cfg, tokenizer, "--data")
    check_one_step(cfg, len(train_pairs))
    eval_pairs, eval_raw = load_data(cfg.eval_data, cfg, tokenizer, "--eval-data") if cfg.eval_data else ([], [])
    group = pairs_per_group(cfg, train_pairs, eval_pairs)
    return train_pairs, eval_pairs, group, observe.audit_data(train_raw, eval_raw, unpaired=cfg.unpaired)


def attach_reference(s: Setup) -> None:
    """The reference (`refsetup`): cached log-probs by default, else a live model; a --ref-model may change the
    layout both models share."""
    s.reference, s.eval_reference, s.layout = build_references(
        s.cfg, s.policy, s.layout, s.train_pairs, s.eval_pairs, s.tokenizer.pad_token_id, s.device
    )


# ---------------------------------------------------------------------------------------------------- data order


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
    chunk = s.orders[epoch][k * size : (k + 1) * size]
    return chunk.tolist() if isinstance(chunk, np.ndarray) else chunk


def micro_batches(s: Setup, pairs: list[TokenizedPair], indices: list[int]) -> list[PackedBatch | PaddedBatch]:
    size = s.cfg.batch_size
    chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
    return [
        collate(s.layout, [pairs[i] for i in c], c, s.tokenizer.pad_token_id, s.cfg.pack_tokens or None).to(s.device)
        for c in chunks
    ]


# ---------------------------------------------------------------------------------------------------- one step


def batch_loss(
    s: Setup, batch: PackedBatch | PaddedBatch, reference: Reference | None, num_pairs: int, num_chosen_tokens: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch, normalised by the whole step's counts, and its per-pair metrics.

    What each loss needs (lengths, labels, KTO's reference point, groups) is passed by name; `combined_loss` hands
    each loss the ones it declares. Rewards, margins and accuracies are logged with the normalisation of the loss
    trained (`reward_kind`).
    """
    cfg = s.cfg
    with autocast(s.device, cfg.dtype):
        policy = (compute_logps_wpo if cfg.wpo else compute_logps)(s.policy, batch, ld_alpha=cfg.ld_alpha)
    # WPO: each pair weighted by exp(mean aligned log-prob) of its chosen × its rejected response.
    pair_weights = torch.exp(policy.chosen_log_weights + policy.rejected_log_weights) if cfg.wpo else None
    if reference is not None:
        ref_chosen, ref_rejected = reference.logps(batch, ld_alpha=cfg.ld_alpha)
    else:  # reference-free losses: no reference exists; the losses ignore these zeros
        ref_chosen, ref_rejected = torch.zeros_like(policy.chosen), torch.zeros_like(policy.rejected)
    kl = reference_point(policy.rejected, ref_rejected) if cfg.needs_kl else None
    loss = combined_loss(
        cfg.losses,
        cfg.weights,
        policy_chosen_logps=policy.chosen,
        policy_rejected_logps=policy.rejected,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_lengths=policy.chosen_lengths,
        rejected_lengths=policy.rejected_lengths,
        num_pairs=num_pairs,
        num_chosen_tokens=num_chosen_tokens,
        pair_weights=pair_weights,
        labels=batch.labels,
        kl=kl,
        group_size=s.group_size,
        **{option: getattr(cfg, option) for option in OPTIONS},
    )
    if cfg.unpaired:  # examples, not pairs: the desirable and undesirable ones are averaged apart
        return loss, example_metrics(policy.chosen, ref_chosen, batch.labels, cfg.beta, kl)
    metrics = pair_metrics(
        policy.chosen.detach(),
        policy.rejected.detach(),
        ref_chosen,
        ref_rejected,
        cfg.beta,
        reward=reward_kind(cfg.losses),
        chosen_lengths=policy.chosen_lengths,
        rejected_lengths=policy.rejected_lengths,
        tie_rtol=TIE_RTOL[cfg.dtype],
    )
    if pair_weights is not None:
        metrics["wpo/weights"] = pair_weights
    return loss, metrics


def reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z for a micro-batch: max(0, mean log-ratio of the mismatched completions) over this micro-batch and
    those the other processes run at the same time (as TRL's gather over devices); see `pad_rounds`."""
    total = distributed.all_reduce_sum(kl_estimate(policy_kl_logps, ref_kl_logps))
    return (total[0] / total[1]).clamp(min=0)


def pad_rounds(s: Setup, pairs: Pairs, done: int, num_items: int, backward: bool) -> None:
    """Every process takes part in each micro-batch's collectives (KTO's KL all-reduce, FSDP's gathers); a process
    with fewer micro-batches in this step (shares differ by one item) runs empty rounds for those it lacks, so none
    waits forever. `done`: micro-batches run here; `num_items`: pairs of the whole step, over all processes."""
    rounds = distributed.missing_rounds(num_items, s.cfg.batch_size, done)
    if not rounds:
        return
    if fsdp.enabled(s.policy):
        [batch] = micro_batches(s, pairs, [0])  # any pair: its values are multiplied by zero
        fsdp.run_empty_rounds(s.policy, batch, rounds, backward, s.cfg.dtype, s.cfg.ld_alpha, s.reference)
    elif s.cfg.needs_kl:
        for _ in range(rounds):
            distributed.all_reduce_sum(torch.zeros(2, device=s.device))


def run_pairs(
    s: Setup, batches: list[PackedBatch | PaddedBatch], reference, backward: bool, counts: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Forward (and backward) over this process's micro-batches of one step; returns device sums of the metrics.

    `counts` = `step_counts` of the whole step: each micro-batch's loss is divided by them, so the gradients summed
    over micro-batches and processes are those of the whole step as one batch."""
    num_pairs, num_chosen_tokens = counts
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        with torch.enable_grad() if backward else torch.no_grad():
            loss, metrics = batch_loss(s, batch, reference, num_pairs, num_chosen_tokens)
        if backward:
            loss.backward()
        add_sums(sums, metrics)
        add_sums(sums, {"loss": loss.detach()})
    return sums


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
    pad_rounds(s, s.eval_pairs, len(batches), len(indices), backward=False)
    metrics = per_pair(distributed.sum_scalars(sums, s.device, len(indices) // s.group_size), len(indices))
    values = torch.stack(list(metrics.values())).tolist()  # one host sync
    s.policy.train()
    return {"eval/" + k: v for k, v in without_empty_means(dict(zip(metrics, values))).items()}


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
    path = rundir.latest_checkpoint(s.run_dir) if cfg.resume else None
    if path is None:

        def start() -> None:
            s.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg.resume:
                log.info("no checkpoint in %s yet: starting again from step 0", s.run_dir)
                rundir.truncate_metrics(s.run_dir / rundir.METRICS, 0)
            rundir.write_launch(cfg, s.run_dir, distributed.world().size)
            write_yaml(cfg, s.run_dir / rundir.CONFIG)

        distributed.on_main(start)
        torch.manual_seed(cfg.seed)
        return 0
    sharded = (
        (lambda path, optimizer_state: fsdp.load_checkpoint(path, s.policy, optimizer, optimizer_state))
        if fsdp.enabled(s.policy)
        else None
    )
    step = checkpoint.load(
        path, s.policy, optimizer, scheduler, reference=_drifted_reference(s, step=None), load_states=sharded
    )
    distributed.on_main(rundir.truncate_metrics, s.run_dir / rundir.METRICS, step)
    distributed.on_main(rundir.write_launch, cfg, s.run_dir, distributed.world().size)
    log.info("resumed from %s (step %d of %d)", path, step, s.total_steps)
    return step


def train_step(s: Setup, step: int, optimizer, scheduler) -> StepMetrics:
    cfg = s.cfg
    indices = step_pairs(s, step)  # the whole step's pairs, over all processes
    me = distributed.world()
    batches = micro_batches(s, s.train_pairs, distributed.share(indices, me.rank, me.size, s.group_size))
    optimizer.zero_grad(set_to_none=True)
    sums = run_pairs(s, batches, s.reference, backward=True, counts=step_counts(s.train_pairs, indices))
    pad_rounds(s, s.train_pairs, len(batches), len(indices), backward=True)
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
    tokens = sum(
        2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in (s.train_pairs[i] for i in indices)
    )
    return StepMetrics(step + 1, lr, len(indices), tokens, list(metrics), torch.stack(list(metrics.values())))


def save_final(s: Setup, state: checkpoint.ModelFiles | dict | None = None) -> Path:
    """final/ (and final-merged/), see `checkpoint.save_final`; `state`: --fsdp's `fsdp.final_weights`."""
    return checkpoint.save_final(s.run_dir, s.policy, s.tokenizer, s.cfg, state)


@distributed.launched  # under torchrun: join the other processes first (a no-op for one process)
def train(cfg: TrainConfig, on_log: Callable[[int, dict], None] | None = None) -> Path:
    """Train; return final/. `on_log(step, record)`: called on rank 0 with every metrics record as it is written."""
    fix_malloc_thresholds(wanted=cfg.gradient_checkpointing)  # freed tensors leave the process: memory over time
    s = setup(cfg)
    optimizer, scheduler = make_optimizer(s)
    first = start_or_resume(s, optimizer, scheduler)
    s.policy.train()
    main = distributed.world().is_main  # only rank 0 writes files and shows progress
    log.info("training %s", describe(s))
    has_eval = bool(s.eval_pairs) or s.generation is not None
    watcher = observe.watch(cfg, s.total_steps, s.run_dir, on_log) if main else None  # rank 0 reports
    if s.audit is not None:  # None with --stream
        distributed.on_main(observe.write_audit, s.audit, s.run_dir)
    pending: list[StepMetrics] = []
    skipped = 0
    clock = time.perf_counter()
    # The bar closes before an error propagates, so the error stays the last line the user sees.
    with (
        tqdm(
            total=s.total_steps, initial=first, desc="train", unit="step", dynamic_ncols=True, disable=not main
        ) as bar,
        open(s.run_dir / rundir.METRICS if main else os.devnull, "a", encoding="utf-8") as metrics_file,
    ):
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
                write = lambda records=records: append_records(metrics_file, records)  # noqa: E731
                distributed.on_main(rundir.writing, s.run_dir, rundir.METRICS, write)  # every rank learns of a failure
                skipped += sum(int(r.get("skipped", 0)) for r in records)
                bar.set_postfix(progress_fields(records[-1]), refresh=False)
                bar.update(len(records))
                pending, clock = [], time.perf_counter()
            if save_now:
                states = fsdp.checkpoint_states(s.policy, optimizer) if fsdp.enabled(s.policy) else None
                fsdp.on_main(states, save_checkpoint, s, done, optimizer, scheduler, states)  # gathered as written
                clock = time.perf_counter()
            after_step(done)
    if skipped:
        log.warning(
            "skipped %d step%s with a non-finite loss or gradient (--skip-nonfinite)", skipped, "s" * (skipped != 1)
        )
    whole = fsdp.final_weights(s.policy) if fsdp.enabled(s.policy) else None  # gathered as written
    save = lambda: save_final(s) if whole is None else save_final(s, whole)  # noqa: E731
    final = fsdp.on_main(whole, rundir.writing, s.run_dir, "the final model", save, default=s.run_dir / rundir.FINAL)
    if main:
        watcher.finish(records[-1] if first < s.total_steps else {})
    if not cfg.no_report:
        distributed.on_main(observe.write_report, s.run_dir)
    log.info("done: %s", final)
    return final


def describe(s: Setup) -> str:
    """'4 steps of 8 pairs (25 pairs, 4 steps per epoch) on cpu × 2 processes'."""
    unit, processes = "examples" if s.cfg.unpaired else "pairs", distributed.world().size
    many = f" × {processes} processes" if processes > 1 else ""
    return (
        f"{s.total_steps} steps of {global_batch(s.cfg)} {unit} ({len(s.train_pairs)} {unit}, {s.steps_per_epoch} "
        f"steps per epoch) on {s.device}{many}"
    )


def _drifted_reference(s: Setup, step: int | None) -> torch.nn.Module | None:
    """The live reference model when TR-DPO has updated it by `step` (None: at any step; a checkpoint holds it only
    then), else None: an unchanged reference is the loaded model again, so it is not saved."""
    if not s.cfg.ref_update or (step is not None and step < s.cfg.ref_update_every):
        return None
    return s.reference.model


def save_checkpoint(s: Setup, step: int, optimizer, scheduler, states: checkpoint.ShardedStates | None = None) -> None:
    """`states`: --fsdp's model and optimizer state, gathered as they are written (`fsdp.checkpoint_states`)."""
    rundir.writing(
        s.run_dir,
        f"checkpoint step {step}",
        lambda: checkpoint.save(
            s.run_dir, step, s.policy, optimizer, scheduler, reference=_drifted_reference(s, step), states=states
        ),
    )
    if s.cfg.keep_last:
        checkpoint.prune(s.run_dir, s.cfg.keep_last)


def precompute(cfg: TrainConfig) -> None:
    """Fill the reference cache for --data (and --eval-data) so that `train` with the same options skips it."""
    if not cfg.needs_reference or cfg.no_ref_cache or cfg.ref_update:
        live = "--no-ref-cache" if cfg.no_ref_cache else "--ref-update"
        raise UserError(
            f"precompute: nothing to do with --loss {cfg.loss}"
            + (f" and {live}" if cfg.no_ref_cache or cfg.ref_update else ": it uses no reference")
        )
    s = setup(cfg, training=False)
    if s.token_dir is not None:  # --stream: the ids served the reference pass only
        shutil.rmtree(s.token_dir, ignore_errors=True)


def after_step(step: int) -> None:
    """A hook for tests that interrupt a run at a given step; does nothing."""
