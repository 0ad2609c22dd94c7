"""Kernels built without a GPU compile for one (sm_90, Hopper), offline: Triton's compiler and its
bundled ptxas, no device. The CPU interpreter runs a kernel's arithmetic but not its compilation, and
a kernel that does not compile costs a GPU session's time (session 6's int4 GEMV). The variants the
interpreter alone has run (tests/codegen/sm90_compile.py lists them) compile in a child process: this
one runs Triton's interpreter (tests/conftest.py), whose kernels cannot be compiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed")


def _has_ptxas() -> bool:
    """Whether this Triton ships the NVIDIA backend's ptxas (the pip wheels for Linux do)."""
    import triton

    return any((Path(triton.__file__).parent / "backends" / "nvidia" / "bin").glob("ptxas*"))


@pytest.mark.skipif(not _has_ptxas(), reason="this Triton has no NVIDIA backend with its ptxas")
def test_interpreter_only_kernel_variants_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, "\n".join([l for l in lines if l.startswith("FAIL")] + [done.stderr[-3000:]])
    assert len(lines) > 40 and all(l.startswith("ok") for l in lines)
