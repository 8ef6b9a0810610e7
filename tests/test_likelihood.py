"""The likelihood estimators against values computed by enumeration on a tiny random model.

The model has 3 real tokens plus [MASK] and sequences of 4 tokens, so every sequence, every mask
and every generation order can be listed.
"""

from __future__ import annotations

import itertools
import math
from contextlib import nullcontext

import pytest
import torch

from train_mdlm import DiffusionTransformer, Hyperparameters, evaluate, parse_eval_methods, score_sequences

VOCAB, LENGTH = 3, 4
TINY = {
    "VOCAB_SIZE": str(VOCAB),
    "TRAIN_SEQ_LEN": str(LENGTH),
    "NUM_LAYERS": "2",
    "MODEL_DIM": "8",
    "NUM_HEADS": "2",
    "NUM_KV_HEADS": "1",
    "UNET_SKIPS": "1",
    "LOOP_START": "0",
    "LOOP_END": "1",
    "EVAL_PASSES": "4",
    "EVAL_BATCH_TOKENS": "64",
}


@pytest.fixture(scope="module")
def model() -> DiffusionTransformer:
    torch.manual_seed(0)
    model = DiffusionTransformer(Hyperparameters(TINY))
    with torch.no_grad():
        for p in model.parameters():  # far from the near-uniform initialization, context matters
            p.add_(torch.randn_like(p))
    return model.eval()


ALL_SEQUENCES = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))


@torch.no_grad()
def nll(model, x: torch.Tensor, hidden: tuple[int, ...]) -> torch.Tensor:
    """−log p(x_i | x with the positions in hidden set to [MASK]), for every position i, in float64."""
    x_t = x.clone()
    x_t[list(hidden)] = VOCAB
    return -torch.log_softmax(model(x_t[None]).double()[0], dim=-1).gather(1, x[:, None])[:, 0]


def exact_nelbo(model, x: torch.Tensor) -> float:
    """Σ_m (1/m) · mean over |M| = m of Σ_{i∈M} −log p(x_i | x_{−M}): the continuous-time NELBO."""
    total = 0.0
    for m in range(1, LENGTH + 1):
        subsets = list(itertools.combinations(range(LENGTH), m))
        total += sum(nll(model, x, s)[list(s)].sum().item() for s in subsets) / len(subsets) / m
    return total


def order_code_length(model, x: torch.Tensor, order: tuple[int, ...]) -> float:
    """Code length of x generated one token at a time in the given order, from all-[MASK]."""
    return sum(nll(model, x, order[k:])[order[k]].item() for k in range(LENGTH))


def discrete_nelbo(model, x: torch.Tensor, steps: int) -> float:
    """T-step NELBO: Σ_{i=1..T} (α_{s}−α_{t})/(1−α_{t}) · E_{M~Bern(t)}[Σ_M −log p] with t = i/T, which is 1/i."""
    total = 0.0
    masks = [s for m in range(1, LENGTH + 1) for s in itertools.combinations(range(LENGTH), m)]
    losses = {s: nll(model, x, s)[list(s)].sum().item() for s in masks}
    for i in range(1, steps + 1):
        t = i / steps
        expected = sum(t ** len(s) * (1 - t) ** (LENGTH - len(s)) * losses[s] for s in masks)
        total += expected / i
    return total


def sequence_nats(model, name: str, seqs: torch.Tensor, **overrides) -> torch.Tensor:
    args = Hyperparameters({**TINY, **overrides})
    (method,) = parse_eval_methods(name, LENGTH, args.eval_passes)
    return score_sequences(model, method, seqs, args, 0, 1, nullcontext).sum(dim=1)


@pytest.mark.parametrize("block", [1, 2, 3, 4])
def test_chain_probabilities_sum_to_one(model, block):
    nats = sequence_nats(model, f"chain{block}", ALL_SEQUENCES)
    assert torch.exp(-nats).sum().item() == pytest.approx(1.0, abs=1e-5)  # float32 logits


def test_chain1_is_left_to_right_likelihood(model):
    nats = sequence_nats(model, "chain1", ALL_SEQUENCES[:20])
    for x, value in zip(ALL_SEQUENCES[:20], nats):
        assert value.item() == pytest.approx(order_code_length(model, x, tuple(range(LENGTH))), rel=1e-6)


def test_nelbo_equals_mean_over_generation_orders(model):
    for x in ALL_SEQUENCES[::7]:
        orders = list(itertools.permutations(range(LENGTH)))
        any_order = sum(order_code_length(model, x, order) for order in orders) / len(orders)
        assert exact_nelbo(model, x) == pytest.approx(any_order, rel=1e-9)


def test_discrete_nelbo_approaches_continuous(model):
    x = ALL_SEQUENCES[40]
    continuous = exact_nelbo(model, x)
    gaps = [abs(discrete_nelbo(model, x, steps) - continuous) for steps in (4, 16, 64, 256)]
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-2 * continuous
    assert gaps[0] > 5 * gaps[-1]


def test_elbo_estimator_is_unbiased_with_honest_stderr(model):
    seqs = ALL_SEQUENCES[[3, 17, 40, 58, 77]]
    exact_total = sum(exact_nelbo(model, x) for x in seqs)
    total_bytes = 10
    method = parse_eval_methods("elbo", LENGTH, 4)[0]
    estimates, reported = [], []
    for seed in range(400):
        args = Hyperparameters({**TINY, "EVAL_SEED": str(seed)})
        result = evaluate(model, method, seqs, total_bytes, args, 0, 1, nullcontext)
        estimates.append(result.val_loss * seqs.numel())
        reported.append(result.stderr_bpb * math.log(2) * total_bytes)  # back to nats
    estimates = torch.tensor(estimates, dtype=torch.float64)
    spread = estimates.std().item()
    assert spread > 0
    assert abs(estimates.mean().item() - exact_total) < 4 * spread / math.sqrt(len(estimates))
    typical_reported = math.sqrt(sum(r * r for r in reported) / len(reported))
    assert typical_reported == pytest.approx(spread, rel=0.2)


def test_elbo_covers_every_mask_count(model):
    """With one stratum per mask count, a pass per m, the estimator is exact up to which positions are masked."""
    x = ALL_SEQUENCES[[40]]
    values = [sequence_nats(model, "elbo", x, EVAL_PASSES="8", EVAL_SEED=str(seed)).item() for seed in range(300)]
    assert sum(values) / len(values) == pytest.approx(exact_nelbo(model, x[0]), rel=0.03)
