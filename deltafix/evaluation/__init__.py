"""Judging a model: generate on harmful, benign and task prompts, score refusals and accuracy
(evaluate, data), and turn the scores into a release verdict with exit codes (gate)."""
