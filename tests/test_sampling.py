"""The MDLM ancestral sampler and its text samples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TOKENIZER, script_env
from train_mdlm import Hyperparameters, InputError, ancestral_sample, encode_sample_prompt, load_tokenizer

VOCAB = 11
MASK = VOCAB


class RecordingDenoiser(nn.Module):
    """Stands in for the model: fixed random logits over the real vocabulary; keeps every input it receives."""

    def __init__(self, length: int):
        super().__init__()
        self.mask_id = MASK
        self.logits = nn.Parameter(torch.randn(length, VOCAB, generator=torch.Generator().manual_seed(3)))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x_t: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x_t.clone())
        return self.logits[: x_t.size(1)].expand(x_t.size(0), -1, -1)


def sample(prefix=(), count=3, length=16, steps=32, seed=0):
    model = RecordingDenoiser(length)
    tokens, passes = ancestral_sample(model, list(prefix), count, length, steps, torch.Generator().manual_seed(seed))
    return model, tokens, passes


def test_sampler_never_changes_revealed_tokens():
    model, tokens, _ = sample()
    states = model.inputs + [tokens]
    for before, after in zip(states, states[1:]):
        revealed = before != MASK
        assert torch.equal(after[revealed], before[revealed])


def test_sampler_ends_without_mask():
    _, tokens, _ = sample()
    assert (tokens != MASK).all()
    assert (tokens >= 0).all()
    assert (tokens < VOCAB).all()


def test_sampler_keeps_prefix_fixed():
    prefix = [4, 7, 1]
    model, tokens, _ = sample(prefix=prefix)
    for state in model.inputs + [tokens]:
        assert state[:, :3].tolist() == [prefix] * 3
    assert (model.inputs[0][:, 3:] == MASK).all()


def test_sampler_fixed_seed_is_deterministic():
    _, first, _ = sample(seed=5)
    _, again, _ = sample(seed=5)
    _, other, _ = sample(seed=6)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sampler_skips_unchanged_passes():
    # 8 positions over 200 steps: most steps reveal nothing and must reuse the last distribution.
    model, _, passes = sample(count=1, length=8, steps=200)
    assert passes == len(model.inputs)
    assert passes <= 8
    for before, after in zip(model.inputs, model.inputs[1:]):
        assert not torch.equal(before, after)


def test_sampler_follows_linear_schedule():
    # Under α_t = 1 − t a token is still masked at time t with probability t, so the inputs at
    # t = 1, 0.75, 0.5, 0.25 hold about that share of masks (4096 positions: std below 0.01).
    model, _, passes = sample(count=64, length=64, steps=4)
    assert passes == 4
    for state, t in zip(model.inputs, (1.0, 0.75, 0.5, 0.25)):
        assert (state == MASK).float().mean().item() == pytest.approx(t, abs=0.03)


def test_prompt_starts_with_bos(tiny_data):
    args = Hyperparameters(script_env(tiny_data, SAMPLE_PROMPT="The cat"))
    sp = load_tokenizer(str(TOKENIZER), args.vocab_size)
    prefix = encode_sample_prompt(sp, args)
    assert prefix[0] == sp.bos_id()
    assert sp.decode(prefix) == "The cat"


def test_prompt_longer_than_sample_rejected(tiny_data):
    args = Hyperparameters(script_env(tiny_data, SAMPLE_PROMPT="one two three four five", SAMPLE_LEN="4"))
    sp = load_tokenizer(str(TOKENIZER), args.vocab_size)
    with pytest.raises(InputError, match="SAMPLE_PROMPT is .* tokens with BOS, which leaves none of SAMPLE_LEN=4"):
        encode_sample_prompt(sp, args)


def test_sample_len_above_seq_len_rejected(tiny_data):
    with pytest.raises(InputError, match="SAMPLE_LEN=65 is out of range: it must be at most 64"):
        Hyperparameters(script_env(tiny_data, SAMPLE_LEN="65"))

