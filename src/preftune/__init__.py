"""preftune: align language models on preference pairs with Direct Preference Optimization and its family."""

__version__ = "0.1.0"
