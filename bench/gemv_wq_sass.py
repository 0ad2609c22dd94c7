"""The int4 GEMV's machine code without a GPU: compile one `_gemv_wq_kernel` variant for sm_90, print its registers,
its loop's layouts and the SASS instruction mix (global loads by width, shared-memory traffic, barriers).

    python bench/gemv_wq_sass.py                              # the tuned 8B gate|up tile: norm + GLU, 16 x 1024
    python bench/gemv_wq_sass.py FLAT=1 BLOCK_N=32 act=0      # constexprs by name; norm=0/1, act=0/1 (GLU)
    PYTHONPATH=/tmp/t36/lib/python3.11/site-packages python bench/gemv_wq_sass.py FLAT=1

Triton picks a tile's layout itself, and its choice differs between versions: run it against the GPU machine's
Triton (3.6: `python3.11 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0`, then the PYTHONPATH above;
its 168 registers for the default tile match what Nsight Compute measured on the H100, session 20). The integer
arguments get the divisibility-by-16 hint Triton's launcher gives them on real shapes; without it the loads are
not vectorized and the numbers mean nothing. Writes the cubin, TTGIR and SASS under --dir (default /tmp/gemv_wq_sass).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashc.codegen import triton_gemv_wq

POINTERS = {"X": "*bf16", "QW": "*i32", "S": "*bf16", "ZP": "*u8", "BIAS": "*bf16", "G": "*bf16", "XS": "*bf16",
            "R": "*bf16", "Y": "*bf16", "P": "*fp32", "PSQ": "*fp32"}
# integer arguments that are multiples of 16 on llama shapes (Triton specializes those at launch)
ALIGNED = {"N", "K", "row_words", "up_row", "per_split", "stride_xm", "stride_rm", "stride_ym", "n_blocks"}
DEFAULTS = dict(BITS=4, GROUP=128, HAS_ZP=False, HAS_BIAS=False, HAS_XSCALE=False, HAS_RES=False, DOT=False,
                IEEE=False, EVEN=True, SPLIT=False, BLOCK_M=1, BLOCK_N=16, SUB=128, SUBS=8, STAGES=1, PREFETCH=False,
                FLAT=False, XVEC=False, PDL=True)


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    out = Path(args.pop("--dir", "/tmp/gemv_wq_sass"))
    out.mkdir(parents=True, exist_ok=True)
    const = dict(DEFAULTS, HAS_NORM=args.pop("norm", "1") == "1", ACT=int(args.pop("act", "1")))
    warps = int(args.pop("num_warps", "4"))
    const.update({k: int(v) for k, v in args.items()})
    fn = triton_gemv_wq._gemv_wq_kernel
    sig = {n: "constexpr" if n in const else POINTERS.get(n, "fp32" if n == "eps" else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if (n in POINTERS or n in ALIGNED) and n not in const}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps})
    (out / "kernel.cubin").write_bytes(kernel.asm["cubin"])
    (out / "kernel.ttgir").write_text(kernel.asm["ttgir"])
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(out / "kernel.cubin")], capture_output=True,
                          text=True, check=True).stdout
    (out / "kernel.sass").write_text(sass)
    usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(out / "kernel.cubin")], capture_output=True,
                           text=True, check=True).stdout
    instruction = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)")
    ops = collections.Counter(m.group(1) for m in instruction.finditer(sass))
    print(f"Triton {triton.__version__}, {warps} warps, {const}")
    print("resources:", " ".join(re.findall(r"(?:REG|STACK|SHARED|LOCAL):\d+", usage)))
    print("layouts:", *re.findall(r"^#blocked\d* = .*$", kernel.asm["ttgir"], flags=re.M), sep="\n  ")
    print("layout conversions in the TTGIR:", kernel.asm["ttgir"].count("ttg.convert_layout"))
    for prefix in ("LDG", "LDS", "STS", "BAR", "SHFL"):
        found = {op: n for op, n in sorted(ops.items()) if op.startswith(prefix)}
        print(f"{prefix}: {found or 0}")
    print("instructions:", sum(ops.values()), "(static count, the whole kernel; the loop body is most of it)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main(sys.argv[1:]))
