"""Benchmark train_mdlm.py's training step and evaluation forward pass, and print one key:value line per figure.

The shape, the batch and the runtime come from the script's own environment variables (NUM_LAYERS,
MODEL_DIM, TRAIN_SEQ_LEN, TRAIN_BATCH_TOKENS, MICRO_BATCH_TOKENS, EVAL_BATCH_TOKENS, TORCH_COMPILE, DEVICE
and the rest). The BENCH_* variables below set the timing. It runs one process, so TRAIN_BATCH_TOKENS is
the batch of the one device: 65536 matches the reference run's per-GPU share of 524288 on 8 GPUs.
Pytest does not collect this file (its name does not start with test_). From the repository root:

    DATA_PATH=./data/datasets/fineweb_sample_sp1024 python3 tests/bench_train_step.py

Model FLOPs per token are counted from the shapes, dense over every position: 2 per weight of every
matmul in every block application (the loop included) and in the head, plus 4·L·d per block application
for attention's scores and value products at length L and width d. A training token costs 3 times that
(forward, and a backward of twice the forward). The script's step is also timed against a plain eager
step of the same model written out below, in alternating pairs, so that load changes on a busy machine
affect both steps alike.
"""

from __future__ import annotations

import copy
import glob
import itertools
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_mdlm  # noqa: E402
from train_mdlm import InputError, Trainer, env_float, env_int  # noqa: E402

H100_SXM_DENSE_BF16_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense (without sparsity)


class BenchSettings:
    def __init__(self, env=os.environ):
        self.steps = env_int(env, "BENCH_STEPS", 10, low=1)  # timed optimizer steps, and pairs with the reference
        self.warmup_steps = env_int(env, "BENCH_WARMUP_STEPS", 3, low=1)  # untimed first steps (compiles)
        self.eval_passes = env_int(env, "BENCH_EVAL_PASSES", 5, low=1)  # timed evaluation forward passes
        self.peak_tflops = env_float(env, "BENCH_PEAK_TFLOPS", H100_SXM_DENSE_BF16_TFLOPS, low=1e-6)  # MFU denominator
        self.late_phase = env_int(env, "BENCH_LATE_PHASE", 0, low=0, high=1)  # 1: QAT on and an EMA update per step
        self.reference = env_int(env, "BENCH_REFERENCE", 1, low=0, high=1)  # 0: skip the plain reference step


# -----------------------------
# FLOP COUNT
# -----------------------------


def forward_flops_per_token(args, block_applications: int) -> int:
    """Count dense forward FLOPs per position: matmul weights of every block application and the head, plus attention."""
    dim = args.model_dim
    kv_dim = args.num_kv_heads * (dim // args.num_heads)
    block_weights = 2 * dim * dim + 2 * dim * kv_dim + 2 * args.mlp_mult * dim * dim  # q and proj, k and v, fc and proj
    matmul_weights = block_applications * block_weights + args.vocab_size * dim
    attention = block_applications * 4 * args.train_seq_len * dim
    return 2 * matmul_weights + attention


# -----------------------------
# PLAIN REFERENCE STEP
# -----------------------------
# The script's model and update written the obvious way: eager, k and v heads repeated for GQA, logits
# and the loss over every position, one optimizer update per parameter in a Python loop.


def plain_fake_quantize(w: torch.Tensor) -> torch.Tensor:
    scale = (w.detach().abs().amax(dim=1, keepdim=True) / 127).clamp_min(2.0**-14).half().float()
    return w + (torch.clamp(torch.round(w.detach() / scale), -127, 127) * scale - w.detach())


def plain_rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """Apply RoPE to (batch, heads, length, head_dim) by rotating the pairs (i, i + head_dim/2) by position·base^(−2i/head_dim)."""
    length, head_dim = x.size(2), x.size(3)
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=x.device) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=x.device), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class PlainModel:
    """Forward pass of a DiffusionTransformer's weights, written without the script's code."""

    def __init__(self, model, args, qat: bool):
        self.model, self.args, self.qat = model, args, qat

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return plain_fake_quantize(w) if self.qat else w

    def block(self, block, x, x0):
        args = self.args
        batch, length, dim = x.shape
        heads, kv_heads, head_dim = args.num_heads, args.num_kv_heads, dim // args.num_heads
        x = block.resid_mix[0] * x + block.resid_mix[1] * x0
        h = F.rms_norm(x, (dim,))
        q = F.linear(h, self.weight(block.attn.c_q.weight)).view(batch, length, heads, head_dim).transpose(1, 2)
        k = F.linear(h, self.weight(block.attn.c_k.weight)).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = F.linear(h, self.weight(block.attn.c_v.weight)).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q = plain_rotary(F.rms_norm(q, (head_dim,)), args.rope_base) * block.attn.q_gain.to(q.dtype)[:, None, None]
        k = plain_rotary(F.rms_norm(k, (head_dim,)), args.rope_base)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, dim)
        x = x + block.attn_scale * F.linear(y, self.weight(block.attn.proj.weight))
        h = F.relu(F.linear(F.rms_norm(x, (dim,)), self.weight(block.mlp.fc.weight))) ** 2
        return x + block.mlp_scale * F.linear(h, self.weight(block.mlp.proj.weight))

    def logits(self, x_t: torch.Tensor) -> torch.Tensor:
        model, args = self.model, self.args
        embedding = self.weight(model.tok_emb.weight)
        x = F.rms_norm(embedding[x_t], (args.model_dim,))
        x0, skips = x, []
        encoder = args.num_layers // 2
        for i in range(encoder):
            x = self.block(model.blocks[i], x, x0)
            skips.append(x)
        for _ in range(args.loop_extra):
            for i in range(args.loop_start, args.loop_end):
                x = self.block(model.blocks[i], x, x0)
        for j, i in enumerate(range(encoder, args.num_layers)):
            if j < args.unet_skips:
                x = x + model.skip_weights[j] * skips.pop()
            x = self.block(model.blocks[i], x, x0)
        logits = F.linear(F.rms_norm(x, (args.model_dim,)), embedding[: args.vocab_size]).float()
        return args.logit_softcap * torch.tanh(logits / args.logit_softcap)

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        """Compute the dense MDLM loss: cross-entropy at every position, masked, weighted by 1/t, averaged over B·L positions."""
        eps, batch = self.args.noise_eps, x0.size(0)
        t = eps + (1 - eps) * torch.rand((batch + 1) // 2, device=x0.device)
        t = torch.cat((t, 1 + eps - t))[:batch]
        masked = torch.rand(x0.shape, device=x0.device) < t[:, None]
        logits = self.logits(torch.where(masked, self.args.vocab_size, x0))
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x0.reshape(-1), reduction="none").view_as(x0)
        return (nll * masked / t[:, None]).sum() / x0.numel()


def plain_newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    x = x / (x.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    return x.T if tall else x


class PlainStep:
    """One optimizer step of a private copy of the model: the plain loss, Adam and a per-matrix Muon loop."""

    def __init__(self, model, args, runtime, loader, accum_steps: int, qat: bool):
        self.model = copy.deepcopy(model)
        self.plain_model = PlainModel(self.model, args, qat)
        self.args, self.runtime, self.loader = args, runtime, loader
        self.accum_steps = accum_steps
        self.matrices, adam_embed, adam_scalar = [], [], []
        for name, p in self.model.named_parameters():
            if name == "tok_emb.weight":
                adam_embed.append(p)
            elif p.ndim == 2 and not train_mdlm.is_control_tensor(name):
                self.matrices.append(p)
            else:
                adam_scalar.append(p)
        groups = [dict(params=adam_embed, lr=args.embed_lr), dict(params=adam_scalar, lr=args.scalar_lr)]
        self.adam = torch.optim.Adam(groups, betas=(args.beta1, args.beta2), eps=args.adam_eps, foreach=False, fused=False)
        self.buffers = [torch.zeros_like(p) for p in self.matrices]

    def __call__(self) -> None:
        args = self.args
        for micro in self.loader.next_batch().chunk(self.accum_steps):
            with self.runtime.autocast():
                loss = self.plain_model.loss(micro)
            (loss / self.accum_steps).backward()
        self.adam.step()
        with torch.no_grad():
            for p, buf in zip(self.matrices, self.buffers):
                buf.mul_(args.muon_momentum).add_(p.grad)
                update = plain_newton_schulz(p.grad + args.muon_momentum * buf, args.muon_backend_steps)
                update = update.float() * max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.mul_(1 - args.matrix_lr * args.muon_weight_decay).sub_(args.matrix_lr * update)
        self.model.zero_grad(set_to_none=True)


# -----------------------------
# TIMING
# -----------------------------


class SyntheticLoader:
    """Uniform random tokens made on the device, for a DATA_PATH without shards."""

    def __init__(self, args, seqs_per_rank: int, device):
        self.shape = (seqs_per_rank, args.train_seq_len)
        self.vocab_size, self.device = args.vocab_size, device

    def next_batch(self) -> torch.Tensor:
        return torch.randint(0, self.vocab_size, self.shape, device=self.device)


def timed_ms(fn, runtime) -> float:
    runtime.synchronize()
    start = time.perf_counter()
    fn()
    runtime.synchronize()
    return 1000.0 * (time.perf_counter() - start)


def reset_peak_memory(runtime) -> None:
    """Reset CUDA's memory high-water mark. The CPU figure, the process's peak RSS, has no reset."""
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)


def peak_memory_mib(runtime) -> float:
    """Return the device memory high-water mark since the last reset on CUDA, or the process's peak RSS on the CPU."""
    if runtime.device.type == "cuda":
        return torch.cuda.max_memory_allocated(runtime.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flash_attention_available(args, runtime) -> bool:
    """Probe whether SDPA's flash kernel takes this shape's q, k, v (bf16, GQA) by running with only that kernel allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    head_dim = args.model_dim // args.num_heads
    q = torch.randn(1, args.num_heads, args.train_seq_len, head_dim, device=runtime.device, dtype=torch.bfloat16)
    kv = torch.randn(1, args.num_kv_heads, args.train_seq_len, head_dim, device=runtime.device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, kv, kv, enable_gqa=args.num_kv_heads != args.num_heads)
    except RuntimeError:
        return False
    return True


def report(name: str, value) -> None:
    print(f"{name}:{value:.4g}" if isinstance(value, float) else f"{name}:{value}", flush=True)


def report_throughput(phase: str, unit: str, tokens: int, ms: float, flops_per_token: int, settings, runtime) -> None:
    """Report the tokens and median ms per unit, then tokens/s, FLOPs per token, TFLOP/s, MFU and peak memory."""
    tokens_per_s = tokens / (ms / 1000.0)
    tflops_per_s = flops_per_token * tokens_per_s / 1e12
    report(f"{phase}_tokens_per_{unit}", tokens)
    report(f"{phase}_ms_per_{unit}", ms)
    report(f"{phase}_tokens_per_s", tokens_per_s)
    report(f"{phase}_flops_per_token", flops_per_token)
    report(f"{phase}_tflops_per_s", tflops_per_s)
    report(f"{phase}_mfu", tflops_per_s / settings.peak_tflops)
    report(f"{phase}_peak_memory_mib", peak_memory_mib(runtime))


def make_loader_factory(args, runtime, seqs_per_rank: int):
    train_files = sorted(glob.glob(args.train_files))
    if not train_files:
        return "synthetic", lambda: SyntheticLoader(args, seqs_per_rank, runtime.device)
    train_mdlm.check_shards(train_files, args.vocab_size)
    return "shards", lambda: train_mdlm.TrainLoader(train_files, 0, 1, seqs_per_rank, args.train_seq_len, runtime.device)


def bench_training(trainer, settings, args, runtime):
    """Run the warmup steps, then time settings.steps steps of the script's Trainer.train_step.

    Returns the step times in ms and the step function, for the pairs with the reference step.
    """
    if settings.late_phase:
        trainer.model.set_qat(True)
        trainer.ema = train_mdlm.EMA(trainer.model, args.ema_decay)

    step_indices = itertools.count()

    def step() -> None:
        trainer.train_step(next(step_indices), 1.0)
        if trainer.ema is not None:
            trainer.ema.update()

    for _ in range(settings.warmup_steps):
        step()
    reset_peak_memory(runtime)
    return [timed_ms(step, runtime) for _ in range(settings.steps)], step


@torch.no_grad()
def bench_evaluation(model, settings, args, runtime) -> tuple[int, float]:
    """Time forward passes of EVAL_BATCH_TOKENS tokens at mask rate 0.5, compiled when training is.

    Returns the tokens per pass and the median ms per pass.
    """
    scorer = torch.compile(model) if runtime.compile else model
    seqs = max(args.eval_batch_tokens // args.train_seq_len, 1)
    x0 = torch.randint(0, args.vocab_size, (seqs, args.train_seq_len), device=runtime.device)
    x_t = torch.where(torch.rand(x0.shape, device=runtime.device) < 0.5, args.vocab_size, x0)
    model.eval()

    def forward() -> None:
        with runtime.autocast():
            scorer(x_t)

    for _ in range(2):
        forward()
    times = [timed_ms(forward, runtime) for _ in range(settings.eval_passes)]
    model.train()
    return x0.numel(), statistics.median(times)


def main() -> None:
    settings = BenchSettings()
    os.environ.pop("WORLD_SIZE", None)  # one process, even under a WORLD_SIZE set by torchrun or the shell
    args = train_mdlm.Hyperparameters()
    seqs_per_rank, _ = args.check_batch(1)  # raises InputError before the runtime starts
    runtime = train_mdlm.init_runtime(args)
    data, loader_factory = make_loader_factory(args, runtime, seqs_per_rank)
    torch.manual_seed(args.seed)
    model = train_mdlm.build_model(args, runtime)
    train_model = train_mdlm.build_train_model(model, args, runtime)
    trainer = Trainer(args, runtime, model, train_model, loader_factory, None, lambda message, console=True: None)

    block_applications = len(model.block_schedule())
    forward_flops = forward_flops_per_token(args, block_applications)
    report("device", runtime.device.type)
    report("compile", int(runtime.compile))
    report("data", data)
    report("late_phase", settings.late_phase)
    report("block_applications", block_applications)
    report("peak_tflops", settings.peak_tflops)
    if runtime.device.type == "cuda":
        report("flash_attention", int(flash_attention_available(args, runtime)))

    step_times, our_step = bench_training(trainer, settings, args, runtime)
    train_tokens = trainer.seqs_per_rank * args.train_seq_len
    report_throughput("train", "step", train_tokens, statistics.median(step_times), 3 * forward_flops, settings, runtime)

    reset_peak_memory(runtime)
    eval_tokens, eval_ms = bench_evaluation(model, settings, args, runtime)
    # NOTE: on the CPU eval_peak_memory_mib is the process's peak RSS, which has no reset, so it includes training.
    report_throughput("eval", "pass", eval_tokens, eval_ms, forward_flops, settings, runtime)

    if settings.reference:
        bench_reference(trainer, our_step, settings, args, runtime, loader_factory)


def bench_reference(trainer, our_step, settings, args, runtime, loader_factory) -> None:
    """Time the plain step against the script's step in alternating pairs, and report the median time ratio."""
    qat = bool(settings.late_phase)
    plain = PlainStep(trainer.model, args, runtime, loader_factory(), trainer.accum_steps, qat=qat)
    x_t = torch.randint(0, args.vocab_size + 1, (2, args.train_seq_len), device=runtime.device)
    with torch.no_grad():
        difference = (plain.plain_model.logits(x_t) - plain.model(x_t)).abs().max().item()
    for _ in range(settings.warmup_steps):
        plain()
    steps = {"ours": our_step, "plain": plain}
    ours, theirs, ratios = [], [], []
    for i in range(settings.steps):
        order = ("ours", "plain") if i % 2 == 0 else ("plain", "ours")
        times = {name: timed_ms(steps[name], runtime) for name in order}
        ours.append(times["ours"])
        theirs.append(times["plain"])
        ratios.append(ours[-1] / theirs[-1])
    report("reference_max_logit_difference", difference)
    report("reference_ms_per_step", statistics.median(theirs))
    report("paired_ms_per_step", statistics.median(ours))
    report("step_time_ratio_to_reference", statistics.median(ratios))


if __name__ == "__main__":
    try:
        main()
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
