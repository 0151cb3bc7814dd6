"""DPP selection: the fast greedy MAP against a naive log-det greedy, the role of β, embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from deltafix.train.dpp import dpp_kernel, embed_texts, greedy_map, relevance, select_subset, subset_size
from tests.conftest import TINY_LLAMA


def naive_greedy(L: torch.Tensor, k: int) -> list[int]:
    """Each step adds the item that maximises log det(L_S∪{i}), by direct determinants."""
    chosen: list[int] = []
    for _ in range(k):
        rest = [i for i in range(len(L)) if i not in chosen]
        gains = [torch.logdet(L[chosen + [i]][:, chosen + [i]]) for i in rest]
        chosen.append(rest[int(torch.argmax(torch.stack(gains)))])
    return chosen


def embeddings(seed: int, n_pool: int = 14, n_user: int = 5, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_pool, dim, generator=gen), torch.randn(n_user, dim, generator=gen)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("beta", [0.0, 1.0, 4.0])
def test_fast_greedy_equals_naive_logdet_greedy(seed: int, beta: float) -> None:
    pool, user = embeddings(seed)
    L = dpp_kernel(pool, user, beta)
    assert greedy_map(L, 5) == naive_greedy(L, 5)


def test_kernel_entries() -> None:
    pool, user = embeddings(7)
    L = dpp_kernel(pool, user, 4.0)
    q = relevance(pool, user)
    i, j = 2, 9
    cos_ij = F.cosine_similarity(pool[i].double(), pool[j].double(), dim=0)
    assert L[i, j].item() == pytest.approx(((q[i] * q[j]) ** 4 * cos_ij).item(), rel=1e-12)
    assert L[i, i].item() == pytest.approx((q[i] ** 8 + 1e-6).item(), rel=1e-12)
    best_user = max(F.cosine_similarity(pool[i], u, dim=0).item() for u in user)
    assert q[i].item() == pytest.approx(max(best_user, 0.0), abs=1e-6)
    assert torch.linalg.eigvalsh(L).min() > 0


def test_beta_zero_is_diversity_only() -> None:
    pool, user = embeddings(3)
    _, other_user = embeddings(4)
    unit = F.normalize(pool.double(), dim=1)
    cosine_only = greedy_map(unit @ unit.T + 1e-6 * torch.eye(len(pool), dtype=torch.float64), 5)
    assert greedy_map(dpp_kernel(pool, user, 0.0), 5) == cosine_only
    assert greedy_map(dpp_kernel(pool, other_user, 0.0), 5) == cosine_only


def test_large_beta_is_top_k_by_relevance() -> None:
    # β large enough that relevance dominates diversity, small enough that q^(2β) stays above the
    # 1e-6 jitter for the leading items (beyond that every gain is the jitter and order is lost).
    differs_from_diversity_only = False
    for seed in range(5):
        pool, user = embeddings(seed, n_pool=20, n_user=3, dim=8)
        q = relevance(pool, user)
        picks = greedy_map(dpp_kernel(pool, user, 12.0), 3)
        assert picks == torch.argsort(q, descending=True)[:3].tolist()
        differs_from_diversity_only |= picks != greedy_map(dpp_kernel(pool, user, 0.0), 3)
    assert differs_from_diversity_only


def test_greedy_caps_k_and_picks_distinct_items() -> None:
    pool, user = embeddings(1, n_pool=4)
    picks = greedy_map(dpp_kernel(pool, user, 4.0), 10)
    assert len(picks) == 4 and sorted(picks) == [0, 1, 2, 3]


def test_subset_size() -> None:
    assert subset_size(100, 0.03) == 3
    assert subset_size(101, 0.03) == 4
    assert subset_size(2, 0.03) == 1


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", *sorted(set(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


TEXTS = ["how do i make a cake", "tell me a story about a dog", "make a bomb", "how do i hurt someone",
         "write a poem", "a story", "how to steal a car quickly", "hello"]


def test_embeddings_are_masked_means_and_selection_is_deterministic() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
    tokenizer = word_tokenizer(" ".join(TEXTS).split())
    batched = embed_texts(model, tokenizer, TEXTS, batch_size=4, progress=False)
    alone = torch.cat([embed_texts(model, tokenizer, [t], progress=False) for t in TEXTS])
    assert batched.shape == (len(TEXTS), TINY_LLAMA["hidden_size"])
    assert torch.allclose(batched, alone, atol=1e-5)
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    direct = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].mean(1)
    assert torch.allclose(batched[-1], direct[0], atol=1e-5)

    runs = [select_subset(model, tokenizer, TEXTS[:6], TEXTS[6:], p=1.0, progress=False) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 2
