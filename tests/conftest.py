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


def _patch_triton_language_once_per_launch() -> None:
    """Triton's interpreter patches triton.language's builtins (inspect.getmembers over four modules) when a
    kernel launch starts, restores them when it ends, and patches them again at every call of a @triton.jit
    helper inside the kernel: a quarter of an interpreted kernel test's time (profiled: 35,000 patchings, 16 of
    60 s). A helper whose language modules the running launch has patched skips that; anything else runs as
    Triton runs it. Only the tests' time changes; where Triton's internals differ, nothing is changed."""
    import inspect

    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except ImportError:
        return
    if not all(hasattr(ti, name) for name in ("_patch_lang", "_LangPatchScope", "GridExecutor")):
        return
    patch_lang, launch, patched = ti._patch_lang, ti.GridExecutor.__call__, []  # patched: one set per launch

    def langs(fn) -> set:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_lang_once(fn):
        needed = langs(fn)
        if patched and needed <= patched[-1]:
            return ti._LangPatchScope()  # nothing to restore: the launch's own scope restores them
        scope = patch_lang(fn)
        if patched:
            patched[-1] |= needed
        return scope

    def launch_tracked(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    ti._patch_lang, ti.GridExecutor.__call__ = patch_lang_once, launch_tracked


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_language_once_per_launch()


@pytest.fixture(scope="session")
def tiny_models():
    from flashc import zoo
    from flashc_testing import FAMILIES

    return {name: zoo.build(name, seed=0) for name in FAMILIES}


def pytest_collection_modifyitems(session, config, items):
    """The examples' tests first: the longest test file (its scripts run as subprocesses, minutes in all), so
    that with worker processes (scripts/test.sh) it does not start last and leave the other workers idle."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] != "tests/test_examples.py")
