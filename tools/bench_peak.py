"""The hardware limit of this run: best torch matmul GFLOP/s, fp32 and bf16, all cores."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import machine, matmul_peak, write_json  # noqa: E402


def main() -> None:
    import torch

    # Best over sizes and repeats: the peak, not the load-dependent average.
    peak = {
        dtype: round(max(matmul_peak(dtype, size, 1.5) for size in (512, 1024, 2048)), 1)
        for dtype in ("float32", "bfloat16")
    }
    result = {"gflops": peak, "torch_threads": torch.get_num_threads(), "machine": machine()}
    print(result, flush=True)
    print(write_json("peak", result))


if __name__ == "__main__":
    main()
