"""Model layout, the diffusion objective and the trap8 estimator."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_ENV
from train_mdlm import (
    TRAP8_MASK_RATES,
    DiffusionTransformer,
    Hyperparameters,
    diffusion_loss,
    draw_mask_noise,
    evaluate,
    loss_positions,
    mask_tokens,
    parse_eval_methods,
    sample_mask_rates,
    trapezoid_weights,
)


def make_args(**overrides) -> Hyperparameters:
    return Hyperparameters({**TINY_ENV, **overrides})


def test_default_recurrence_runs_12_block_applications():
    args = make_args(NUM_LAYERS="9", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2", UNET_SKIPS="3", LOOP_START="1", LOOP_END="4", LOOP_EXTRA="1")
    model = DiffusionTransformer(args)
    calls = []
    for index, block in enumerate(model.blocks):
        block.register_forward_hook(lambda module, inputs, output, index=index: calls.append(index))
    model(torch.randint(0, 1024, (1, 16)))
    assert len(model.blocks) == 9
    assert calls == [0, 1, 2, 3, 1, 2, 3, 4, 5, 6, 7, 8]
    assert model.block_schedule() == calls


def test_loop_extra_repeats_loop_blocks():
    model = DiffusionTransformer(make_args(NUM_LAYERS="6", UNET_SKIPS="3", LOOP_START="0", LOOP_END="2", LOOP_EXTRA="2"))
    assert model.block_schedule() == [0, 1, 2, 0, 1, 0, 1, 3, 4, 5]


def test_head_never_predicts_mask():
    args = make_args()
    model = DiffusionTransformer(args)
    logits = model(torch.full((2, 8), args.vocab_size))
    assert logits.shape == (2, 8, args.vocab_size)  # one logit per real token, none for [MASK] = VOCAB_SIZE
    assert model.tok_emb.num_embeddings == args.vocab_size + 1


def test_attention_sees_both_directions():
    torch.manual_seed(0)
    model = DiffusionTransformer(make_args())
    for p in model.parameters():  # zero-init projections would hide the attention path
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 1024, (1, 16))
    changed = x.clone()
    changed[0, -1] = (x[0, -1] + 1) % 1024
    first_logits, first_logits_changed = model(x)[0, 0], model(changed)[0, 0]
    assert not torch.allclose(first_logits, first_logits_changed)


def test_initialization():
    torch.manual_seed(0)
    model = DiffusionTransformer(make_args(TIED_EMBED_INIT_STD="0.005"))
    block = model.blocks[0]
    assert torch.count_nonzero(block.attn.proj.weight) == 0
    assert torch.count_nonzero(block.mlp.proj.weight) == 0
    q = block.attn.c_q.weight
    assert torch.allclose(q @ q.T, torch.eye(q.size(0)), atol=1e-5)  # orthogonal
    assert torch.all(block.attn.q_gain == 1.5)
    assert abs(model.tok_emb.weight.std().item() - 0.005) < 0.0005


def test_logits_respect_softcap():
    model = DiffusionTransformer(make_args(LOGIT_SOFTCAP="2.0"))
    model.tok_emb.weight.data.mul_(1e4)
    logits = model(torch.randint(0, 1024, (1, 8)))
    assert logits.abs().max() <= 2.0


def test_mask_rates_come_in_antithetic_pairs():
    torch.manual_seed(0)
    t = sample_mask_rates(10, 0.05, "cpu")
    assert t.shape == (10,)
    assert torch.allclose(t[0::2] + t[1::2], torch.full((5,), 1.05))  # adjacent rows pair up
    assert t.min() >= 0.05
    assert t.max() <= 1.0
    assert sample_mask_rates(7, 0.05, "cpu").shape == (7,)


def test_mask_noise_depends_only_on_seed_and_step():
    t, u = draw_mask_noise(7, 3, 6, 32, 0.05, "cpu")
    again_t, again_u = draw_mask_noise(7, 3, 6, 32, 0.05, "cpu")
    assert torch.equal(t, again_t)
    assert torch.equal(u, again_u)
    for seed, step in ((7, 4), (8, 3)):
        _, other_u = draw_mask_noise(seed, step, 6, 32, 0.05, "cpu")
        assert not torch.equal(u, other_u)


def test_mask_noise_shape_and_range():
    t, u = draw_mask_noise(7, 3, 6, 32, 0.05, "cpu")
    assert torch.allclose(t[0::2] + t[1::2], torch.full((3,), 1.05))
    assert u.shape == (6, 32)
    assert u.min() >= 0
    assert u.max() < 1


def test_mask_fraction_follows_rate():
    torch.manual_seed(0)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    length = 20_000
    x0 = torch.randint(0, 1024, (4, length))
    x_t, masked = mask_tokens(x0, t, torch.rand(x0.shape), mask_id=1024)
    fraction = masked.float().mean(dim=1)
    tolerance = 5 * torch.sqrt(t * (1 - t) / length) + 1e-9
    assert torch.all((fraction - t).abs() <= tolerance)
    assert torch.equal(x_t[masked], torch.full_like(x_t[masked], 1024))
    assert torch.equal(x_t[~masked], x0[~masked])


def test_loss_positions_cover_every_masked_token():
    torch.manual_seed(0)
    t = sample_mask_rates(8, 0.05, "cpu")
    _, masked = mask_tokens(torch.zeros(8, 64, dtype=torch.long), t, torch.rand(8, 64), mask_id=1024)
    positions = loss_positions(masked, 0.05).tolist()
    # 4 antithetic pairs mask 4·1.05·64 = 268.8 tokens on average; the margin is 4·sqrt(512) = 90.5.
    assert len(positions) == 360
    assert len(set(positions)) == 360
    assert set(masked.flatten().nonzero().flatten().tolist()) <= set(positions)


def test_loss_positions_budget_of_odd_batch():
    masked = torch.zeros(3, 1000, dtype=torch.bool)
    # One pair masks 1.05·1000 tokens on average, the odd row at most 1000; the margin is 4·sqrt(3000) = 219.1.
    assert len(loss_positions(masked, 0.05)) == 2270


def test_loss_weights_masked_by_inverse_rate():
    model = DiffusionTransformer(make_args())
    x0 = torch.randint(0, 1024, (4, 32))
    t = torch.tensor([0.3, 0.75, 0.05, 1.0])
    u = torch.rand(x0.shape)
    loss = diffusion_loss(model, x0, t, u, 0.05, 1024)
    masked = u < t[:, None]
    logits = model(torch.where(masked, 1024, x0))
    expected = 0.0
    for row in range(4):
        nll = F.cross_entropy(logits[row], x0[row], reduction="none")
        expected += nll[masked[row]].sum() / t[row]
    assert torch.allclose(loss, expected / x0.numel())


def test_trapezoid_weights_of_trap8():
    weights = trapezoid_weights(TRAP8_MASK_RATES)
    assert weights == pytest.approx([0.025, 0.075, 0.125, 0.15, 0.15, 0.15, 0.15, 0.075])
    assert sum(weights) == pytest.approx(0.9)


class UniformDenoiser(torch.nn.Module):
    """Predicts every token with probability 1/V, whatever the input."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # evaluate reads the device from the first parameter

    def forward(self, x_t):
        return torch.zeros(*x_t.shape, self.vocab_size) + self.anchor


def test_trap8_of_uniform_model():
    args = make_args(TRAIN_SEQ_LEN="256", EVAL_BATCH_TOKENS="8192")
    val = torch.randint(0, 1024, (64, 256))
    (trap8,) = parse_eval_methods("trap8", 256, 2)
    result = evaluate(UniformDenoiser(1024), trap8, val, total_bytes=40_000, args=args, rank=0, world_size=1, autocast=nullcontext)
    # E[(1/t)·#masked] = L at every rate, so the estimate is Σ w_j · ln V per token, within sampling noise.
    assert result.val_loss == pytest.approx(0.9 * math.log(1024), rel=0.01)
    assert result.val_bpb == pytest.approx(result.val_loss * val.numel() / math.log(2) / 40_000, rel=1e-12)


def test_trap8_deterministic_across_batching():
    torch.manual_seed(0)
    model = DiffusionTransformer(make_args())
    val = torch.randint(0, 1024, (10, 64))
    (trap8,) = parse_eval_methods("trap8", 64, 2)

    def score(**overrides):
        return evaluate(model, trap8, val, 1000, make_args(**overrides), 0, 1, nullcontext).val_bpb

    small = score(EVAL_BATCH_TOKENS="128")
    assert small == score(EVAL_BATCH_TOKENS="128")
    assert small == pytest.approx(score(EVAL_BATCH_TOKENS="65536"), rel=1e-6)
    assert small != score(EVAL_BATCH_TOKENS="128", EVAL_SEED="1")
