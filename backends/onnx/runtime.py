"""Run an exported model with ONNX Runtime, tensors in and out.

An input that the model updates (a decode step's KV cache) has an output named
`present.<input>`: its new value. The model is called like the Program it came from,
so those inputs are updated in place and only the other outputs are returned.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import torch

from flashc.errors import FlashcError, InputError

INSTALL_ORT = "pip install onnxruntime (CPU) or pip install onnxruntime-gpu (CUDA)"
# The output holding the new value of an input the model writes in place: PRESENT_PREFIX + input name.
PRESENT_PREFIX = "present."
# Model metadata: the inputs (comma-separated) whose present output may be written into
# the input's own buffer, because every node reading the input runs before it is written.
SHARED_PRESENT_KEY = "flashc.present_shares_input"

_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
               "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(int8)": torch.int8,
               "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool}

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
    """An ONNX model in an onnxruntime session, called like the Program it came from.

    output_names are all the model's outputs; result_names those a call returns (all
    but the `present.*` outputs of inputs updated in place).
    """

    def __init__(self, session, path: Path) -> None:
        self.session = session
        self.path = path
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        # input index -> the output with its new value
        self.in_place = {i: PRESENT_PREFIX + name for i, name in enumerate(self.input_names)
                         if PRESENT_PREFIX + name in self.output_names}
        self.result_names = [n for n in self.output_names if n not in self.in_place.values()]
        shared = session.get_modelmeta().custom_metadata_map.get(SHARED_PRESENT_KEY, "").split(",")
        self._in_place_runs = None
        if self.in_place:
            self._in_place_runs = _InPlaceRuns(session, self.input_names, self.in_place,
                                               {i for i in self.in_place if self.input_names[i] in shared},
                                               self.result_names)
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
        """Run on torch tensors; returns the results as torch tensors on the first input's device.

        Inputs with a `present.*` output are updated in place.
        """
        if len(inputs) != len(self.input_names):
            raise InputError(f"expected {len(self.input_names)} input(s) ({', '.join(self.input_names)}), "
                             f"got {len(inputs)}")
        for name, x, meta in zip(self.input_names, inputs, self.session.get_inputs()):
            if not isinstance(x, torch.Tensor):
                raise InputError(f"input {name!r}: expected a tensor, got {type(x).__name__}")
            if list(x.shape) != list(meta.shape):
                raise InputError(f"input {name!r}: expected shape {list(meta.shape)}, got {list(x.shape)}; "
                                 "the model was exported for that shape")
        device = inputs[0].device if inputs else torch.device("cpu")
        if self._in_place_runs is not None:
            return [o.to(device) for o in self._in_place_runs(inputs)]
        feeds = {name: x.detach().cpu().contiguous().numpy() for name, x in zip(self.input_names, inputs)}
        outs = self.session.run(self.output_names, feeds)
        return [torch.from_numpy(o).to(device) for o in outs]


class _InPlaceRuns:
    """Runs of a model with `present.*` outputs through one IO binding, kept between calls.

    An updated input that the model lets share its buffer (SHARED_PRESENT_KEY) is bound
    as its own present output: the model writes the new value where the input lies, no
    copy in or out, and ORT's GroupQueryAttention, seeing past and present share a
    buffer, writes only the new token. Other updated inputs get a present buffer of their
    own, copied into them after the run; so does an input that is not a contiguous CPU
    tensor (staged through a contiguous copy). An input is bound again only when its
    memory changed since the last call (a decode loop passes the same caches every step);
    the bound tensors are held until then, so an unchanged address is the same memory.
    Results are written into fresh tensors, bound each call (no copy after the run: a
    parallel torch copy leaves OpenMP threads spinning on the cores ORT's next run
    needs). A lock keeps calls one at a time.
    """

    def __init__(self, session, input_names: list[str], in_place: dict[int, str], shared: set[int],
                 result_names: list[str]) -> None:
        self.session = session
        self.input_names = input_names
        self.in_place = in_place
        self.shared = shared
        self.binding = session.io_binding()
        self.bound: list[tuple | None] = [None] * len(input_names)  # (input, dtype, present) addresses bound
        self.held: list[torch.Tensor | None] = [None] * len(input_names)
        self.present: dict[int, torch.Tensor] = {}  # present buffers of inputs that do not share theirs
        metas = {o.name: o for o in session.get_outputs()}
        for name in result_names:
            if metas[name].type not in _ORT_DTYPES:
                raise FlashcError(f"output {name!r} has type {metas[name].type}, which flashc cannot bind")
        self.result_specs = [(name, metas[name].shape, _ORT_DTYPES[metas[name].type]) for name in result_names]
        self.lock = threading.Lock()

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with self.lock:
            copies = []
            for i, (name, x) in enumerate(zip(self.input_names, inputs)):
                buf = x.detach().cpu().contiguous()
                present = None
                if i in self.in_place:
                    if i in self.shared:
                        present = buf
                    else:
                        if i not in self.present:
                            self.present[i] = torch.empty_like(buf)
                        present = self.present[i]
                    if present.data_ptr() != x.data_ptr():
                        copies.append((x, present))
                key = (buf.data_ptr(), buf.dtype, present.data_ptr() if present is not None else None)
                if self.bound[i] != key:
                    _bind(self.binding.bind_input, name, buf)
                    if present is not None:
                        _bind(self.binding.bind_output, self.in_place[i], present)
                    self.bound[i] = key
                self.held[i] = buf
            results = []
            for name, shape, dtype in self.result_specs:
                results.append(torch.empty(shape, dtype=dtype))
                _bind(self.binding.bind_output, name, results[-1])
            self.session.run_with_iobinding(self.binding)
            for x, present in copies:
                x.copy_(present)
            return results


def _bind(bind, name: str, t: torch.Tensor) -> None:
    """Bind a contiguous CPU tensor's memory as an input or output (bind_input / bind_output)."""
    bind(name, "cpu", 0, t.numpy().dtype, list(t.shape), t.data_ptr())
