"""Muon, the LR schedule and the EMA."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_ENV
from train_mdlm import EMA, DiffusionTransformer, Hyperparameters, Muon, build_optimizers, lr_scale, muon_momentum, newton_schulz5


def make_args(**overrides) -> Hyperparameters:
    return Hyperparameters({**TINY_ENV, **overrides})


def matrix_with_spectrum(rows: int, cols: int, singular_values: torch.Tensor) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(rows, rows))
    v, _ = torch.linalg.qr(torch.randn(cols, cols))
    k = len(singular_values)
    return u[:, :k] @ torch.diag(singular_values) @ v[:, :k].T


@pytest.mark.parametrize("rows, cols", [(64, 128), (96, 96), (128, 48)])
def test_newton_schulz_lands_in_quintic_band(rows, cols):
    torch.manual_seed(0)
    spectrum = torch.logspace(-1.3, 0, min(rows, cols))  # full rank, condition number 20
    singular = torch.linalg.svdvals(newton_schulz5(matrix_with_spectrum(rows, cols, spectrum), steps=5))
    assert singular.min() >= 0.65
    assert singular.max() <= 1.2


def test_newton_schulz_keeps_singular_vectors():
    torch.manual_seed(0)
    g = matrix_with_spectrum(32, 64, torch.linspace(0.5, 1.0, 32))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    out = newton_schulz5(g, steps=5)
    middle = u.T @ out @ vh.T  # diagonal when out shares g's singular vectors
    assert torch.allclose(middle, torch.diag(torch.diagonal(middle)), atol=1e-3)


def test_newton_schulz_batch_matches_single_matrices():
    torch.manual_seed(0)
    stack = torch.randn(3, 16, 8)
    batched = newton_schulz5(stack, steps=5)
    for i in range(3):
        assert torch.allclose(batched[i], newton_schulz5(stack[i], steps=5), atol=1e-6)


def test_muon_step_matches_definition():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8))
    start = w.detach().clone()
    opt = Muon([w], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.01)
    grads = [torch.randn(16, 8) for _ in range(2)]
    expected, buf = start.clone(), torch.zeros(16, 8)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        update = newton_schulz5(g + 0.9 * buf, 5) * (16 / 8) ** 0.5
        expected = expected * (1 - 0.1 * 0.01) - 0.1 * update
    assert torch.allclose(w.detach(), expected, atol=1e-6)


def test_optimizers_split_matrices_and_scalars():
    model = DiffusionTransformer(make_args(EMBED_LR="0.5", SCALAR_LR="0.25", MATRIX_LR="0.125"))
    embed, scalar, muon = build_optimizers(model, make_args(EMBED_LR="0.5", SCALAR_LR="0.25", MATRIX_LR="0.125"))
    assert embed.param_groups[0]["params"] == [model.tok_emb.weight]
    assert embed.param_groups[0]["lr"] == 0.5
    muon_ids = {id(p) for p in muon.param_groups[0]["params"]}
    scalar_ids = {id(p) for p in scalar.param_groups[0]["params"]}
    assert id(model.blocks[0].attn.c_q.weight) in muon_ids
    assert id(model.blocks[0].mlp.fc.weight) in muon_ids
    assert id(model.blocks[0].resid_mix) in scalar_ids  # 2-D but a control tensor
    assert id(model.skip_weights) in scalar_ids
    assert id(model.blocks[0].attn.q_gain) in scalar_ids
    assert muon.param_groups[0]["lr"] == 0.125
    assert scalar.param_groups[0]["lr"] == 0.25
    assert len(muon_ids) + len(scalar_ids) + 1 == len(list(model.parameters()))


def test_lr_schedule_by_iterations():
    args = make_args(ITERATIONS="100", WARMDOWN_ITERS="20", MAX_WALLCLOCK_SECONDS="0")
    scales = [lr_scale(step, elapsed_ms=0.0, args=args) for step in (0, 50, 80, 90, 95, 100)]
    assert scales == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.25, 0.0])


def test_lr_schedule_shorter_run_than_warmdown():
    args = make_args(ITERATIONS="10", WARMDOWN_ITERS="20", MAX_WALLCLOCK_SECONDS="0")
    scales = [lr_scale(step, 0.0, args) for step in range(11)]
    assert scales == pytest.approx([1 - step / 10 for step in range(11)])


def test_lr_schedule_by_wallclock():
    # 100 ms per step under a 100 s cap: about 1,000 steps, of which the last 200 decay.
    args = make_args(ITERATIONS="100000", WARMDOWN_ITERS="200", MAX_WALLCLOCK_SECONDS="100")
    assert lr_scale(0, 0.0, args) == 1.0
    assert lr_scale(700, 70_000.0, args) == 1.0
    assert lr_scale(900, 90_000.0, args) == pytest.approx(0.5)
    assert lr_scale(1000, 100_000.0, args) == 0.0


def test_lr_schedule_wallclock_shorter_than_warmdown():
    # 1 s per step under a 100 s cap leaves room for 100 steps, fewer than WARMDOWN_ITERS=1200.
    args = make_args(ITERATIONS="20000", WARMDOWN_ITERS="1200", MAX_WALLCLOCK_SECONDS="100")
    assert lr_scale(0, 0.0, args) == 1.0
    assert lr_scale(1, 1000.0, args) == pytest.approx(0.99)
    assert lr_scale(50, 50_000.0, args) == pytest.approx(0.5)
    assert lr_scale(100, 100_000.0, args) == 0.0


def test_muon_momentum_warmup():
    args = make_args(MUON_MOMENTUM="0.95", MUON_MOMENTUM_WARMUP_START="0.85", MUON_MOMENTUM_WARMUP_STEPS="500")
    assert muon_momentum(0, args) == pytest.approx(0.85)
    assert muon_momentum(250, args) == pytest.approx(0.90)
    assert muon_momentum(500, args) == pytest.approx(0.95)
    assert muon_momentum(5000, args) == pytest.approx(0.95)


def test_ema_averages_weights():
    layer = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema = EMA(layer, decay=0.9)
    for value in (2.0, 4.0, 8.0):
        with torch.no_grad():
            layer.weight.fill_(value)
        ema.update()
    expected = 0.9**3 * 1.0 + 0.1 * (0.9**2 * 2.0 + 0.9 * 4.0 + 8.0)
    ema.copy_to_model()
    assert ema.updates == 3
    assert torch.allclose(layer.weight, torch.full((2, 3), expected))


def muon_worker(rank: int, world_size: int, store_path: str, grads: list[torch.Tensor], queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    params = [torch.nn.Parameter(torch.ones(g.shape)) for g in grads]
    opt = Muon(params, lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.01)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    queue.put((rank, [p.detach().numpy().copy() for p in params]))  # by value: tensors would share memory
    torch.distributed.destroy_process_group()


def test_muon_split_across_ranks_matches_one_process(tmp_path):
    torch.manual_seed(0)
    # Three (8, 4) matrices split 2 + 1 over the two ranks, so rank 1 pads one slot. The (6, 6) and
    # (4, 10) matrices each run on rank 0 alone.
    grads = [torch.randn(8, 4), torch.randn(6, 6), torch.randn(8, 4), torch.randn(4, 10), torch.randn(8, 4)]
    params = [torch.nn.Parameter(torch.ones(g.shape)) for g in grads]
    opt = Muon(params, lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.01)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=muon_worker, args=(r, 2, str(tmp_path / "store"), grads, queue)) for r in range(2)]
    for worker in workers:
        worker.start()
    try:
        results = dict(queue.get(timeout=120) for _ in workers)
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.terminate()
    assert [worker.exitcode for worker in workers] == [0, 0]
    for rank in range(2):
        for got, expected in zip(results[rank], params):
            assert torch.allclose(torch.from_numpy(got), expected.detach(), atol=1e-6)
