"""Shared fixtures: the five tiny families of the zoo, built once per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Without CUDA, Triton kernels run through Triton's interpreter, which Triton picks when it and
# the kernel modules are imported. Set it here, before any test module is collected: a test
# module under tests/backends imports flashc.codegen (and Triton) before tests/codegen/conftest.py
# runs, and kernels then failed in the interpreter ("Cannot call @triton.jit'd outside of the
# scope of a kernel", seen on a clean CI checkout).
if not _has_cuda():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def tiny_models():
    from flashc import zoo
    from flashc_testing import FAMILIES

    return {name: zoo.build(name, seed=0) for name in FAMILIES}
