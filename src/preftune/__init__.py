"""preftune: align language models on preference pairs with Direct Preference Optimization and its family.

The Python API (see `preftune.api`): `TrainConfig`, `train`, `evaluate` (with `EvalOptions`), `audit`, and
`UserError`, the one-line error every user mistake raises. They load on first use, so `import preftune` stays quick
(torch is imported only by what needs it).
"""

__version__ = "0.1.0"
__all__ = ["EvalOptions", "TrainConfig", "UserError", "audit", "evaluate", "train"]

_HOMES = {
    "TrainConfig": "preftune.config",
    "EvalOptions": "preftune.evaluation.evaluate",
    "UserError": "preftune.errors",
    "train": "preftune.api",
    "evaluate": "preftune.api",
    "audit": "preftune.api",
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'preftune' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
