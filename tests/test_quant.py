"""QAT, the clip search and the exported artifact."""

from __future__ import annotations

import io
import zlib

import pytest
import torch

from conftest import TINY_ENV
from train_mdlm import (
    CLIP_PERCENTILES,
    CastedLinear,
    DiffusionTransformer,
    Hyperparameters,
    export_artifact,
    load_artifact,
    quantize_with_clip_search,
)


def reference_row_quantization(row: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-row int8 written out plainly: float16 scale clip/127, round, saturate at ±127, dequantize."""
    scale = float(torch.tensor(max(clip / 127, 2.0**-14), dtype=torch.float16))
    return torch.clamp(torch.round(row / scale), -127, 127) * scale


def test_qat_straight_through_int8():
    torch.manual_seed(0)
    layer = CastedLinear(16, 8)
    torch.nn.init.normal_(layer.weight)
    layer.qat = True
    x = torch.randn(4, 16, requires_grad=True)
    out = layer(x)
    quantized = torch.stack([reference_row_quantization(row, row.abs().max().item()) for row in layer.weight.detach()])
    assert not torch.equal(quantized, layer.weight.detach())
    assert torch.allclose(out, x @ quantized.T, atol=1e-6)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert torch.allclose(layer.weight.grad, upstream.T @ x.detach(), atol=1e-6)  # d(xWᵀ)/dW, as if unquantized


def test_clip_search_picks_least_error_candidate():
    torch.manual_seed(0)
    w = torch.randn(16, 2000)
    q, scale = quantize_with_clip_search(w)
    assert q.dtype == torch.int8
    assert scale.dtype == torch.float16
    chosen = q.float() * scale.float()[:, None]
    winners = set()
    for i, row in enumerate(w):
        errors = []
        for percentile in CLIP_PERCENTILES:
            clip = torch.quantile(row.abs(), percentile / 100).item()
            errors.append((reference_row_quantization(row, clip) - row).square().sum().item())
        chosen_error = (chosen[i] - row).square().sum().item()
        assert chosen_error == pytest.approx(min(errors), rel=1e-5)
        winners.add(errors.index(min(errors)))
    assert len(winners) >= 3  # rows really choose different clips


def test_artifact_roundtrip_gives_dequantized_logits():
    torch.manual_seed(0)
    args = Hyperparameters(TINY_ENV)
    model = DiffusionTransformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    blob = export_artifact(model, "zlib")
    fresh = DiffusionTransformer(args)
    state, settings = load_artifact(blob)
    fresh.load_state_dict(state)
    assert settings == model.settings
    expected = DiffusionTransformer(args)
    expected.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in expected.named_parameters():
            if p.ndim == 2 and name != "skip_weights" and not name.endswith("resid_mix"):
                q, scale = quantize_with_clip_search(p)
                p.copy_(q.float() * scale.float()[:, None])
    x = torch.randint(0, args.vocab_size + 1, (2, 32))
    assert torch.equal(fresh(x), expected(x))
    assert not torch.equal(fresh(x), model(x))


def test_artifact_contents():
    args = Hyperparameters(TINY_ENV)
    model = DiffusionTransformer(args)
    artifact = torch.load(io.BytesIO(zlib.decompress(export_artifact(model, "zlib"))), weights_only=True)
    assert artifact["format"] == "mdlm_int8_per_row_v1"
    assert "tok_emb.weight" in artifact["int8"]
    assert "blocks.0.attn.c_q.weight" in artifact["int8"]
    assert all(q.dtype == torch.int8 for q in artifact["int8"].values())
    for name in ("skip_weights", "blocks.0.resid_mix", "blocks.0.attn.q_gain", "blocks.0.attn_scale"):
        assert artifact["float"][name].dtype == torch.float32
    assert set(artifact["int8"]) | set(artifact["float"]) == set(model.state_dict())
    expected = {"TRAIN_SEQ_LEN": 64, "LOOP_START": 1, "LOOP_END": 2, "LOOP_EXTRA": 1, "ROPE_BASE": 10000.0, "LOGIT_SOFTCAP": 30.0}
    assert artifact["settings"] == expected


def test_zstd_artifact_roundtrip():
    zstandard = pytest.importorskip("zstandard")
    model = DiffusionTransformer(Hyperparameters(TINY_ENV))
    blob = export_artifact(model, "zstd")
    assert blob.startswith(b"\x28\xb5\x2f\xfd")
    raw = zstandard.ZstdDecompressor().decompress(blob)
    assert raw == zlib.decompress(export_artifact(model, "zlib"))
    state, _ = load_artifact(blob)
    assert set(state) == set(model.state_dict())
