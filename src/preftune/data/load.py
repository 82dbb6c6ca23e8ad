"""Data files → token ids for a run: read (pairs, or unpaired examples), tokenize, count and log what was cut or
dropped, held in memory or streamed to a memory-mapped store (`--stream`); the checks that need the whole data
(one optimizer step, grouped rows); and the order in which the pairs of each epoch are trained."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from preftune import distributed
from preftune.config import TrainConfig
from preftune.data.formats import LoadReport, PreferencePair, parse_columns, read_pairs
from preftune.data.groups import group_size, grouped_order
from preftune.data.store import TokenStore
from preftune.data.tokenize import TokenizedPair, TruncationReport, iter_tokenized
from preftune.data.unpaired import ExampleReport, KLReport, check_balance, read_examples, with_kl_completions
from preftune.errors import UserError
from preftune.rundir import batch_text

log = logging.getLogger("preftune")


def _read(path: str, cfg: TrainConfig) -> tuple[Iterator[PreferencePair], LoadReport | ExampleReport]:
    """The pairs of `path` (or, for an unpaired loss, its examples), one at a time, and the report they fill as they
    go (final once the iterator is exhausted)."""
    columns = parse_columns(cfg.columns)
    loaded = ExampleReport() if cfg.unpaired else LoadReport()
    read = read_examples if cfg.unpaired else read_pairs
    return read(path, loaded, columns=columns, on_identical=cfg.on_identical), loaded


def _tokens(
    pairs: Iterable[PreferencePair], cfg: TrainConfig, tokenizer
) -> tuple[Iterator[TokenizedPair], TruncationReport, KLReport | None]:
    """Token ids of `pairs`, one at a time (unpaired examples with their KL completions), and the reports. Both
    paths tokenize through here, so both read and tokenize in batches (tokenize.BATCH_PAIRS pairs a call)."""
    trunc = TruncationReport(unit="examples" if cfg.unpaired else "pairs")
    tokens = iter_tokenized(
        pairs,
        tokenizer,
        trunc,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        on_overlength=cfg.on_overlength,
    )
    if not cfg.unpaired:
        return tokens, trunc, None
    kl = KLReport()
    return with_kl_completions(tokens, global_batch(cfg), cfg.max_length, kl), trunc, kl


def _log_read(
    cfg: TrainConfig, flag: str, path: str, loaded, trunc: TruncationReport, kl: KLReport | None, where: str = ""
) -> None:
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


def stream_data(path: str, cfg: TrainConfig, tokenizer, flag: str, folder: Path) -> TokenStore:
    """`load_data` for --stream: pairs are read (a .jsonl file line by line, a .parquet file row group by row
    group), tokenized a batch at a time and appended to a TokenStore in `folder` one at a time, so memory holds one
    batch, whatever the size of the data. The same pairs, ids, order, counts and errors as `load_data`."""
    pairs, loaded = _read(path, cfg)
    tokens, trunc, kl = _tokens(pairs, cfg, tokenizer)
    store = TokenStore.write(folder, tokens)
    _log_read(cfg, flag, path, loaded, trunc, kl, f" (on disk in {folder})")
    if not len(store):
        raise UserError(f"{flag} {path}: no {trunc.unit} left to train on")
    return store


def check_one_step(cfg: TrainConfig, num_pairs: int) -> None:
    if num_pairs < global_batch(cfg):
        raise UserError(
            f"--data {cfg.data}: {num_pairs} pairs, fewer than one optimizer step "
            f"({batch_text(cfg.batch_size, cfg.grad_accum, distributed.world().size)})"
        )


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
        eval_pairs = stream_data(cfg.eval_data, cfg, tokenizer, "--eval-data", folder / "eval") if cfg.eval_data else []
        group = pairs_per_group(cfg, train_pairs, eval_pairs)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        for p in made:
            _remove_if_empty(p)
        raise
    log.info(
        "--stream: the data audit at the start is skipped (it holds every pair in memory); run "
        "`preftune audit %s` separately",
        cfg.data,
    )
    return train_pairs, eval_pairs, group


def pairs_per_group(cfg: TrainConfig, train_pairs, eval_pairs) -> int:
    """k, the pairs of one data row, with a grouped loss (data/groups.py); 1 without."""
    if not cfg.grouped:
        return 1
    k = group_size(train_pairs, "--data", cfg.grouped)
    if eval_pairs and (k_eval := group_size(eval_pairs, "--eval-data", cfg.grouped)) != k:
        raise UserError(
            f"--loss {cfg.grouped}: the rows of --eval-data give {k_eval} pairs each but those of --data "
            f"{k}; both must have the same number of rejected responses"
        )
    if cfg.batch_size % k:
        raise UserError(
            f"--loss {cfg.grouped}: --batch-size {cfg.batch_size} is not a multiple of {k}, the pairs "
            "of one row of --data (each row trains as one group, in one micro-batch)"
        )
    return k


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (another process's ids) or already gone
        pass


def global_batch(cfg: TrainConfig) -> int:
    """Pairs per optimizer step over all processes: --batch-size × --grad-accum × processes."""
    return cfg.batch_size * cfg.grad_accum * distributed.world().size


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
    grouped = [i for w in range(0, n, window) for i in sorted(order[w : w + window], key=length, reverse=True)]
    steps = [grouped[i : i + size] for i in range(0, n, size)]
    if not cfg.no_shuffle:
        steps = [steps[j] for j in torch.randperm(len(steps), generator=generator).tolist()]
    return [i for chunk in steps for i in chunk]
