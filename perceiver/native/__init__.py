"""Batched matrix products, fused attention and LayerNorm's row arithmetic
on XLA:CPU through a small FFI library.

  from perceiver import native
  c = native.matmul(a, b, transpose_b=True)   # a [..., m, k], b [..., n, k]
  dx, dw = native.matmul_pair(g, w, x, g, transpose_b1=True,
                              transpose_a2=True)   # g w^T, x^T g
  o = native.attention(q, k, v, num_heads=8, scale=0.125)   # [B, T, H D]
  o = native.self_attention(qkv, num_heads=8, qk_width=512, scale=0.125)
  x_hat, inv = native.normalize(x, eps=1e-5)   # x [..., D]
  dx = native.normalize_gradient(x_hat, inv, d_x_hat)

`matmul(a, b, transpose_a, transpose_b)` is op(a) @ op(b) over matching
leading axes (op = identity or the transpose of the last two axes). On the CPU
it runs batched_matmul.cc: OpenBLAS GEMMs spread over XLA's intra-op thread
pool (jaxlib 0.10.2's XLA:CPU runs multi-head attention's batched products on
one thread; benchmarks/RESULTS.md). Its gradient is the usual one, in the
same products. `matmul_pair` computes two independent products in one
call, each on its share of the pool's threads (on two threads: one whole
GEMM each, where two `matmul` calls split each in halves); the linear
layers' backward passes use it for dx = g W^T and dW = x^T g.

`attention(q, k, v, num_heads, scale)` is multi-head softmax(scale q k^T) v
over token-major arrays [B, T, H D] (the heads read in place, as a linear
layer writes them); `self_attention(qkv, ...)` the same for q, k and v side
by side in one fused projection's output, its gradient written back in that
layout. On the CPU both run fused_attention.cc: the logits and probabilities
exist one cache-sized tile at a time, forward and backward (FlashAttention's
scheme: the backward pass recomputes the probabilities from q, k and each
query row's log-sum-exp instead of keeping them), so none of the
[B, H, N, M] arrays is written to memory or kept for the backward pass, and
no head is copied out of its rows.

`normalize(x, eps)` is LayerNorm before its scale and offset, over the last
axis: x-hat and the inverse deviations [..., 1]; `normalize_gradient` the
gradient of x from that of x-hat. On the CPU they run layer_norm.cc, each row
normalised (or its gradient formed) in one visit while it is in cache, the
rows over XLA's pool, where XLA's own fusions of the same formulas make
several passes over the array (benchmarks/RESULTS.md).

Elsewhere (GPU, TPU: a host whose default backend is not the CPU does not
build the library), for other dtypes than float32 and float64, and when the
library is not available, all of them are the same computations in XLA
(tests/native_test.py checks each against the other and float64). Gradients
of any order work; past the first, they are XLA's.

Under `jax.jit` over a device mesh, `custom_partitioning` rules let each
device compute on its own shards (batch and row axes stay split; a
contraction split over devices is summed across them with `psum`): XLA
cannot see into an FFI call and would otherwise give every device all of it.

The library is compiled at first use with the C++ compiler ($CXX, else g++)
against jaxlib's FFI headers and the scipy-openblas32 wheel
(requirements.txt), for the host's processor (-march=native), into
$PERCEIVER_NATIVE_CACHE (default ~/.cache/perceiver/native), keyed by a hash
of the sources, the toolchain and the processor's features; a compile takes
a few seconds, once. `PERCEIVER_NATIVE=0` turns it off. A failed build logs
one warning naming the cause and falls back to XLA.

Its GEMMs are OpenBLAS's, or, on Intel processors where the `mkl` wheel is
installed (requirements.txt, x86-64 Linux), MKL's sequential ones, handed
to the library when it loads: `PERCEIVER_BLAS=auto|openblas|mkl` (default
auto), `blas()` says which (library.blas_choice). Inside the diagnostic
`library.gemms_skipped()` they return without computing, to time what a
step spends outside them (benchmarks/gemm_share.py).
"""

from perceiver.native.batched_matmul import matmul
from perceiver.native.batched_matmul import matmul_pair
from perceiver.native.factored_attention import factored_attention
from perceiver.native.fused_attention import attention
from perceiver.native.fused_attention import self_attention
from perceiver.native.layer_norm import normalize
from perceiver.native.layer_norm import normalize_gradient
from perceiver.native.library import available
from perceiver.native.library import blas
from perceiver.native.library import build
from perceiver.native.library import BuildError
from perceiver.native.library import hlo_flops
from perceiver.native.library import why_unavailable

__all__ = ['attention', 'available', 'blas', 'build', 'BuildError',
           'factored_attention', 'hlo_flops', 'matmul', 'matmul_pair',
           'normalize', 'normalize_gradient', 'self_attention',
           'why_unavailable']
