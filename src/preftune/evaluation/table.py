"""The result of an evaluation as a plain-text table for the terminal (eval.json holds the same numbers)."""

from __future__ import annotations


def _num(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pm(mean, se, digits: int = 3) -> str:
    return _num(mean, digits) if se is None else f"{_num(mean, digits)} ± {_num(se, digits)}"


def _rate(rate, count: int, total: int) -> str:
    return f"{_num(rate)} ({count}/{total})"


def _row(label: str, policy: str, reference: str, note: str = "") -> str:
    """One line of a policy/reference table: label, then the two columns right-aligned."""
    return f"  {label:<18}{policy:>16}{reference:>16}{note}"


def _counts(d: dict) -> str:
    return f"({d['wins']} wins, {d['ties']} ties, {d['losses']} losses)"


def _pairs_lines(p: dict) -> list[str]:
    by_length = p["by_length"]
    lines = [
        f"held-out pairs: {p['data']} ({p['pairs']} pairs, β = {p['beta']:g})",
        f"  accuracy          {_num(p['rewards/accuracies'])}   {_counts(p)}",
        f"  ties              {_num(p['rewards/ties'])}",
        f"  margin            {_pm(p['rewards/margins'], p['rewards/margins_se'])}",
        f"  reward chosen     {_num(p['rewards/chosen'])}   rejected {_num(p['rewards/rejected'])}",
        f"  by length ({by_length['measure']}; edges {by_length['edges'] or 'none'}):",
        f"    {'tokens':<12}{'pairs':>7}{'accuracy':>10}{'ties':>8}{'margin':>9}",
    ]
    for b in by_length["buckets"]:
        numbers = f"{_num(b['rewards/accuracies']):>10}{_num(b['rewards/ties']):>8}{_num(b['rewards/margins']):>9}"
        lines.append(f"    {b['tokens']:<12}{b['pairs']:>7}{numbers}")
    return lines


def _kl_line(g: dict) -> str:
    if g["kl"] is None and g["kl_infinite"]:
        hint = "; --top-p 1 gives a finite KL" if g["settings"]["top_p"] < 1 else ""
        return f"infinite ({g['kl_infinite']} of {g['kl_samples']} policy samples impossible under the reference{hint})"
    return f"{_pm(g['kl'], g['kl_se'])} nats per response (± SE)"


def _generation_lines(g: dict) -> list[str]:
    s = g["settings"]
    settings = (
        f"temperature {s['temperature']:g}, top-p {s['top_p']:g}, max {s['max_new_tokens']} new tokens, "
        f"seed {s['seed']}"
    )
    length, ended = g["length"], g["ended"]
    lines = [
        f"generation: {g['data']} ({g['prompts']} prompts; {settings})",
        f"  KL(π‖π_ref)       {_kl_line(g)}",
        _row("", "policy", "reference"),
        _row(
            "length (tokens)",
            _num(length["policy"], 1),
            _num(length["reference"], 1),
            f"   ratio {_num(length['ratio'], 2)}",
        ),
        _row("ended with EOS", _num(ended["policy"], 2), _num(ended["reference"], 2)),
        _row("distinct-1", _num(g["distinct_1"]["policy"]), _num(g["distinct_1"]["reference"])),
        _row("distinct-2", _num(g["distinct_2"]["policy"]), _num(g["distinct_2"]["reference"])),
    ]
    if "reward" in g:
        r, w = g["reward"], g["win_rate"]
        interval = f"95% CI [{_num(w['ci_low'])}, {_num(w['ci_high'])}]"
        lines += [
            _row(
                "reward ± SE",
                _pm(r["policy"], r["policy_se"]),
                _pm(r["reference"], r["reference_se"]),
                f"   ({r['spec']})",
            ),
            f"  win rate          {_num(w['win_rate'])}  {interval}  {_counts(w)}",
        ]
    return lines


def _refusal_lines(r: dict) -> list[str]:
    p, q = r["policy"], r["reference"]
    return [
        f"refusal: {r['data']} ({r['safe']} safe, {r['unsafe']} unsafe prompts; detector {r['detector']})",
        _row("", "policy", "reference"),
        _row(
            "over-refusal",
            _rate(p["over_refusal_rate"], p["refused_safe"], p["safe"]),
            _rate(q["over_refusal_rate"], q["refused_safe"], q["safe"]),
            "   (refused safe prompts)",
        ),
        _row(
            "unsafe answered",
            _rate(p["unsafe_compliance_rate"], p["answered_unsafe"], p["unsafe"]),
            _rate(q["unsafe_compliance_rate"], q["answered_unsafe"], q["unsafe"]),
        ),
    ]


def _edges(edges: list[float]) -> str:
    return ", ".join(f"{e:.3g}" for e in edges) or "none"


def _distance_pairs_lines(p: dict) -> list[str]:
    lines = [
        f"  held-out pairs (edges {_edges(p['edges'])}):",
        f"    {'distance':<18}{'pairs':>6}{'accuracy':>10}{'95% CI':>18}{'margin ± SE':>18}",
    ]
    for b in p["buckets"]:
        interval = f"[{_num(b['accuracy_ci_low'])}, {_num(b['accuracy_ci_high'])}]"
        margin = _pm(b["rewards/margins"], b["rewards/margins_se"])
        lines.append(
            f"    {b['distance']:<18}{b['pairs']:>6}{_num(b['rewards/accuracies']):>10}{interval:>18}{margin:>18}"
        )
    return lines


def _distance_generation_lines(g: dict) -> list[str]:
    rewards = any("reward" in b for b in g["buckets"])
    head = f"    {'distance':<18}{'prompts':>8}{'KL ± SE':>18}"
    lines = [
        f"  generation (edges {_edges(g['edges'])}):",
        head + (f"{'reward policy':>18}{'reference':>18}{'win rate':>10}" if rewards else ""),
    ]
    for b in g["buckets"]:
        kl = "infinite" if b["kl"] is None and b["kl_infinite"] else _pm(b["kl"], b["kl_se"])
        row = f"    {b['distance']:<18}{b['prompts']:>8}{kl:>18}"
        if rewards:
            r = b["reward"]
            row += f"{_pm(r['policy'], r['policy_se']):>18}{_pm(r['reference'], r['reference_se']):>18}"
            row += f"{_num(b['win_rate']['win_rate']):>10}"
        lines.append(row)
    return lines


def _distance_lines(d: dict) -> list[str]:
    """Accuracy, margin, KL and rewards per bucket of distance from the training prompts (distance.py)."""
    cut = f", {d['train_cut']} cut to --max-prompt-length" if d["train_cut"] else ""
    lines = [
        f"by distance from the training prompts: {d['train_data']} "
        f"({d['train_prompts']} prompts, {d['train_distinct']} distinct{cut}); near → far",
        f"  distance = {d['measure']}",
    ]
    if "pairs" in d:
        lines += _distance_pairs_lines(d["pairs"])
    if "generation" in d:
        lines += _distance_generation_lines(d["generation"])
    return lines


def format_table(result: dict) -> str:
    """Readable sections for the parts present: held-out pairs, generation (+ reward), refusal, and the same
    numbers by distance from the training prompts (--train-data)."""
    lines = [f"preftune eval: model {result['model']}  reference {result['reference']}"]
    sections = (
        ("pairs", _pairs_lines),
        ("generation", _generation_lines),
        ("refusal", _refusal_lines),
        ("by_distance", _distance_lines),
    )
    for key, render in sections:
        if key in result:
            lines += [""] + render(result[key])
    return "\n".join(lines)
