"""Run an exported model with ONNX Runtime, tensors in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from flashc.errors import FlashcError, InputError

INSTALL_ORT = "pip install onnxruntime (CPU) or pip install onnxruntime-gpu (CUDA)"

_PROVIDER_ALIASES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def import_onnxruntime():
    """onnxruntime, or a FlashcError saying how to install it."""
    try:
        import onnxruntime
    except ImportError as e:
        raise FlashcError(f"running ONNX models needs onnxruntime ({e}); install it: {INSTALL_ORT}") from None
    return onnxruntime


def resolve_providers(providers: str | Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Execution provider names for a request ('cpu', 'cuda' or ORT provider names).

    Unlike ORT, which silently falls back to the CPU, a provider that this onnxruntime
    build lacks is an error that says which package has it.
    """
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = _PROVIDER_ALIASES.get(providers.lower(), [providers])
    names = list(providers)
    for name in names:
        if name not in available:
            hint = ("the CUDA provider ships in onnxruntime-gpu: pip install onnxruntime-gpu "
                    "(uninstall onnxruntime first)" if name == "CUDAExecutionProvider"
                    else f"install an onnxruntime build with it ({INSTALL_ORT})")
            raise FlashcError(f"onnxruntime has no {name} here (available: {', '.join(available)}); {hint}")
    return names


class OnnxRuntimeModel:
    """An ONNX model in an onnxruntime session, called like the Program it came from."""

    def __init__(self, session, path: Path) -> None:
        self.session = session
        self.path = path
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.keepalive: object = None  # e.g. the temporary directory holding the model file

    @classmethod
    def load(cls, path: str | Path, providers: str | Sequence[str] | None = None,
             threads: int | None = None) -> "OnnxRuntimeModel":
        """Open path (external weight data next to it is found automatically).

        providers: None or 'cpu' for the CPU EP, 'cuda' for CUDA with CPU fallback for
        ops it lacks, or a list of ORT provider names. threads: intra-op threads (None:
        ORT's default, one per core).
        """
        ort = import_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise FlashcError(f"no ONNX model at {path}")
        names = resolve_providers(providers, ort.get_available_providers())
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=names)
        return cls(session, path)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run on torch tensors; returns the outputs as torch tensors on the first input's device."""
        if len(inputs) != len(self.input_names):
            raise InputError(f"expected {len(self.input_names)} input(s) ({', '.join(self.input_names)}), "
                             f"got {len(inputs)}")
        feeds = {}
        for name, x, meta in zip(self.input_names, inputs, self.session.get_inputs()):
            if not isinstance(x, torch.Tensor):
                raise InputError(f"input {name!r}: expected a tensor, got {type(x).__name__}")
            if list(x.shape) != list(meta.shape):
                raise InputError(f"input {name!r}: expected shape {list(meta.shape)}, got {list(x.shape)}; "
                                 "the model was exported for that shape")
            feeds[name] = x.detach().cpu().contiguous().numpy()
        outs = self.session.run(self.output_names, feeds)
        device = inputs[0].device if inputs else torch.device("cpu")
        return [torch.from_numpy(o).to(device) for o in outs]
