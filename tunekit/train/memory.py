"""The memory levers: bf16 autocast (CUDA), giving freed memory back to the OS, LoRA dropout redrawn
in backward instead of stored, feed-forward checkpointing that stops its recomputation at down_proj's
input, and grouped-query SDPA on the CPU."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tunekit.train.config import BF16_ON_CPU, TrainConfig

log = logging.getLogger("tunekit")


def autocast_for(cfg: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager] | None:
    if cfg.precision == "fp32":
        return None
    if cfg.precision != "bf16":
        raise ValueError(f"precision {cfg.precision!r}: use fp32 or bf16")
    if device.type != "cuda":
        raise ValueError(BF16_ON_CPU)
    return lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def release_freed_memory() -> bool:
    """Make glibc return large freed blocks to the OS instead of keeping them in its heap.

    Training allocates activations of a different size for every batch (rows of different lengths).
    glibc serves big requests by mmap, but raises that threshold each time such a block is freed, up
    to 32 MB, after which activations come from the heap, where freed holes of the wrong size pile up:
    measured on SmolLM2-135M, 4 rows of up to 419 tokens, one step's peak RSS was 6.7 GB with glibc's
    defaults and 5.0 GB with the thresholds fixed at 128 KiB (1.5 GB against 5.1 GB with gradient
    checkpointing). The price is a page fault for every new large buffer: an epoch took 1.6x as long
    (1.8x with gradient checkpointing; bench/sft_vs_trl.py), so it is off unless TrainConfig.release_memory
    asks for it. Numerics are unchanged. Process-wide; a no-op (False) where glibc is not the libc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 128 * 1024)) and bool(mallopt(m_trim_threshold, 128 * 1024))


def _drop_count(p: float) -> int:
    """p on a grid of 1/65536: how many of the 65536 values of a 16-bit draw drop an element."""
    return round(p * 65536)


def _keep_rate(p: float) -> float:
    """The keep probability `_dropout_drop` draws with: 1 - p, with p on a grid of 1/65536."""
    return 1.0 - _drop_count(p) / 65536


def _dropout_drop(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """A dropout mask for x (True = dropped) from `seed` alone. Four 16-bit draws come out of every 64-bit
    random number, which is ~3x faster on the CPU than torch.rand or bernoulli_ (one generator call per element)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1, generator=generator)
    return bits.view(torch.int16)[:n].view(x.shape) < _drop_count(p) - 32768


class _DroppedLinear(torch.autograd.Function):
    """dropout(x, p) @ weight.T (a LoRA A matrix after LoRA dropout) that keeps x, not the dropped copy
    and its mask: backward draws the same mask again from `seed`. Inputs shared by several adapters
    (q, k and v read one normed hidden state; gate and up another) are then kept once instead of once
    per adapter, with a mask each. The 1/(1-p) scale is applied to the r-wide side of the product and
    the mask by masked_fill: no float copy of the mask, one pass over x fewer than x * mask / (1 - p)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed = p, seed
        return F.linear(x.masked_fill(_dropout_drop(x, p, seed), 0), weight) * (1 / _keep_rate(p))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        drop = _dropout_drop(x, ctx.p, ctx.seed)
        grad = grad * (1 / _keep_rate(ctx.p))
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).masked_fill_(drop, 0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = x.masked_fill(drop, 0).to(grad.dtype)
            grad_weight = (grad.reshape(-1, grad.shape[-1]).t() @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_weight, None, None


def _dropped_lora_a(module: torch.nn.Linear, p: float, x: torch.Tensor) -> torch.Tensor:
    if not module.training or not torch.is_grad_enabled():
        return F.linear(x, module.weight)  # evaluation: dropout is the identity
    seed = int(torch.randint(0, 2**62, ()))  # from the global CPU stream: reproducible, repeated under checkpointing
    return _DroppedLinear.apply(x, module.weight, p, seed)


def regenerate_lora_dropout(model: torch.nn.Module) -> int:
    """Fuse LoRA dropout into each plain LoRA adapter's A matrix (`_DroppedLinear`): the same dropout
    (rate, scaling, a fresh mask per adapter and call), but backward redraws the mask instead of keeping
    the dropped copy of every adapter's input. SmolLM2-135M, LoRA r=16 on all 7 linears per layer:
    that copy and its mask are ~25 KB per token and layer. PEFT's variants (DoRA, ...) and adapters
    without dropout are left alone. Returns how many adapters it changed."""
    fused = 0
    for module in model.modules():
        dropouts, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(dropouts, torch.nn.ModuleDict) or not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        for key, dropout in list(dropouts.items()):
            a = lora_a[key] if key in lora_a else None
            if (not isinstance(dropout, torch.nn.Dropout) or dropout.p == 0 or key in getattr(module, "lora_variant", {})
                    or type(a) is not torch.nn.Linear or a.bias is not None):
                continue
            a.forward = functools.partial(_dropped_lora_a, a, dropout.p)
            dropouts[key] = torch.nn.Identity()
            fused += 1
    return fused


def _plain_lora_parts(layer: torch.nn.Module) -> tuple[torch.nn.Module, list[tuple]] | None:
    """(frozen base layer, [(lora_A, lora_B, dropout, scaling), ...]) when `layer` is a PEFT LoRA Linear whose
    forward is exactly base(x) + sum of lora_B(lora_A(dropout(x))) * scaling over its active adapters (no
    variant, not merged or disabled, base weight frozen); None otherwise."""
    base = getattr(layer, "base_layer", None)
    lora_a = getattr(layer, "lora_A", None)
    if (not isinstance(base, torch.nn.Linear) or base.weight.requires_grad or not isinstance(lora_a, torch.nn.ModuleDict)
            or getattr(layer, "disable_adapters", True) or getattr(layer, "merged", True)):
        return None
    parts = []
    for key in layer.active_adapters:
        if key not in lora_a:
            continue
        if key in getattr(layer, "lora_variant", {}):
            return None
        parts.append((lora_a[key], layer.lora_B[key], layer.lora_dropout[key], layer.scaling[key]))
    return base, parts


def _checkpointed_mlp(mlp: torch.nn.Module, forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`forward` (the block's own) with its activations recomputed in backward. A gated feed-forward
    (gate_proj, up_proj, act_fn, down_proj: Llama, Mistral, Qwen, ...) whose down_proj is frozen or plain
    LoRA is split so that the recomputation stops at down_proj's input: act(gate(x)) * up(x) and the LoRA A
    product of it are recomputed, the frozen down_proj matmul is not (it keeps nothing for backward), a third
    of the recomputed feed-forward FLOPs. Same operations, same results as the block's forward."""
    from torch.utils.checkpoint import checkpoint

    if not torch.is_grad_enabled():
        return forward(x, *args, **kwargs)
    down = getattr(mlp, "down_proj", None)
    if args or kwargs or not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "act_fn")):
        return checkpoint(forward, x, *args, use_reentrant=False, **kwargs)
    if isinstance(down, torch.nn.Linear) and not down.weight.requires_grad and (down.bias is None or not down.bias.requires_grad):
        base, adapters = down, []
    else:
        split = _plain_lora_parts(down)
        if split is None:
            return checkpoint(forward, x, use_reentrant=False)
        base, adapters = split

    def recomputed(x):
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        return (h, *(lora_a(dropout(down._cast_input_dtype(h, lora_a.weight.dtype))) for lora_a, _, dropout, _ in adapters))

    h, *low_rank = checkpoint(recomputed, x, use_reentrant=False)
    out = base(h)
    dtype = out.dtype
    for (_, lora_b, _, scaling), a in zip(adapters, low_rank):
        out = out + lora_b(a) * scaling
    return out.to(dtype)


def checkpoint_mlps(model: torch.nn.Module) -> int:
    """Recompute every transformer block's feed-forward (the modules named `*.mlp`) in the backward pass
    instead of keeping its activations: on a Llama-style block the MLP's four intermediate-size tensors
    are most of what a layer keeps per token, while recomputing it costs two of its three matmuls
    (`_checkpointed_mlp`). Non-reentrant, RNG state preserved (LoRA dropout inside repeats its masks).
    Returns how many blocks it wrapped."""
    wrapped = 0
    for name, module in model.named_modules():
        if name.endswith(".mlp"):
            if not getattr(module, "_tunekit_checkpointed", False):
                module.forward = functools.partial(_checkpointed_mlp, module, module.forward)
                module._tunekit_checkpointed = True
            wrapped += 1
    return wrapped


@contextlib.contextmanager
def grouped_query_sdpa(device: torch.device):
    """On the CPU, let transformers hand grouped-query attention (SmolLM2: 9 query heads, 3 key/value
    heads) to torch's SDPA with enable_gqa instead of repeating keys and values to every query head
    first: the CPU flash kernel takes masks and GQA together, so backward keeps k and v at 3 heads, not
    9 (SmolLM2, 4 rows of 419 tokens: 150 MB less; identical outputs, same speed). transformers only
    does this without a mask, because CUDA kernels then fall back to the slow math path, so the switch
    (its TRANSFORMERS_SDPA_FORCE_GQA, read at every attention call) stays off on CUDA."""
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    if device.type != "cpu" or key in os.environ:
        yield
        return
    os.environ[key] = "1"
    try:
        yield
    finally:
        os.environ.pop(key, None)
