"""The model card: `final/README.md` (and `final-merged/README.md`) in the Hugging Face format, from the run folder.

    model_card_text(run_dir, adapter)   the card's text: YAML front matter (base_model, library_name, tags, ...)
                                        then Markdown: recipe, data, results, how to load, the preftune version
    write_model_card(run_dir)           (re)write final/README.md and final-merged/README.md from the run folder

Only the run folder's own files are read (config.yaml, metrics.jsonl, audit.json, eval.json, launch.json) and the
base model's folder when it is local (its hub id, its license): nothing is guessed and nothing is fetched. A file
that is missing or unreadable leaves its section out. Every value from those files is user data: front matter
goes through `yaml.safe_dump`, text is escaped, code is fenced so that nothing in a value can end it.
Nothing here imports training or the CLI, or torch: `checkpoint.save_final` and `preftune push` import this.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from preftune import __version__
from preftune.errors import UserError
from preftune.files import write_file_atomically
from preftune.rundir import AUDIT, CONFIG, EVAL, FINAL, FINAL_MERGED, LAUNCH, METRICS

log = logging.getLogger("preftune")

CARD = "README.md"
ADAPTER_CONFIG = "adapter_config.json"  # as loading.ADAPTER_CONFIG (which imports torch)
# owner/name as the hub spells repository ids (as data/formats.py's rule for hub datasets).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HELD_OUT = (  # metrics.jsonl keys of the held-out pair metrics, with their labels in the card
    ("eval/rewards/accuracies", "Preference accuracy (share of pairs whose chosen reward is higher; ties count wrong)"),
    ("eval/rewards/margins", "Reward margin (chosen − rejected implicit reward)"),
    ("eval/loss", "Loss"),
)


# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class RunFiles:
    """What the card reads from a run folder; each part empty or None when its file is missing or unreadable."""

    path: Path
    config: dict
    records: list[dict]
    audit: dict | None
    evaluation: dict | None
    launch: dict | None


def read_run_files(run_dir: Path) -> RunFiles:
    run_dir = Path(run_dir)
    return RunFiles(
        run_dir,
        _read_mapping(run_dir / CONFIG, yaml.safe_load) or {},
        _read_records(run_dir / METRICS),
        _read_mapping(run_dir / AUDIT, json.loads),
        _read_mapping(run_dir / EVAL, json.loads),
        _read_mapping(run_dir / LAUNCH, json.loads),
    )


def _read_mapping(path: Path, parse: Callable[[str], Any]) -> dict | None:
    """A JSON or YAML file holding a mapping, else None (missing, unreadable, not a mapping): a card is never
    worth a crash."""
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):  # JSONDecodeError is a ValueError
        return None
    return value if isinstance(value, dict) else None


def _read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records; a line that is not a JSON object (one cut by a kill) is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------- escaping


def _text(value: Any) -> str:
    """Plain Markdown text on one line: every character that could start markup, HTML or an entity escaped, and a
    leading list or quote marker (a | is left to `_table`, the only place it means something)."""
    text = re.sub(r"\s+", " ", str(value)).strip()
    text = re.sub(r"([\\`*_\[\]{}<>&~!#])", r"\\\1", text)
    return re.sub(r"^(\d+)([.)])(?=\s|$)|^([-+=>])", lambda m: f"{m[1] or ''}\\{m[2] or m[3]}", text)


def _code(value: Any) -> str:
    """An inline code span that nothing in `value` can close."""
    text = re.sub(r"\s+", " ", str(value))
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _fenced(code: str, language: str) -> str:
    """A code block whose fence is longer than any run of backticks inside it."""
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", code)), default=0) + 1)
    return f"{fence}{language}\n{code.rstrip()}\n{fence}"


def _number(value: Any) -> str:
    """A measured value to 4 significant digits; — when missing or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _setting(value: Any) -> str:
    """A config value as the file holds it: numbers exactly, text as code, None as —."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return str(value)
    return _code(value)


def _table(rows: list[tuple[str, str]], head: tuple[str, str] = ("", "")) -> str:
    """Rows of (label, escaped value); labels are ours."""
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {label} | {_cell(value)} |" for label, value in rows])


def _cell(value: str) -> str:
    """GFM splits a table row at every | not escaped, in code spans too, and reads \\| as | in either."""
    return value.replace("|", "\\|")


# ---------------------------------------------------------------------------------------------------- front matter


def _is_hub_id(name: Any) -> bool:
    """owner/name, and not a local path: a relative folder "runs/sft" looks like a hub id until it exists."""
    if not isinstance(name, str) or not HUB_ID.match(name) or name.lower().endswith(_DATA_SUFFIXES):
        return False
    return not Path(name).expanduser().exists()


def _json_file(path: Path) -> dict:
    return _read_mapping(path, json.loads) or {}


def _base_folder(model: str) -> Path | None:
    """The local folder of the base weights: `model`, or for a folder holding only an adapter the base its
    adapter_config.json names; None when the base is on the hub (or the folder is gone)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return None
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
        base = _json_file(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
        return Path(base).expanduser() if isinstance(base, str) and Path(base).expanduser().is_dir() else None
    return folder


def base_model(model: str) -> str:
    """The hub id of the model the run started from: `model` itself when it is not a local folder (the run loaded
    it from the hub); for a folder, the hub id its config.json (`_name_or_path`) or adapter_config.json names, if
    any; else the string given to --model."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return model
    adapter_base = _json_file(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
    if _is_hub_id(adapter_base) and not (folder / "config.json").is_file():
        return adapter_base
    base = _base_folder(model)
    named = _json_file(base / "config.json").get("_name_or_path") if base else None
    return named if _is_hub_id(named) else model


def _front_matter_of(readme: Path) -> dict:
    """The YAML front matter of a model card, {} when there is none or it does not parse."""

    def parse(text: str) -> Any:
        match = re.match(r"---\r?\n(.*?)\r?\n---\r?\n", text, re.DOTALL)
        return yaml.safe_load(match.group(1)) if match else None

    return _read_mapping(readme, parse) or {}


def base_license(model: str) -> dict:
    """{"license": ...} (with license_name and license_link when given) as the local base folder declares it, in
    its config.json or its README.md front matter; {} when it declares none or is not local (never guessed)."""
    folder = _base_folder(model)
    if folder is None:
        return {}
    for declared in (_json_file(folder / "config.json"), _front_matter_of(folder / CARD)):
        if isinstance(declared.get("license"), str) and declared["license"].strip():
            keys = ("license", "license_name", "license_link")
            return {k: declared[k] for k in keys if isinstance(declared.get(k), str) and declared[k].strip()}
    return {}


def _losses(config: dict) -> list[str]:
    return [name.strip() for name in str(config.get("loss") or "sigmoid").split(",") if name.strip()]


def _lora_used(config: dict) -> bool:
    model = config.get("model")
    given = isinstance(model, str) and (Path(model).expanduser() / ADAPTER_CONFIG).is_file()
    return bool(config.get("lora_r")) or given


def front_matter(run: RunFiles, adapter: bool) -> dict:
    config = run.config
    meta: dict[str, Any] = {}
    model = config.get("model")
    if isinstance(model, str) and model:
        meta["base_model"] = base_model(model)
        meta.update(base_license(model))
    meta["library_name"] = "peft" if adapter else "transformers"
    if _is_hub_id(config.get("data")):
        meta["datasets"] = [config["data"]]
    meta["pipeline_tag"] = "text-generation"
    tags = ["preftune", "dpo", *_losses(config), *(["lora"] if _lora_used(config) else [])]
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


# ---------------------------------------------------------------------------------------------------- sections


def _title(run: RunFiles, adapter: bool, merged: bool, repo_id: str | None) -> str:
    config = run.config
    title = repo_id.split("/")[-1] if repo_id else run.path.resolve().name
    base = _code(base_model(config["model"])) if config.get("model") else "a base model"
    losses = ", ".join(_code(loss) for loss in _losses(config))
    if adapter:
        what = f"A LoRA adapter for {base}, trained"
    else:
        what = f"{base} fine-tuned" + (" through a LoRA adapter, merged into its weights," if merged else "")
    return f"# {_text(title)}\n\n{what} on preference pairs with preftune (loss {losses})."


def _recipe(run: RunFiles) -> str:
    config, launch = run.config, run.launch or {}
    unit = "examples" if (run.audit or {}).get("desirable") is not None else "pairs"  # KTO's unpaired data
    batch = launch.get("batch_size", config.get("batch_size"))
    accum = launch.get("grad_accum", config.get("grad_accum"))
    processes = launch.get("processes", 1)
    per_step = batch * accum * processes if all(isinstance(v, int) for v in (batch, accum, processes)) else None
    steps = next((r["step"] for r in reversed(run.records) if isinstance(r.get("step"), int)), None)
    rows = [
        ("Loss", ", ".join(_code(name) for name in _losses(config))),
        ("Loss weights", _setting(config["loss_weights"]) if config.get("loss_weights") else "1 each"),
        ("β", _setting(config.get("beta"))),
        ("Learning rate", _setting(config.get("learning_rate"))),
        ("Scheduler", _setting(config.get("lr_scheduler"))),
        ("Warmup steps", _setting(config.get("warmup_steps"))),
        ("Optimizer steps", _setting(steps if steps is not None else config.get("max_steps"))),
        (
            f"{unit.title()} per step",
            f"{_setting(per_step)} (batch size {_setting(batch)} × grad-accum {_setting(accum)} × "
            f"{_setting(processes)} process{'es' * (processes != 1)})",
        ),
        ("Epochs", _epochs(config)),
        ("Max length", _setting(config.get("max_length"))),
        ("Max prompt length", _setting(config.get("max_prompt_length"))),
        ("Dtype", _setting(config.get("dtype"))),
        ("Seed", _setting(config.get("seed"))),
    ]
    if config.get("label_smoothing"):
        rows.insert(3, ("Label smoothing", _setting(config["label_smoothing"])))
    if config.get("ref_model"):
        rows.append(("Reference model", _setting(config["ref_model"])))
    rows += _lora_rows(config)
    return "## Training recipe\n\n" + _table(rows, ("setting", "value")) + "\n\n" + _all_options(config)


def _epochs(config: dict) -> str:
    if config.get("epochs") is not None:
        return _setting(config["epochs"])
    return "1" if config.get("max_steps") is None else "— (the run stops after its optimizer steps)"


def _lora_rows(config: dict) -> list[tuple[str, str]]:
    if not _lora_used(config):
        return []
    bits = 4 if config.get("load_in_4bit") else 8 if config.get("load_in_8bit") else None
    quantized = [("Base loaded in", f"{bits} bits (QLoRA)")] if bits else []
    if not config.get("lora_r"):
        return [("LoRA", "the adapter of the --model folder, trained further with its own settings"), *quantized]
    alpha = config.get("lora_alpha")
    return [
        ("LoRA rank r", _setting(config["lora_r"])),
        ("LoRA α", _setting(alpha) if alpha is not None else f"{_setting(2 * config['lora_r'])} (2r)"),
        ("LoRA dropout", _setting(config.get("lora_dropout"))),
        ("LoRA targets", _setting(config.get("lora_targets"))),
        *quantized,
    ]


def _all_options(config: dict) -> str:
    options = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    body = _fenced(options, "yaml")
    return f"<details>\n<summary>All options (the run's config.yaml)</summary>\n\n{body}\n\n</details>"


AUDIT_LABELS = {  # audit.json findings → card labels (pairs, then unpaired examples)
    "duplicates": "Exact duplicates (count more than once in training)",
    "identical_pairs": "Chosen equals rejected (skipped by training)",
    "empty_responses": "Empty response",
    "conflicting_pairs": "Conflicting (A over B and B over A for one prompt)",
    "empty_completions": "Empty completion",
    "conflicting_labels": "Same completion labelled both ways",
    "eval_leakage": "Prompt also in the eval data",
    "truncated": "Over the length limit (cut by training)",
}


def _data(run: RunFiles) -> str | None:
    config, audit = run.config, run.audit
    rows = [("Training data", _dataset(config.get("data")))] if config.get("data") else []
    if config.get("eval_data"):
        rows.append(("Held-out pairs", _dataset(config["eval_data"])))
    if audit is None:
        if not rows:
            return None
        return "## Data\n\n" + _table(rows, ("data", "value")) + "\n\nNo data audit in the run folder (audit.json)."
    unit = "examples" if audit.get("desirable") is not None else "pairs"
    rows.append((f"{unit.title()} read", _setting(audit.get("rows"))))
    if unit == "examples":
        rows.append(
            ("Desirable / undesirable", f"{_setting(audit.get('desirable'))} / {_setting(audit.get('undesirable'))}")
        )
    for key, label in AUDIT_LABELS.items():
        finding = audit.get(key)
        if isinstance(finding, dict):
            rows.append((label, f"{_setting(finding.get('count'))} ({_share(finding.get('share'))})"))
    if "truncated" in audit and audit["truncated"] is None:  # training audits without a tokenizer: its log counts
        rows.append(
            ("Over the length limit", f"not in audit.json (--on-overlength {_setting(config.get('on_overlength'))})")
        )
    encoding = [kind for kind, f in (audit.get("encoding") or {}).items() if isinstance(f, dict) and f.get("count")]
    rows.append(("Encoding problems", ", ".join(_code(kind) for kind in encoding) or "none found"))
    return "## Data\n\n" + _table(rows, ("data", "value")) + _warnings(audit)


def _dataset(source: Any) -> str:
    if _is_hub_id(source):
        return f"[{_text(source)}](https://huggingface.co/datasets/{source})"  # the id's characters need no escape
    return _setting(source)


def _share(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _warnings(audit: dict) -> str:
    warnings = audit_warnings(audit)
    if warnings is None:
        return ""
    if not warnings:
        return "\n\nThe data audit found nothing that would mislead training."
    return "\n\nWarnings of the data audit:\n\n" + "\n".join(f"- {_text(w)}" for w in warnings)


def audit_warnings(audit: dict) -> list[str] | None:
    """The audit's own warnings (`AuditReport.warnings`, or `ExampleAuditReport`'s for unpaired examples), from the
    report rebuilt out of audit.json; None when the file is of another shape (another preftune version)."""
    from preftune.data.audit import AuditReport, Finding, Leakage, Truncation
    from preftune.data.audit_examples import ExampleAuditReport

    kinds = {"eval_leakage": Leakage, "truncated": Truncation}
    try:
        values = {
            key: (
                {kind: Finding(**finding) for kind, finding in value.items()}
                if key == "encoding"
                else kinds.get(key, Finding)(**value)
                if isinstance(value, dict) and "count" in value
                else value
            )
            for key, value in audit.items()
        }
        report = (ExampleAuditReport if "desirable" in audit else AuditReport)(**values)
        return report.warnings()
    except (TypeError, ValueError, KeyError, AttributeError, IndexError):
        return None


def _results(run: RunFiles) -> str | None:
    parts = [part for part in (_held_out(run), _sampling(run.evaluation)) if part]
    return "## Results\n\n" + "\n\n".join(parts) if parts else None


def _held_out(run: RunFiles) -> str | None:
    keys = [key for key, _ in HELD_OUT]
    last = next((r for r in reversed(run.records) if any(k in r for k in keys)), None)
    if last is None:
        return None
    rows = [(label, _number(last.get(key))) for key, label in HELD_OUT]
    source = f" ({_dataset(run.config['eval_data'])})" if run.config.get("eval_data") else ""
    return f"Held-out pairs{source}, at step {_setting(last.get('step'))}:\n\n" + _table(rows, ("metric", "value"))


def _sampling(evaluation: dict | None) -> str | None:
    generation = (evaluation or {}).get("generation")
    if not isinstance(generation, dict):
        return None
    settings = generation.get("settings") or {}
    head = (
        f"Sampling evaluation on {_setting(generation.get('prompts'))} prompts (temperature "
        f"{_setting(settings.get('temperature'))}, top-p {_setting(settings.get('top_p'))}, up to "
        f"{_setting(settings.get('max_new_tokens'))} new tokens), policy against the reference:"
    )
    rows = [
        (
            "KL(π‖π_ref), nats per response",
            f"{_number(generation.get('kl'))} ± {_number(generation.get('kl_se'))} (± SE)",
        )
    ]
    if isinstance(generation.get("length"), dict):
        rows.append(("Response length, tokens: policy / reference", _pair(generation["length"])))
    reward = generation.get("reward")
    if isinstance(reward, dict):
        spec = f" ({_code(reward['spec'])})" if reward.get("spec") else ""
        rows.append((f"Reward{spec}: policy / reference", _pair(reward)))
    wins = generation.get("win_rate")
    if isinstance(wins, dict):
        interval = _text(wins.get("interval") or "95% interval")
        rows.append(
            (
                "Win rate of the policy",
                f"{_number(wins.get('win_rate'))} ({interval}: {_number(wins.get('ci_low'))} to "
                f"{_number(wins.get('ci_high'))}; {_setting(wins.get('wins'))} wins, {_setting(wins.get('ties'))} "
                f"ties, {_setting(wins.get('losses'))} losses)",
            )
        )
    return head + "\n\n" + _table(rows, ("metric", "value"))


def _pair(values: dict) -> str:
    """'policy ± SE / reference ± SE' of an eval.json group."""
    return (
        " / ".join(
            f"{_number(values.get(side))} ± {_number(values.get(side + '_se'))}" for side in ("policy", "reference")
        )
        + " (± SE)"
    )


def _how_to_load(run: RunFiles, adapter: bool, merged: bool, repo_id: str | None) -> str:
    where = repo_id or str(run.path / (FINAL_MERGED if merged else FINAL))
    if not adapter:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({where!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({where!r})\n"
        )
        return "## How to load\n\n" + _fenced(code, "python")
    base = base_model(run.config["model"]) if run.config.get("model") else "BASE_MODEL"
    code = (
        "from peft import AutoPeftModelForCausalLM, PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "# the base named in adapter_config.json, with the adapter on it\n"
        f"model = AutoPeftModelForCausalLM.from_pretrained({where!r})\n"
        "# or: the base loaded first, then the adapter\n"
        f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
        f"model = PeftModel.from_pretrained(base, {where!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({where!r})\n"
    )
    note = (
        ""
        if _is_hub_id(base)
        else f"\n\nThe base model {_code(base)} is a local folder: load it from where you keep it."
    )
    return "## How to load\n\n" + _fenced(code, "python") + note


def _guarded(name: str, section: Callable[[], str | None]) -> str | None:
    """A section, or None when the run folder's files are not what the card expects: the card is derived from
    them, the model is not, and a card must never cost the run its final model (save_final writes it)."""
    try:
        return section()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        log.warning("model card: section %s left out (%s: %s)", name, type(e).__name__, e)
        return None


# ---------------------------------------------------------------------------------------------------- the card


def model_card_text(run_dir: Path, adapter: bool, *, merged: bool = False, repo_id: str | None = None) -> str:
    """The card of final/ (`adapter`: it holds a LoRA adapter) or, with `merged`, of final-merged/. `repo_id`: the
    hub repository the loading code names (default: the local folder)."""
    run = read_run_files(Path(run_dir))
    meta = _guarded("front matter", lambda: front_matter(run, adapter)) or {"tags": ["preftune", "dpo"]}
    sections = [
        _guarded("title", lambda: _title(run, adapter, merged, repo_id)),
        _guarded("training recipe", lambda: _recipe(run)),
        _guarded("data", lambda: _data(run)),
        _guarded("results", lambda: _results(run)),
        _guarded("how to load", lambda: _how_to_load(run, adapter, merged, repo_id)),
        f"Trained with preftune {_text(__version__)}.",
    ]
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{head}---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def write_model_card(run_dir: Path) -> Path:
    """(Re)write final/README.md, and final-merged/README.md when that folder exists → final/README.md."""
    run_dir = Path(run_dir)
    final = run_dir / FINAL
    if not final.is_dir():
        raise UserError(f"{final}: missing; a run writes it when it finishes")
    write_file_atomically(final / CARD, model_card_text(run_dir, (final / ADAPTER_CONFIG).is_file()))
    if (run_dir / FINAL_MERGED).is_dir():
        write_file_atomically(run_dir / FINAL_MERGED / CARD, model_card_text(run_dir, False, merged=True))
    return final / CARD
