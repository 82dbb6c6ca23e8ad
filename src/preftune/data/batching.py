"""Token ids → batches. The plain padded layout here is the reference that faster layouts are tested against.

Worked example (the one `tests/test_batching.py` asserts, the same as TRL's collator docstring), pad_id = 0:

    pairs   = [TokenizedPair(prompt_ids=[1, 2, 3], chosen_ids=[4, 5], rejected_ids=[6], where=...),
               TokenizedPair(prompt_ids=[7, 8],    chosen_ids=[9],    rejected_ids=[10, 11], where=...)]
    collate_padded(pairs, indices=[5, 2], pad_id=0)

    input_ids        attention_mask   response_mask
    [[1, 2, 3, 4, 5],  [[1, 1, 1, 1, 1],  [[0, 0, 0, 1, 1],    row 0: pair 0, prompt + chosen
     [7, 8, 9, 0, 0],   [1, 1, 1, 0, 0],   [0, 0, 1, 0, 0],    row 1: pair 1, prompt + chosen
     [1, 2, 3, 6, 0],   [1, 1, 1, 1, 0],   [0, 0, 0, 1, 0],    row 2: pair 0, prompt + rejected
     [7, 8, 10, 11, 0]] [1, 1, 1, 1, 0]]   [0, 0, 1, 1, 0]]    row 3: pair 1, prompt + rejected

    index = [5, 2], num_pairs = 2, num_tokens = 5 + 3 + 4 + 4 = 16, num_chosen_tokens = 2 + 1 = 3
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch
from torch import LongTensor, Tensor

if TYPE_CHECKING:  # only for annotations: batching needs nothing else from tokenization
    from preftune.data.tokenize import TokenizedPair


@dataclass
class PaddedBatch:
    """B pairs as 2B right-padded rows: rows 0..B−1 are prompt+chosen, rows B..2B−1 prompt+rejected."""

    input_ids: LongTensor  # [2B, T], pad_id after the real tokens
    attention_mask: LongTensor  # [2B, T], 1 on real tokens
    response_mask: LongTensor  # [2B, T], 1 on response tokens: the tokens whose log-prob is summed
    index: LongTensor  # [B], positions of the pairs in the dataset (keys for cached reference log-probs)
    num_pairs: int
    num_tokens: int  # real (non-padding) tokens in all 2B rows
    num_chosen_tokens: int  # response tokens in the chosen rows
    labels: Tensor | None = None  # [B] 1.0 desirable, 0.0 undesirable: unpaired examples only (data/unpaired.py)

    def to(self, device: torch.device | str) -> "PaddedBatch":
        """The same batch with every tensor on `device`."""
        # `index` stays on the CPU: it addresses host-side data (the reference cache), and reading a device
        # tensor back would stall the step.
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor) and f.name != "index"
        }
        return replace(self, **moved)


def _check_pair(pair: TokenizedPair) -> None:
    # The first token of a row has no logits predicting it, so an empty prompt would silently drop the first
    # response token; an empty response would contribute log-prob 0. Tokenization must rule both out.
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        if not getattr(pair, name):
            raise ValueError(f"{pair.where}: {name} is empty after tokenization; it must hold at least one token")


def _labels(pairs: list[TokenizedPair]) -> Tensor | None:
    """[B] float labels of unpaired examples (1.0 desirable), or None for pairs."""
    return None if pairs[0].label is None else torch.tensor([float(p.label) for p in pairs])


def _pad_rows(rows: list[list[int]], length: int, value: int) -> LongTensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def collate_padded(
    pairs: list[TokenizedPair], indices: list[int], pad_id: int, pad_to_multiple_of: int | None = None
) -> PaddedBatch:
    """Lay out B pairs as a `PaddedBatch` of 2B rows, right-padded to the longest row (rounded up to a multiple
    of `pad_to_multiple_of` when given). `indices[i]` is the dataset position of `pairs[i]`."""
    if len(pairs) != len(indices):
        raise ValueError(f"{len(pairs)} pairs but {len(indices)} indices")
    for pair in pairs:
        _check_pair(pair)
    sequences = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    response_marks = [[0] * (len(seq) - len(resp)) + [1] * len(resp) for seq, resp in zip(sequences, responses)]

    length = max(len(seq) for seq in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of  # ceil to a multiple
    return PaddedBatch(
        input_ids=_pad_rows(sequences, length, pad_id),
        attention_mask=_pad_rows([[1] * len(seq) for seq in sequences], length, 0),
        response_mask=_pad_rows(response_marks, length, 0),
        index=torch.tensor(indices, dtype=torch.long),
        num_pairs=len(pairs),
        num_tokens=sum(len(seq) for seq in sequences),
        num_chosen_tokens=sum(len(p.chosen_ids) for p in pairs),
        labels=_labels(pairs),
    )


@dataclass
class PackedBatch:
    """Prefix-shared, packed layout: each pair is one segment [prompt | chosen | rejected] of a row, and the k pairs
    of a batch that share their prompt and chosen response (the k pairs of a data row whose `rejected` lists k
    responses) may be one k-way segment [prompt | chosen | rejected_1 … rejected_k] (`collate_packed` says when).

    The prompt and the chosen response are encoded once per segment; every response attends to the prompt and to
    itself only, never to another response, and its position ids restart at the end of the prompt, so every token
    sees exactly the context and positions it has in its own plain sequence. Several segments may share a row
    (block-diagonal between them); rows are right-padded to the longest. Worked example, the pairs of the
    `collate_padded` example in one row each:

        input_ids     [[1, 2, 3, 4, 5, 6],   [7, 8, 9, 10, 11, 0]]
        position_ids  [[0, 1, 2, 3, 4, 3],   [0, 1, 2, 2, 3, 0]]
        part          [[0, 0, 0, 1, 1, 2],   [0, 0, 1, 2, 2, -1]]     0 prompt, 1 chosen, 2 rejected, -1 pad
        targets: chosen 4 ← hidden at (0, 2), 5 ← (0, 3); rejected 6 ← (0, 2) (the last prompt position);
                 chosen 9 ← (1, 1); rejected 10 ← (1, 1), 11 ← (1, 3)

    The targets list every (sequence, token) of the plain layout, so a k-way segment lists its chosen tokens once
    per pair, at the same positions: each pair's log-prob sums its own entries, as in a segment of its own. The LM
    head then runs on `head_rows` only (each shared token once) and `head_index` hands each entry its result, so
    the k pairs' gradients add up on the one encoded chosen response. Pairs ([1, 2], [3], [4, 5]) and
    ([1, 2], [3], [6]) as one 2-way segment:

        input_ids [[1, 2, 3, 4, 5, 6]], position_ids [[0, 1, 2, 2, 3, 2]], part [[0, 0, 1, 2, 2, 3]]  (2 + j: rejected j)
        target_pos [1, 1, 3, 1, 1], target_ids [3, 4, 5, 3, 6], target_seq [0, 2, 2, 1, 3]
        head_rows [0, 1, 2, 4] (entry 3 repeats entry 0), head_index [0, 1, 2, 0, 3]
    """

    input_ids: LongTensor  # [R, L]
    position_ids: LongTensor  # [R, L]
    segment: LongTensor  # [R, L] segment number within its row, -1 on padding
    part: LongTensor  # [R, L] 0 prompt, 1 chosen, 2 + j the segment's rejected response j, -1 padding
    target_pos: LongTensor  # [N] flat position (row · L + column) of the hidden state predicting each response token
    target_ids: LongTensor  # [N] the response tokens
    target_seq: LongTensor  # [N] sequence of each token: pair i's chosen is i, its rejected B + i
    lengths: LongTensor  # [2B] response tokens of each sequence (counted here: bincount on a GPU would sync)
    index: LongTensor  # [B] dataset positions of the pairs
    num_pairs: int
    num_tokens: int  # tokens the plain layout would process: both prompts counted (for comparable tokens/s)
    num_chosen_tokens: int
    labels: Tensor | None = None  # [B], as PaddedBatch.labels
    head_rows: LongTensor | None = None  # [N'] the entries the LM head scores (None: all N, nothing shared)
    head_index: LongTensor | None = None  # [N] the row of head_rows whose log-prob each entry takes

    to = PaddedBatch.to

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[R, 1, L, L]: True (or 0.0) where query q may attend to key k; bool unless a float `dtype` is given."""
        length = self.segment.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=self.segment.device).tril()
        allowed = causal & visible(
            self.segment.unsqueeze(2), self.segment.unsqueeze(1), self.part.unsqueeze(2), self.part.unsqueeze(1)
        )
        # Padding attends to itself only: a fully masked query row would give NaN in the softmax.
        allowed |= torch.eye(length, dtype=torch.bool, device=self.segment.device) & (self.segment.unsqueeze(2) < 0)
        allowed = allowed.unsqueeze(1)
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )


def visible(q_segment: Tensor, k_segment: Tensor, q_part: Tensor, k_part: Tensor) -> Tensor:
    """Whether a query token may see an earlier key token of its row (elementwise, broadcasting; causality is the
    caller's): the same segment, and the key in the prompt or in the query's own part, so a response sees its
    prompt and itself and no other response of the segment. The one rule of every attention path."""
    return (q_segment == k_segment) & ((k_part == 0) | (q_part == k_part))


# A target of a segment: (offset in the segment of the hidden state predicting it, token, sequence number, the
# segment's earlier target with the same hidden state and token, or None).
Target = tuple[int, int, int, int | None]


def _segment(pairs: list[TokenizedPair], members: list[int]) -> tuple[list[int], list[int], list[int], list[Target]]:
    """ids, position ids, parts and targets of the segment of `pairs[members]`, which share prompt and chosen ids:
    [prompt | chosen | rejected of each member]."""
    first, b = pairs[members[0]], len(pairs)
    p, c = len(first.prompt_ids), len(first.chosen_ids)
    ids, positions, parts = first.prompt_ids + first.chosen_ids, list(range(p + c)), [0] * p + [1] * c
    targets: list[Target] = []
    for j, i in enumerate(members):
        # Member 0's chosen targets are the segment's first c: the others' are the same hidden states and tokens.
        targets += [(p - 1 + t, token, i, None if j == 0 else t) for t, token in enumerate(first.chosen_ids)]
        rejected, start = pairs[i].rejected_ids, len(ids)
        targets += [((p - 1) if t == 0 else (start + t - 1), token, b + i, None) for t, token in enumerate(rejected)]
        ids += rejected
        positions += range(p, p + len(rejected))
        parts += [2 + j] * len(rejected)
    return ids, positions, parts, targets


def _groups(pairs: list[TokenizedPair]) -> list[list[int]]:
    """Pair numbers of the pairs with the same prompt and chosen ids, in order of first appearance."""
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault((tuple(pair.prompt_ids), tuple(pair.chosen_ids)), []).append(i)
    return list(groups.values())


def _rows(sizes: list[int], max_row_tokens: int | None) -> list[list[int]]:
    """Segment numbers of each row: segments of `sizes` tokens filled into rows of at most `max_row_tokens` in
    order (None: one per row; a longer segment gets a row of its own)."""
    rows: list[list[int]] = []
    used = 0
    for s, size in enumerate(sizes):
        if rows and max_row_tokens and used + size <= max_row_tokens:
            rows[-1].append(s)
            used += size
        else:
            rows.append([s])
            used = size
    return rows


def _arrange(pairs: list[TokenizedPair], groups: list[list[int]], max_row_tokens: int | None):
    """(segments, rows, row length) of `groups` laid out one segment per group."""
    segments = [_segment(pairs, members) for members in groups]
    rows = _rows([len(seg[0]) for seg in segments], max_row_tokens)
    return segments, rows, max(sum(len(segments[s][0]) for s in row) for row in rows)


def _layout(pairs: list[TokenizedPair], max_row_tokens: int | None, share: bool):
    """`_arrange` of one segment per pair or, with `share` and when no larger (rows × row length), of the k-way
    segments of the pairs with the same prompt and chosen ids."""
    singles = _arrange(pairs, [[i] for i in range(len(pairs))], max_row_tokens)
    groups = _groups(pairs) if share else []
    if not groups or len(groups) == len(pairs):
        return singles
    shared = _arrange(pairs, groups, max_row_tokens)
    return shared if len(shared[1]) * shared[2] <= len(singles[1]) * singles[2] else singles


def collate_packed(
    pairs: list[TokenizedPair],
    indices: list[int],
    pad_id: int,
    max_row_tokens: int | None = None,
    share: bool = True,
) -> PackedBatch:
    """Lay out B pairs as a `PackedBatch`: one segment per pair, segments filled into rows of at most
    `max_row_tokens` tokens in order (None: one segment per row; a longer one gets a row of its own).

    With `share`, the pairs with the same prompt and chosen ids are one k-way segment instead, whenever that
    leaves the batch no larger (rows × row length): always for whole groups of similar lengths (a grouped loss's
    micro-batches), not for two pairs of one row among others in a batch of one pair per row, where the longer
    row would pad every other row more than it saves. Either way the numbers are the same, up to float rounding.
    """
    if len(pairs) != len(indices):
        raise ValueError(f"{len(pairs)} pairs but {len(indices)} indices")
    for pair in pairs:
        _check_pair(pair)
    segments, rows, length = _layout(pairs, max_row_tokens, share)
    ids, pos, seg, part = ([[fill] * length for _ in rows] for fill in (pad_id, 0, -1, -1))
    target_pos, target_ids, target_seq, head_rows, head_index = [], [], [], [], []
    for r, row in enumerate(rows):
        start = 0
        for s, number in enumerate(row):
            seg_ids, seg_pos, seg_part, seg_targets = segments[number]
            end, first = start + len(seg_ids), len(target_pos)
            ids[r][start:end], pos[r][start:end], part[r][start:end] = seg_ids, seg_pos, seg_part
            seg[r][start:end] = [s] * len(seg_ids)
            for offset, token, sequence, twin in seg_targets:
                if twin is None:
                    head_rows.append(len(target_pos))
                head_index.append(len(head_rows) - 1 if twin is None else head_index[first + twin])
                target_pos.append(r * length + start + offset)
                target_ids.append(token)
                target_seq.append(sequence)
            start = end
    tensor = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    shared_heads = len(head_rows) < len(target_pos)
    return PackedBatch(
        input_ids=tensor(ids),
        position_ids=tensor(pos),
        segment=tensor(seg),
        part=tensor(part),
        target_pos=tensor(target_pos),
        target_ids=tensor(target_ids),
        target_seq=tensor(target_seq),
        lengths=tensor([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]),
        index=tensor(indices),
        num_pairs=len(pairs),
        num_tokens=sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs),
        num_chosen_tokens=sum(len(p.chosen_ids) for p in pairs),
        labels=_labels(pairs),
        head_rows=tensor(head_rows) if shared_heads else None,
        head_index=tensor(head_index) if shared_heads else None,
    )


def collate(
    layout: str,
    pairs: list[TokenizedPair],
    indices: list[int],
    pad_id: int,
    pack_tokens: int | None = None,
    share: bool = True,
) -> PackedBatch | PaddedBatch:
    """`collate_packed` (`pack_tokens` per row at most, None: a row per segment; `share`: k-way segments) or
    `collate_padded`, by `layout`."""
    if layout == "packed":
        return collate_packed(pairs, indices, pad_id, pack_tokens, share)
    return collate_padded(pairs, indices, pad_id)
