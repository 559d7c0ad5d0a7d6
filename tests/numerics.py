"""Tolerances from the arithmetic, not from the machine a test was written on (issue 24 item 5).

Two evaluations of the same computation that only *sum in a different order* (chunked vs whole, fused vs
direct, batch of 1 vs batch of n, another SIMD kernel, another thread count) differ by rounding alone. A
float sum of ``n`` terms is within ``gamma_n * sum|x_i|`` of the exact sum, ``gamma_n = n u / (1 - n u)``
~ ``n u`` with the unit roundoff ``u = eps / 2`` (Higham, *Accuracy and Stability of Numerical Algorithms*,
2nd ed., eq. 4.4); two orders are within twice that, i.e. ``n * eps * sum|x_i|``, and ``layers`` stacked
reductions of unit gain add their errors. :func:`reorder_atol` is that worst-case bound.

In float32 the bound for a network (n ~ 10^3 terms, tens of layers) is ~1e-3 of the output: looser than a
logic error is small, so tests of *equivalences* (chunking, fusion, reordering) run in **float64**, where the
same bound is ~1e-11 while any logic error is O(output). Tests marked ``numerics`` are the ones CI also runs
under other kernels and thread counts (``ATEN_CPU_CAPABILITY=default|avx2``, 1 and 2 threads: ``.ci/run``).
"""

from __future__ import annotations

import torch


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype`` (float32 1.19e-7, float64 2.22e-16)."""
    return float(torch.finfo(dtype).eps)


def reorder_atol(magnitude: float, terms: int, layers: int = 1, dtype: torch.dtype = torch.float64) -> float:
    """Worst-case |a - b| of two evaluations that sum in different orders (see the module docstring).

    magnitude: a bound on ``sum |x_i|`` of one reduction in output units (for a unit-gain network, the
    largest absolute activation times the reduction length is safe; callers say which they use).
    terms: the longest reduction (e.g. ``C_in * k^3`` of a convolution). layers: reductions in sequence.
    """
    if magnitude < 0 or terms < 1 or layers < 1:
        raise ValueError(f"need magnitude >= 0, terms >= 1, layers >= 1, got {magnitude}, {terms}, {layers}")
    return float(layers * terms * eps(dtype) * magnitude)


def network_reductions(module: torch.nn.Module) -> tuple[int, int]:
    """(layers, terms) of a network for :func:`reorder_atol`: its convolutions and linear layers (attention's
    matmuls included as their linear projections), and the longest reduction of one of them
    (``C_in / groups * prod(kernel)`` or ``in_features``)."""
    layers, terms = 0, 1
    for m in module.modules():
        if isinstance(m, torch.nn.modules.conv._ConvNd):
            layers += 1
            n = m.in_channels // m.groups
            for k in m.kernel_size:
                n *= k
            terms = max(terms, n)
        elif isinstance(m, torch.nn.Linear):
            layers += 1
            terms = max(terms, m.in_features)
    return max(layers, 1), terms


def network_atol(module: torch.nn.Module, output: torch.Tensor, dtype: torch.dtype = torch.float64) -> float:
    """Tolerance for two evaluations of ``module`` giving ``output`` that differ only in summation order.

    float64: :func:`reorder_atol`, worst case, every reduction taken to sum ``terms`` values no larger than
    the largest output value (the unit-gain assumption): ~1e-9 for our networks, while any logic error is O(1).
    float32: the worst case is larger than the output, so the statistical bound instead: rounding errors of a
    long sum behave like a random walk, ``sqrt(n) u`` (Higham, section 2.8), times 10 for ten standard
    deviations, per layer, on the output's magnitude: ``10 layers sqrt(terms) u max|output|``.
    """
    layers, terms = network_reductions(module)
    magnitude = float(output.abs().max())
    if dtype == torch.float64:
        return reorder_atol(magnitude * terms, terms, layers, dtype)
    return float(10 * layers * terms**0.5 * eps(dtype) / 2 * magnitude)
