"""The DPO recipe, top to bottom: setup → loop (micro-steps → clip → step → log → checkpoint) → final model.

One optimizer step sees `batch_size × grad_accum` pairs. Each micro-batch's loss is divided by the pair (or
token) count of the whole step, so the summed gradients equal those of one big batch exactly.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from preftune import checkpoint, lora, refcache
from preftune.config import TrainConfig, write_yaml
from preftune.data.batching import PackedBatch, PaddedBatch, collate_packed, collate_padded
from preftune.data.formats import load_pairs, parse_columns
from preftune.data.tokenize import TokenizedPair, tokenize_pairs
from preftune.errors import UserError
from preftune.loading import causal_lm_config, load_causal_lm, load_tokenizer
from preftune.logps import compute_logps, packed_layout_works
from preftune.losses import OPTIONS, combined_loss, pair_metrics, reward_kind
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
    train_pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    steps_per_epoch: int
    total_steps: int
    layout: str
    orders: dict[int, list[int]] = field(default_factory=dict)  # the current epoch's pair order


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


def load_data(path: str, cfg: TrainConfig, tokenizer, flag: str) -> list[TokenizedPair]:
    pairs, report = load_pairs(path, columns=parse_columns(cfg.columns), on_identical=cfg.on_identical)
    log.info("%s %s: %s", flag, path, report.summary())
    tokenized, trunc = tokenize_pairs(pairs, tokenizer, max_length=cfg.max_length,
                                      max_prompt_length=cfg.max_prompt_length, on_overlength=cfg.on_overlength)
    log.info("%s tokens: %s", flag, trunc.summary())
    if not tokenized:
        raise UserError(f"{flag} {path}: no pairs left to train on")
    return tokenized


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
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"--output {cfg.output}: folder is not empty; pass --resume to continue it, "
                        "or choose a new folder")
    return run_dir


def _check_same_config(cfg: TrainConfig, saved_text: str, run_dir: Path) -> None:
    import yaml

    saved = yaml.safe_load(saved_text) or {}
    now = cfg.to_dict()
    for key, value in saved.items():
        if key != "resume" and now.get(key) != value:
            raise UserError(f"--resume: option {key} is {now.get(key)!r} but the run in {run_dir} used {value!r}; "
                            "an exact resume needs the same options")


def setup(cfg: TrainConfig, training: bool = True) -> Setup:
    """Validate and load everything before the run folder is touched: a mistake leaves nothing half-written."""
    run_dir = prepare_run_dir(cfg) if training else Path(cfg.output)
    device = resolve_device(cfg.device)
    base = lora.base_model_path(cfg.model)  # cfg.model itself, unless that folder holds only a LoRA adapter
    causal_lm_config(base, trust_remote_code=cfg.trust_remote_code)
    if cfg.ref_model:
        causal_lm_config(cfg.ref_model, trust_remote_code=cfg.trust_remote_code, what="--ref-model")
    if cfg.tokenizer or base == cfg.model:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code,
                                   what="--tokenizer" if cfg.tokenizer else "--model")
    else:
        tokenizer = lora.load_adapter_tokenizer(cfg.model, base, trust_remote_code=cfg.trust_remote_code)
    train_pairs = load_data(cfg.data, cfg, tokenizer, "--data")
    per_step = cfg.batch_size * cfg.grad_accum
    if len(train_pairs) < per_step:
        raise UserError(f"--data {cfg.data}: {len(train_pairs)} pairs, fewer than one optimizer step "
                        f"(--batch-size {cfg.batch_size} × --grad-accum {cfg.grad_accum} = {per_step})")
    eval_pairs = load_data(cfg.eval_data, cfg, tokenizer, "--eval-data") if cfg.eval_data else []

    # Wrapped on the CPU, before moving: a fresh LoRA adapter starts from the same seeded weights on any device.
    policy = lora.wrap(load_causal_lm(base, trust_remote_code=cfg.trust_remote_code), cfg).to(device)
    layout = choose_layout(cfg, policy, train_pairs, tokenizer.pad_token_id)
    steps_per_epoch = math.ceil(len(train_pairs) / per_step)
    total = cfg.max_steps if cfg.max_steps is not None else math.ceil((cfg.epochs or 1) * steps_per_epoch)
    s = Setup(cfg, run_dir, device, tokenizer, policy, None, None, train_pairs, eval_pairs, steps_per_epoch, total,
              layout)
    if cfg.needs_reference:
        attach_reference(s)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.config.use_cache = False
    return s


def attach_reference(s: Setup) -> None:
    """The reference: by default its log-probs, computed once and cached on disk, then the model is freed.

    The default reference is the policy as loaded (never re-read from disk). With the cache, the policy itself
    computes them before its first update, so no second copy is ever made; without it, a frozen copy runs at
    every step. A LoRA policy is its own reference, with or without the cache: its base with the adapter
    disabled, or its loaded adapter's initial state (see `lora`); no copy of the base is ever made.
    """
    cfg = s.cfg
    loaded = (load_causal_lm(cfg.ref_model, trust_remote_code=cfg.trust_remote_code, what="--ref-model").to(s.device)
              if cfg.ref_model else None)
    if loaded is not None and s.layout == "packed":  # both models must fit the layout their batches share
        s.layout = choose_layout(cfg, loaded, s.train_pairs, s.tokenizer.pad_token_id)
    adapter = loaded is None and lora.enabled(cfg)
    if cfg.no_ref_cache:
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
    key = refcache.cache_key(weights=digest, pairs=pairs, dtype=cfg.dtype, extra={"config": config})

    def compute(out: Path):
        # No activations are kept for backward, so a GPU takes bigger batches; a CPU gains nothing from them.
        batch_size = cfg.batch_size * (4 if s.device.type == "cuda" else 1)
        return refcache.compute(model, pairs, batch_size=batch_size, logps_fn=compute_logps,
                                collate_fn=lambda ps, idx: collate(s, ps, idx), device=s.device, dtype=cfg.dtype,
                                out=out)

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--ref-cache {cache_dir}: cannot create the folder ({e.strerror})") from None
    start = time.perf_counter()
    logps, hit = refcache.load_or_compute(cache_dir, key, compute, num_pairs=len(pairs))
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


def step_pairs(s: Setup, step: int) -> list[int]:
    """Dataset indices of the pairs of optimizer step `step` (0-based).

    The order is a pure function of (seed, epoch): resuming at a step needs no saved data-loader state. It is
    computed once per epoch (a shuffle, and a sort with --group-by-length, are O(n) or more per call).
    """
    epoch, k = divmod(step, s.steps_per_epoch)
    if epoch not in s.orders:
        s.orders = {epoch: epoch_order(s.train_pairs, s.cfg, epoch)}
    size = s.cfg.batch_size * s.cfg.grad_accum
    return s.orders[epoch][k * size:(k + 1) * size]


def epoch_order(pairs: list[TokenizedPair], cfg: TrainConfig, epoch: int) -> list[int]:
    n = len(pairs)
    generator = torch.Generator().manual_seed(cfg.seed + epoch)
    order = list(range(n)) if cfg.no_shuffle else torch.randperm(n, generator=generator).tolist()
    if not cfg.group_by_length:
        return order
    # Sort windows of 16 steps by length, cut them into steps, then shuffle the steps: pairs of a step have
    # similar lengths (little padding) while the step order stays random.
    size = cfg.batch_size * cfg.grad_accum
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
    with autocast(s.device, cfg.dtype):
        chosen, rejected, chosen_len, rejected_len = compute_logps(s.policy, batch)
    if reference is not None:
        ref_chosen, ref_rejected = reference.logps(batch)
    else:  # reference-free losses: no reference exists; the losses ignore these zeros
        ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
    loss = combined_loss(cfg.losses, cfg.weights, policy_chosen_logps=chosen, policy_rejected_logps=rejected,
                         ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected, chosen_lengths=chosen_len,
                         rejected_lengths=rejected_len, num_pairs=num_pairs, num_chosen_tokens=num_chosen_tokens,
                         **{option: getattr(cfg, option) for option in OPTIONS})
    metrics = pair_metrics(chosen.detach(), rejected.detach(), ref_chosen, ref_rejected, cfg.beta,
                           reward=reward_kind(cfg.losses), chosen_lengths=chosen_len, rejected_lengths=rejected_len)
    return loss, metrics


def _add(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    """Sum per-pair metrics on the device: no host sync until the step is logged."""
    for key, value in metrics.items():
        total = value.float().sum()
        sums[key] = sums[key] + total if key in sums else total


def run_pairs(s: Setup, batches: list[PackedBatch | PaddedBatch], reference, backward: bool) -> dict[str, torch.Tensor]:
    """Forward (and backward) over the micro-batches of one step; returns device sums of the metrics."""
    num_pairs = sum(b.num_pairs for b in batches)
    num_chosen_tokens = sum(b.num_chosen_tokens for b in batches)
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        with nullcontext() if backward else torch.no_grad():
            loss, metrics = batch_loss(s, batch, reference, num_pairs, num_chosen_tokens)
        if backward:
            loss.backward()
        _add(sums, metrics)
        _add(sums, {"loss": loss.detach()})
    return sums


def per_pair(sums: dict[str, torch.Tensor], num_pairs: int) -> dict[str, torch.Tensor]:
    """Per-pair means of summed metrics, still on the device (the loss is already normalised by the step)."""
    return {k: v if k == "loss" else v / num_pairs for k, v in sums.items()}


def evaluate(s: Setup) -> dict[str, float]:
    s.policy.eval()
    indices = list(range(len(s.eval_pairs)))
    batches = micro_batches(s, s.eval_pairs, indices)
    metrics = per_pair(run_pairs(s, batches, s.eval_reference, backward=False), len(indices))
    values = torch.stack(list(metrics.values())).tolist()  # one host sync
    s.policy.train()
    return {"eval/" + k: v for k, v in zip(metrics, values)}


# ---------------------------------------------------------------------------------------------------- the loop


def make_optimizer(s: Setup):
    from transformers import get_scheduler

    params = [p for p in s.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.cfg.learning_rate, weight_decay=s.cfg.weight_decay)
    name = {"constant": "constant_with_warmup"}.get(s.cfg.lr_scheduler, s.cfg.lr_scheduler)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=s.cfg.warmup_steps, num_training_steps=s.total_steps)
    return optimizer, scheduler


def start_or_resume(s: Setup, optimizer, scheduler) -> int:
    """Write the run's config, or restore the newest checkpoint; return the first step to run."""
    cfg = s.cfg
    s.run_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint.latest(s.run_dir) if cfg.resume else None
    if path is None:
        if cfg.resume:
            log.info("no checkpoint in %s yet: starting again from step 0", s.run_dir)
            _truncate_metrics(s.run_dir / METRICS, 0)
        write_yaml(cfg, s.run_dir / "config.yaml")
        torch.manual_seed(cfg.seed)
        return 0
    step = checkpoint.load(path, s.policy, optimizer, scheduler)
    _truncate_metrics(s.run_dir / METRICS, step)
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
    indices = step_pairs(s, step)
    batches = micro_batches(s, s.train_pairs, indices)
    optimizer.zero_grad(set_to_none=True)
    sums = run_pairs(s, batches, s.reference, backward=True)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(s.policy.parameters(), max_norm)
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
    return StepMetrics(step + 1, lr, len(indices), sum(b.num_tokens for b in batches), list(metrics),
                       torch.stack(list(metrics.values())))


def to_records(pending: list[StepMetrics], elapsed: float) -> list[dict[str, float]]:
    """Bring the interval's metrics to the host in one transfer (the only sync) and check they are finite."""
    rows = torch.stack([p.values for p in pending]).tolist()
    per_step = elapsed / len(pending)  # steps of an interval are timed together: timing one would sync
    records = []
    for p, row in zip(pending, rows):
        record = {"step": p.step, **dict(zip(p.keys, row)), "lr": p.lr, "pairs_per_s": p.pairs / per_step,
                  "tokens_per_s": p.tokens / per_step, "step_time_s": per_step}
        check_finite(record, p.step)
        records.append(record)
    return records


def save_final(s: Setup) -> Path:
    """final/: the model, or with LoRA the adapter (PeftModel.from_pretrained loads it onto its base); with
    --merge also final-merged/, the base with the adapter merged in (a plain model folder). Tokenizer in both."""
    final = s.run_dir / "final"
    adapter = lora.enabled(s.cfg)

    def fill(tmp: Path) -> None:
        if adapter:
            lora.save_adapter(s.policy, tmp)
        else:
            s.policy.save_pretrained(tmp, safe_serialization=True)
        s.tokenizer.save_pretrained(tmp)

    checkpoint.write_atomically(final, fill)
    if adapter and s.cfg.merge:  # after final/: merging changes the policy in place

        def fill_merged(tmp: Path) -> None:
            lora.merge(s.policy).save_pretrained(tmp, safe_serialization=True)
            s.tokenizer.save_pretrained(tmp)

        checkpoint.write_atomically(s.run_dir / "final-merged", fill_merged)
    return final


def train(cfg: TrainConfig) -> Path:
    s = setup(cfg)
    optimizer, scheduler = make_optimizer(s)
    first = start_or_resume(s, optimizer, scheduler)
    s.policy.train()
    log.info("training %d steps of %d pairs (%d pairs, %d steps per epoch) on %s", s.total_steps,
             cfg.batch_size * cfg.grad_accum, len(s.train_pairs), s.steps_per_epoch, s.device)
    pending: list[StepMetrics] = []
    skipped = 0
    clock = time.perf_counter()
    # The bar closes before an error propagates, so the error stays the last line the user sees.
    with (tqdm(total=s.total_steps, initial=first, desc="train", unit="step", dynamic_ncols=True) as bar,
          open(s.run_dir / METRICS, "a", encoding="utf-8") as metrics_file):
        for step in range(first, s.total_steps):
            pending.append(train_step(s, step, optimizer, scheduler))
            done = step + 1
            last = done == s.total_steps
            evaluate_now = bool(s.eval_pairs) and ((cfg.eval_every and done % cfg.eval_every == 0) or last)
            save_now = bool(cfg.save_every) and done % cfg.save_every == 0 and not last
            if done % cfg.log_every == 0 or evaluate_now or save_now or last:
                records = to_records(pending, time.perf_counter() - clock)  # raises before a NaN model is saved
                if evaluate_now:
                    records[-1].update(evaluate(s))
                writing(s, METRICS, lambda: (metrics_file.write("".join(json.dumps(r) + "\n" for r in records)),
                                             metrics_file.flush()))
                skipped += sum(int(r.get("skipped", 0)) for r in records)
                bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", acc=f"{records[-1]['rewards/accuracies']:.2f}",
                                refresh=False)
                bar.update(len(records))
                pending, clock = [], time.perf_counter()
            if save_now:
                save_checkpoint(s, done, optimizer, scheduler)
                clock = time.perf_counter()
            after_step(done)
    if skipped:
        log.warning("skipped %d step%s with a non-finite loss or gradient (--skip-nonfinite)", skipped,
                    "s" * (skipped != 1))
    final = writing(s, "the final model", lambda: save_final(s))
    log.info("done: %s", final)
    return final


def save_checkpoint(s: Setup, step: int, optimizer, scheduler) -> None:
    writing(s, f"checkpoint step {step}", lambda: checkpoint.save(s.run_dir, step, s.policy, optimizer, scheduler))
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
    if not cfg.needs_reference or cfg.no_ref_cache:
        raise UserError(f"precompute: nothing to do with --loss {cfg.loss}" +
                        (" and --no-ref-cache" if cfg.no_ref_cache else ": it uses no reference"))
    setup(cfg, training=False)


def after_step(step: int) -> None:
    """A hook for tests that interrupt a run at a given step; does nothing."""
