"""int8 decoding on a CPU: one-token steps read int8 copies of the linear weights.

Decoding one token reads every weight once and does little arithmetic with it: on a CPU it is
bound by memory traffic and by how well the kernel handles a single row. torch's bfloat16 matmul
with one row is slow on small matrices (measured on a 2-core AVX512-BF16 EPYC, SmolLM2's
576x1536 MLP weight: ~150 us), its weight-only int8 kernel (`aten._weight_int8pack_mm`) ~5x faster
(~27 us) and half the bytes. For more rows the int8 kernel loses to the ordinary matmul (at 1,024
rows ~2.6x slower in bfloat16, ~30x in float32), and dequantizing on every call costs ~0.3 ms per
weight, more than a short cached prefill can afford.

So each `nn.Linear` of the model keeps its weight and gains an int8 copy (symmetric, one scale per
output channel): calls with at most `MAX_ROWS` rows (decode steps, a one- or two-token prefill) use
the int8 copy; every other call the original weight. Weight memory grows by half (int8 beside
bfloat16). A many-token prefill computes the same keys and values as without it; the logits of
its last token (the output layer sees one row) and every decoded token come from slightly
different weights (per-channel int8 error, at most half a step of max|w|/127 per weight):
measured agreement in `benchmarks/peer.py`. CPU only; the activations must be bfloat16, float16 or float32 (bfloat16 is
what it is for).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PromptCacheError

MAX_ROWS = 2  # rows (tokens x batch) at or below which a call uses the int8 weights


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q [out, in] int8, scales [out]) with q * scale ~ weight."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8DecodeLinear(nn.Linear):
    """An `nn.Linear` whose calls with few rows use an int8 copy of its weight (see the module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > MAX_ROWS or x.dtype != self.int8_scales.dtype:
            return super().forward(x)
        out = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), self.int8_weight, self.int8_scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def int8_decode(model: nn.Module) -> int:
    """Give every `nn.Linear` of `model` an int8 copy for one-token steps, in place (the modules'
    class becomes `Int8DecodeLinear`; parameters are unchanged). Returns the number converted.

    Raises:
        PromptCacheError: the model is not on the CPU, its weights are not floating point, or it has
            no linear layer.
    """
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            weight = module.weight
            if weight.device.type != "cpu":
                raise PromptCacheError(f"int8_decode runs on the CPU only; the model is on {weight.device}")
            if not weight.is_floating_point() or weight.dtype == torch.float64:
                raise PromptCacheError(f"int8_decode needs bfloat16, float16 or float32 weights, not {weight.dtype}")
            q, scales = quantize_rows(weight)
            module.register_buffer("int8_weight", q, persistent=False)
            module.register_buffer("int8_scales", scales.to(weight.dtype), persistent=False)
            module.__class__ = Int8DecodeLinear
            n += 1
        elif isinstance(module, Int8DecodeLinear):
            n += 1  # converted before
    if n == 0:
        raise PromptCacheError("int8_decode found no nn.Linear layer in the model")
    return n
