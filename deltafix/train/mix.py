"""The ReinforceLoRA's training set: refusals mixed with benign answers, as Buffer-and-Reinforce trains it.

The official code (github.com/SeokilHam/Buffer-and-Reinforce: ``script/finetune/reinforcelora_*.sh``
with ``--data_path LAT_safe --poison_ratio 0.5 --sample_num 5000``, read by ``utils.py``'s
``SupervisedDataset``) trains on 2,500 refusals and 2,500 benign Alpaca answers in one shuffled
set. Refusals alone teach the adapter to refuse everything; the benign half teaches it where to
stop. Here every refusal is kept and benign records are added until they are ``share`` of the set.
"""

from __future__ import annotations

import torch

from deltafix.errors import InputError
from deltafix.train.data import Record


def benign_count(refusals: int, share: float) -> int:
    """n such that n / (refusals + n) = share, rounded: ``round(refusals · share / (1 − share))``."""
    return round(refusals * share / (1 - share))


def mix_with_benign(refusals: list[Record], benign: list[Record], share: float, seed: int) -> list[Record]:
    """All ``refusals``, then ``benign_count`` benign records in a seeded random order; a benign set
    smaller than that count is gone through again in the same order (the loader shuffles the whole)."""
    if not benign:
        raise InputError("the ReinforceLoRA needs benign data next to its refusals, or it learns to refuse "
                         "everything; pass --benign FILE (JSONL of prompt/response).")
    order = torch.randperm(len(benign), generator=torch.Generator().manual_seed(seed)).tolist()
    return refusals + [benign[order[i % len(order)]] for i in range(benign_count(len(refusals), share))]
