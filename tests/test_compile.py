"""The training step compiles to one graph: no graph breaks, and only the QAT switch recompiles."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import TINY_ENV
from train_mdlm import DiffusionObjective, DiffusionTransformer, Hyperparameters, draw_mask_noise

# The tiny layout has a looped block and U-Net skips, the parts most likely to break a graph; short
# sequences keep each compile to a few seconds.
ARGS = Hyperparameters({**TINY_ENV, "TRAIN_SEQ_LEN": "16"})


@pytest.fixture(autouse=True)
def fresh_dynamo_cache():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("qat", [False, True])
def test_loss_traces_without_graph_breaks(qat):
    model = DiffusionTransformer(ARGS)
    model.set_qat(qat)
    t, u = draw_mask_noise(0, 0, 4, 16, ARGS.noise_eps, "cpu")
    explanation = torch._dynamo.explain(DiffusionObjective(model, ARGS.noise_eps))(torch.randint(0, 1024, (4, 16)), t, u)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_qat_switch_is_the_only_recompile():
    torch.manual_seed(0)
    model = DiffusionTransformer(ARGS)
    objective = DiffusionObjective(model, ARGS.noise_eps)
    counter = CompileCounterWithBackend("aot_eager")  # AOTAutograd traces the backward as well
    compiled = torch.compile(objective, backend=counter, fullgraph=True, dynamic=False)
    weight = model.blocks[1].attn.proj.weight  # block 1 is looped. Its proj weight starts at zero, its gradient does not.
    # Two micro-batches cut from one batch, as Trainer.micro_batches does: views at different offsets.
    batch = torch.randint(0, 1024, (8, 16))
    t, u = draw_mask_noise(0, 1, 8, 16, ARGS.noise_eps, "cpu")
    micro_batches = list(zip(batch.chunk(2), t.chunk(2), u.chunk(2)))
    for qat in (False, True):
        model.set_qat(qat)
        for micro in micro_batches:
            compiled(*micro).backward()
            compiled_grad = weight.grad.clone()
            model.zero_grad()
            objective(*micro).backward()
            assert compiled_grad.abs().sum() > 0
            assert torch.allclose(compiled_grad, weight.grad, atol=1e-6)  # the counted graphs are the step
            model.zero_grad()
    assert counter.frame_count == 2
