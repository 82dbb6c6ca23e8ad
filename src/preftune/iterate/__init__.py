"""`preftune iterate`: rounds of on-policy (iterative) preference training from a prompt file.

pairs.py     k scored responses per prompt → preference pairs, with every skip counted (pure)
loop.py      the rounds: sample → score → pairs → train → evaluate, each stage's files, resume, summary
command.py   the flags → loop.run
"""
