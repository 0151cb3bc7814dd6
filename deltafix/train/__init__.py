"""Companion trainer: safety-keeping LoRA fine-tuning (SPARD, AsFT, Buffer-and-Reinforce) and DPP selection.

``data`` renders JSONL conversations into labelled token ids, ``dpp`` picks a safety subset,
``spag`` and ``asft`` hold the two safety terms as pure tensor math, ``spard`` runs the loop,
``bufferlora`` chains LoRA trainings and the QR merge into the resumable Buffer-and-Reinforce
pipeline, and ``cli`` is the ``deltafix train`` typer sub-app.
"""
