"""The matrix products of one MLP gradient, by torch's BLAS, numpy's and XLA's (float64, CPU).

    python benchmarks/gemm_backends.py [--repeats 30]

The gradient of the peer_diffrax MLP (64-128-128-10, N = 512) is eight matrix products: three
forward (X W1ᵀ, H1 W2ᵀ, H2 W3ᵀ), three weight gradients (δᵀ H) and two input gradients (δ W).
This times exactly those shapes, alone, by ``torch.mm`` (the BLAS linked into the torch wheel:
MKL), ``numpy.matmul`` (numpy's OpenBLAS) and, when jax is installed (the ``bench`` extra), a
jitted ``jnp.dot`` (XLA's CPU GEMM, what diffrax runs). Interleaved repeats, medians. It shows
how much of the gap between flowsim's gradient and diffrax's evaluation is the BLAS itself.
One thread each: with two, the thread pools of two BLAS libraries in one process spin against
each other on a 2-core machine and the figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(repeats: int) -> None:
    # one thread each, fixed before numpy and jax load their libraries
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    import numpy as np
    import torch

    from common import alternate, machine

    torch.set_num_threads(1)
    print(f"machine: {machine()}, numpy {np.__version__}, one BLAS thread each")
    # (m, k, n): A (m×k) @ B (k×n), the eight products of one gradient of the MLP on 512 inputs
    shapes = [(512, 64, 128), (512, 128, 128), (512, 128, 10), (128, 512, 64), (128, 512, 128), (10, 512, 128)]
    shapes += [(512, 10, 128), (512, 128, 128)]
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal((m, k)), rng.standard_normal((k, n))) for m, k, n in shapes]
    tensors = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in pairs]
    candidates = {
        "torch.mm (torch's BLAS)": lambda: [torch.mm(a, b) for a, b in tensors],
        "numpy.matmul (OpenBLAS)": lambda: [a @ b for a, b in pairs],
    }
    try:
        import jax
        import jax.numpy as jnp

        jax.config.update("jax_enable_x64", True)
        dot = jax.jit(jnp.dot)
        arrays = [(jnp.asarray(a), jnp.asarray(b)) for a, b in pairs]
        candidates["jax.jit(jnp.dot) (XLA)"] = lambda: jax.block_until_ready([dot(a, b) for a, b in arrays])
    except ImportError:
        print("jax is not installed (pip install -e '.[bench]'): no XLA row", file=sys.stderr)
    times = alternate(candidates, repeats)
    base = sorted(times["torch.mm (torch's BLAS)"])[len(times["torch.mm (torch's BLAS)"]) // 2]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        print(f"  {name:<26} {med * 1e3:7.3f} ms for the 8 products, {flops / med / 1e9:5.1f} GFLOP/s, {med / base:4.2f}× torch")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    main(parser.parse_args().repeats)
