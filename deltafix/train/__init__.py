"""Companion trainer: LoRA fine-tuning that keeps safety (SPARD, AsFT penalty) and DPP data selection.

``data`` renders JSONL conversations into labelled token ids, ``dpp`` picks a safety subset,
``spag`` and ``asft`` hold the two safety terms as pure tensor math, ``spard`` runs the loop and
``cli`` is the ``deltafix train`` typer sub-app.
"""
