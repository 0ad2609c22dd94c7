"""TVM CPU schedules against TVM's unscheduled loops and PyTorch, one matmul per shape.

    python bench/tvm_cpu_schedules.py [--shapes 128x256x512 1x576x1536] [--repeat 5]

Each row is timed in this process on the same float32 inputs: TVM's default build of the
TE matmul (plain loops), the same function after flashc's `MatmulTiles` schedule, and
`torch.matmul`. The scheduled result is checked against numpy before it is timed. The
ratio of default to scheduled is what the TVM backend's CPU schedules buy; it replaced a
timed unit test (speed is measured here, never asserted in the test suite).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def torch_ms(a: torch.Tensor, b: torch.Tensor, repeat: int) -> float:
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(3):
            torch.matmul(a, b)
        times.append((time.perf_counter() - t) / 3)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["128x256x512", "1x576x1536", "64x576x576"],
                        help="MxKxN matmul shapes")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import tvm
    from tvm import te

    from flashc.backends import tvm as flashc_tvm
    from flashc.backends.tvm.cpu_schedules import MatmulTiles

    target = tvm.target.Target(flashc_tvm.make_target("llvm"))
    print(f"torch {torch.__version__}, tvm {tvm.__version__}, {torch.get_num_threads()} torch threads")
    print(f"{'shape MxKxN':>14} {'tvm default ms':>15} {'flashc schedule ms':>19} {'torch ms':>9} "
          f"{'default/schedule':>17} {'schedule/torch':>15}")
    for shape in args.shapes:
        m, k_extent, n = (int(v) for v in shape.split("x"))
        k = te.reduce_axis((0, k_extent), name="k")
        a = te.placeholder((m, k_extent), name="a")
        b = te.placeholder((k_extent, n), name="b")
        c = te.compute((m, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
        func = te.create_prim_func([a, b, c])
        rng = np.random.default_rng(0)
        host = [rng.random((m, k_extent), dtype=np.float32), rng.random((k_extent, n), dtype=np.float32),
                np.zeros((m, n), dtype=np.float32)]
        tensors = [tvm.runtime.tensor(x) for x in host]
        ms = {}
        for label, mod in (("default", tvm.IRModule({"main": func})),
                           ("scheduled", MatmulTiles().apply(func, target, False).mod)):
            lib = tvm.compile(mod, target=target)
            lib["main"](*tensors)
            np.testing.assert_allclose(tensors[2].numpy(), host[0] @ host[1], rtol=1e-4, atol=1e-4)
            timer = lib.mod.time_evaluator("main", tvm.cpu(), number=3, repeat=args.repeat)
            ms[label] = min(timer(*tensors).results) * 1e3
        ms["torch"] = torch_ms(torch.from_numpy(host[0]), torch.from_numpy(host[1]), args.repeat)
        print(f"{shape:>14} {ms['default']:>15.3f} {ms['scheduled']:>19.3f} {ms['torch']:>9.3f} "
              f"{ms['default'] / ms['scheduled']:>16.1f}x {ms['scheduled'] / ms['torch']:>14.2f}x")
    print(f"times: best of {args.repeat} repeats of 3 calls each")


if __name__ == "__main__":
    main()
