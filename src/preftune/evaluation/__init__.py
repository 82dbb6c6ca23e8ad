"""Evaluation of a policy against its reference (`preftune eval`, also callable during training).

pairs.py     held-out pair metrics: accuracy (ties apart), margins, implicit rewards, per length bucket
sampling.py  prompts → sampled responses; their log-probs under the sampling distribution
stats.py     mean ± SE, KL estimate, distinct-n, win rate with a Wilson interval
rewards.py   --reward: a sequence-classification model folder or a module:function
refusal.py   over-refusal and unsafe compliance with a replaceable refusal detector
evaluate.py  options, `run_eval`, `load_inputs`, `evaluate_models`, `flat_metrics`, eval.json
command.py   `preftune eval`: its flags and entry point, calling evaluate.py
table.py     the terminal table
"""
