"""Fused Triton kernels for constrained attention (DESIGN.md section 7).

* :func:`sinkhorn_attention` -- prior-consistent (Sinkhorn) attention, ``bidirectional`` or
  ``set`` layout, returning ``(out, KL(pi || mu))``;
* :func:`softmax_attention` -- softmax attention (causal or not) returning ``(out, mu)``, the
  key marginal, differentiable;
* ``*_ref`` -- the same calls on ``bayestrain.attention``'s PyTorch path (float64 by default),
  for tests and benchmarks.

Tiled, O(N) memory in forward and backward; fp32 / fp16 / bf16 inputs with fp32
accumulation.  On a machine without CUDA they run only under ``TRITON_INTERPRET=1``, which
must be set before triton is first imported.
"""
from bayestrain.kernels.sinkhorn import (
    SinkhornAttentionFunction,
    sinkhorn_attention,
    sinkhorn_attention_ref,
)
from bayestrain.kernels.softmax import (
    SoftmaxMarginalFunction,
    softmax_attention,
    softmax_attention_ref,
)

__all__ = [
    "sinkhorn_attention",
    "sinkhorn_attention_ref",
    "softmax_attention",
    "softmax_attention_ref",
    "SinkhornAttentionFunction",
    "SoftmaxMarginalFunction",
]
