"""The CUDA backend as far as it goes without a GPU: its declaration (options, kernel table,
late passes), ahead-of-time compiles that save and load, and the clear error when run here.
On a GPU, bench/gpu_decode_check.py checks its numbers against eager."""

import pytest
import torch

import flashc
from flashc.backends.cuda import KERNELS, CudaBackend, CudaOptions
from flashc.decode import DecodeStep, decode_example_inputs
from flashc.errors import FlashcError
from flashc.ops import FLASHC_OPS

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def test_every_fused_op_has_a_kernel_and_every_kernel_an_op():
    ops = {f"flashc.{name}" for name in FLASHC_OPS}
    assert ops <= set(KERNELS), ops - set(KERNELS)
    for name in KERNELS:
        namespace, op = name.split(".")
        assert hasattr(getattr(torch.ops, namespace), op), name


def test_options_are_typed_and_checked():
    assert CudaBackend.Options is CudaOptions
    with pytest.raises(FlashcError, match=r"no option 'cuda_graph'; did you mean 'cuda_graphs'"):
        flashc.compile(torch.nn.Linear(4, 4), "h100", torch.randn(2, 4), options={"cuda_graph": False})


@needs_no_gpu
def test_an_ahead_of_time_compile_saves_loads_and_refuses_to_run_here(tmp_path, tiny_models):
    model = tiny_models["llama-tiny"]
    example = decode_example_inputs(model, 1, 16)
    cm = flashc.compile(DecodeStep(model, 16), "h200", example, level=3, options={"tune": False})
    assert cm.profile.name == "h200"
    with pytest.raises(FlashcError, match="compiled for h200 on a machine without a GPU"):
        cm(*example)
    loaded = flashc.load(cm.save(tmp_path / "a"))
    assert [r.name for r in loaded.records if r.stage == "backend"] == ["cuda_fuse_kv_writes",
                                                                       "cuda_fuse_state_writes",
                                                                       "cuda_fuse_sparse_matmuls",
                                                                       "cuda_fuse_small_matmuls",
                                                                       "cuda_semi_structured_matmuls",
                                                                       "cuda_fuse_quantized_inputs"]
    with pytest.raises(FlashcError, match="without a GPU"):
        loaded(*example)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="runs the CUDA target")


class _Accumulator(torch.nn.Module):
    """A step that is not idempotent: it adds into its state (as a recurrent layer does)."""

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        state.mul_(0.5).add_(x)
        return state * 2


@needs_gpu
def test_a_state_written_in_place_is_updated_once_per_call():
    import flashc

    x = torch.randn(4, 64, device="cuda")
    state = torch.randn(4, 64, device="cuda")
    ref_state = state.clone()
    cm = flashc.compile(_Accumulator(), "h100", (x, state.clone()), verify=False)
    for _ in range(3):  # the first call tunes, warms up and captures: still one update
        out = cm(x, state)
        ref = _Accumulator()(x, ref_state)
        torch.testing.assert_close(state, ref_state)
        torch.testing.assert_close(out if isinstance(out, torch.Tensor) else out[0], ref)
