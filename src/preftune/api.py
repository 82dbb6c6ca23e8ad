"""The Python API, as small as the command line: `train`, `evaluate` and `audit`, each the function its subcommand
calls. Mistakes raise `UserError` (one line, as the CLI prints it), never `SystemExit`.

    from preftune import TrainConfig, audit, evaluate, train

    final = train(TrainConfig(model="./sft", data="prefs.jsonl", output="runs/dpo1"), on_log=print)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.config import FIELDS, TrainConfig, resolve
from preftune.errors import UserError
from preftune.evaluation.evaluate import EvalOptions, run_eval


def train(config: TrainConfig | dict[str, Any] | str | Path, on_log: Callable[[int, dict], None] | None = None) -> Path:
    """Train with `config`: a TrainConfig, a dict of options (as the flags, with underscores), or a YAML file (as
    `--config`); returns final/. `on_log(step, metrics)` is called with each metrics.jsonl record as it is written
    (a notebook can plot live). The options are checked as the CLI checks them, before anything is written."""
    from preftune import recipe  # torch and transformers load here, not at `import preftune`

    return recipe.train(config_of(config), on_log=on_log)


def config_of(config: TrainConfig | dict[str, Any] | str | Path) -> TrainConfig:
    """The checked TrainConfig of any of `train`'s forms. For a TrainConfig, the options that differ from their
    defaults count as given (a flag that would have no effect is refused, as on the command line)."""
    if isinstance(config, (str, Path)):
        config = {"config": str(config)}
    if isinstance(config, TrainConfig):
        config = {name: value for name, value in config.to_dict().items() if value != FIELDS[name].default}
    return resolve(dict(config))[0]


def evaluate(options: EvalOptions | None = None, **kwargs: Any) -> dict:
    """`preftune eval`: an EvalOptions, or its fields as keywords (model=..., ref=..., data=..., prompts=...);
    returns the result eval.json holds."""
    if options is None:
        options = EvalOptions(**kwargs)
    elif kwargs:
        options = dataclasses.replace(options, **kwargs)
    return run_eval(options)


@dataclass
class AuditInputs:
    """What `preftune audit` reads: the rows of --data (pairs, or unpaired examples), those of --eval-data (only
    their prompts are compared), and the tokenizer of --model or --tokenizer (None: no truncation checks)."""

    rows: list
    held_out: list | None
    unpaired: bool
    tokenizer: Any


def audit_inputs(
    data: str,
    eval_data: str | None = None,
    *,
    model: str | None = None,
    tokenizer: str | None = None,
    columns: str | None = None,
    trust_remote_code: bool = False,
) -> AuditInputs:
    from preftune.data.formats import iter_pairs, parse_columns
    from preftune.data.unpaired import is_unpaired_source, iter_examples
    from preftune.loading import load_tokenizer

    mapping = parse_columns(columns)

    def rows(source: str) -> tuple[list, bool]:  # (pairs or unpaired examples, whether unpaired)
        if is_unpaired_source(source, mapping):
            return list(iter_examples(source, mapping)), True
        return [pair for pair, _ in iter_pairs(source, mapping)], False

    found, unpaired = rows(data)
    held_out = None if eval_data is None else rows(eval_data)[0]
    loaded = None
    for flag, folder in (("model", model), ("tokenizer", tokenizer)):
        if folder is not None:
            loaded = load_tokenizer(folder, trust_remote_code=trust_remote_code, what=f"--{flag}")
    return AuditInputs(found, held_out, unpaired, loaded)


def audit_of(
    inputs: AuditInputs,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    *,
    features: Sequence[str] = (),
    refusal_detector: str | None = None,
    categories: Mapping[str, str] | None = None,
):
    """The audit report of what `audit_inputs` read. features (module:function specs), refusal_detector and
    categories (`data.features.read_categories`) shape the table of what the preferences reward: pairs only."""
    from preftune.data.audit import audit_pairs
    from preftune.data.audit_examples import audit_examples

    if inputs.unpaired and (features or refusal_detector is not None):
        raise UserError("--feature and --refusal-detector compare chosen with rejected: they need pairs, not examples")
    shaping = {"features": features, "refusal_detector": refusal_detector, "categories": categories}
    check = audit_examples if inputs.unpaired else audit_pairs
    return check(
        inputs.rows,
        inputs.held_out,
        tokenizer=inputs.tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        **({} if inputs.unpaired else shaping),
    )


def audit(
    data: str,
    eval_data: str | None = None,
    *,
    model: str | None = None,
    tokenizer: str | None = None,
    columns: str | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    trust_remote_code: bool = False,
    features: Sequence[str] = (),
    refusal_detector: str | None = None,
):
    """`preftune audit`: the data checks of `data` (pairs, or unpaired examples), and its leakage into `eval_data`;
    with a `model` or `tokenizer`, truncation too; `features` (module:function specs) and `refusal_detector` as
    `--feature` and `--refusal-detector`. Returns the report: `.warnings()`, `.lines()`, `.to_dict()`."""
    from preftune.data.features import read_categories

    inputs = audit_inputs(
        data, eval_data, model=model, tokenizer=tokenizer, columns=columns, trust_remote_code=trust_remote_code
    )
    shaping = {"features": features, "refusal_detector": refusal_detector}
    return audit_of(inputs, max_length, max_prompt_length, **shaping, categories=read_categories(data, columns))
