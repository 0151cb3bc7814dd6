"""Relevance-diversity selection of safety data with a DPP (SPARD step 1).

Each candidate i gets an embedding e_i (mean of the model's last hidden state over its prompt) and
a relevance q_i = max_z cos(e_i, e_z) over the user's prompts. The kernel
``L_ij = (q_i q_j)^β cos(e_i, e_j) + 1e-6 [i = j]`` rewards sets that are relevant to the user's
task (q^β) yet spread out (the cosine Gram's determinant); the MAP set of size
``k = ⌈p · |D_user|⌉`` is found greedily with the incremental Cholesky updates of Chen, Zhang and
Zhou, "Fast Greedy MAP Inference for Determinantal Point Process" (NeurIPS 2018), O(N k²).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deltafix.env import bar, progress_bars
from deltafix.options import DPP_BATCH_SIZE, DPP_BETA, DPP_P

JITTER = 1e-6


@torch.no_grad()
def embed_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                batch_size: int = DPP_BATCH_SIZE, max_length: int = 512, progress: bool = True) -> torch.Tensor:
    """(n, hidden) fp32 CPU: attention-masked mean of the last hidden state over each text's tokens."""
    model.eval()
    device = next(model.parameters()).device
    chunks = []
    with progress_bars(progress):
        for start in bar(range(0, len(texts), batch_size), desc="embed", unit="batch"):
            enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                            padding_side="right", return_tensors="pt").to(device)
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           output_hidden_states=True).hidden_states[-1].float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            chunks.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
    return torch.cat(chunks)


def relevance(emb_pool: torch.Tensor, emb_user: torch.Tensor) -> torch.Tensor:
    """(n_pool,) q_i = max_z cos(e_i, e_z), clamped at 0 so that (q_i q_j)^β is defined for any β."""
    cos = F.normalize(emb_pool.double(), dim=1) @ F.normalize(emb_user.double(), dim=1).T
    return cos.max(dim=1).values.clamp(min=0)


def dpp_kernel(emb_pool: torch.Tensor, emb_user: torch.Tensor, beta: float) -> torch.Tensor:
    """(n_pool, n_pool) fp64 L = diag(q^β) · cos · diag(q^β) + 1e-6 I, positive definite."""
    unit = F.normalize(emb_pool.double(), dim=1)
    weight = relevance(emb_pool, emb_user) ** beta
    return weight[:, None] * (unit @ unit.T) * weight[None, :] + JITTER * torch.eye(len(unit), dtype=torch.float64)


def greedy_map(L: torch.Tensor, k: int) -> list[int]:
    """Greedy MAP of the DPP with kernel L (n, n): k indices, each maximising log det(L_S) in turn.

    Row c_i of the Cholesky factor of L_S is grown by one entry per pick, and d_i² holds the Schur
    complement L_ii − ‖c_i‖², the gain in det of adding i; picking argmax d_i² is the greedy step.
    Stops early if every remaining gain is numerically zero.
    """
    L = L.double()
    n = L.shape[0]
    k = min(k, n)
    cis = torch.zeros(k, n, dtype=torch.float64)
    d2 = torch.diagonal(L).clone()
    selected = [int(torch.argmax(d2))]
    while len(selected) < k:
        m = len(selected) - 1
        j = selected[-1]
        e = (L[j] - cis[:m, j] @ cis[:m]) / torch.sqrt(d2[j])
        cis[m] = e
        d2 = d2 - e * e
        d2[selected] = -math.inf
        j = int(torch.argmax(d2))
        if d2[j] <= 0:
            break
        selected.append(j)
    return selected


def subset_size(n_user: int, p: float) -> int:
    """k = ⌈p · |D_user|⌉, at least 1."""
    return max(1, math.ceil(p * n_user))


def select_subset(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pool_prompts: list[str],
                  user_prompts: list[str], p: float = DPP_P, beta: float = DPP_BETA, batch_size: int = DPP_BATCH_SIZE,
                  progress: bool = True) -> list[int]:
    """Indices into ``pool_prompts`` of the DPP-selected safety subset, in greedy order."""
    emb_pool = embed_texts(model, tokenizer, pool_prompts, batch_size, progress=progress)
    emb_user = embed_texts(model, tokenizer, user_prompts, batch_size, progress=progress)
    return greedy_map(dpp_kernel(emb_pool, emb_user, beta), subset_size(len(user_prompts), p))
