"""Run an exported model with ONNX Runtime, tensors in and out.

An input that the model updates (a decode step's KV cache, a tensor the model writes in
place) has an output named `present.<input>`: its new value. The model is called like
the Program it came from, so those inputs are updated in place and only the other
outputs are returned. Weights/buffers the model writes are its *state* (metadata
`flashc.state`): graph inputs that the runtime feeds from the tensors it was given
(the compiled model's `program.params`) and writes back after each call.

Every failure is a FlashcError: a model ONNX Runtime cannot load (an op without a kernel
for its dtype, UnsupportedOpError) or a run that fails names the ONNX node and the model
code it came from (module, source line).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Mapping, Sequence

import torch

from flashc.errors import FlashcError, InputError, UnsupportedOpError

INSTALL_ORT = "pip install onnxruntime (CPU) or pip install onnxruntime-gpu (CUDA)"
# The output holding the new value of an input the model writes in place: PRESENT_PREFIX + input name.
PRESENT_PREFIX = "present."
# Model metadata: the inputs (comma-separated) whose present output may be written into
# the input's own buffer, because every node reading the input runs before it is written.
SHARED_PRESENT_KEY = "flashc.present_shares_input"
# Model metadata: the inputs (comma-separated) that are the model's state (weights/buffers it writes).
STATE_KEY = "flashc.state"

_ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
               "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32,
               "tensor(int16)": torch.int16, "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8,
               "tensor(bool)": torch.bool}
# torch dtype -> ONNX TensorProto element type, what IO binding takes (numpy has no bfloat16)
_ELEMENT_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int16: 5, torch.int32: 6, torch.int64: 7,
                  torch.bool: 9, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}

# ONNX Runtime graph optimizations that change what the model computes. NoopElimination
# drops `x + 0`, which turns -0.0 into +0.0 in IEEE arithmetic (and PyTorch): 1 / (x + 0.0)
# is +inf for x = -0.0, -inf without the Add. NotWhereFusion swaps Where(Not(c), a, b) into
# Where(c, b, a), and ORT's Where returns +0.0 for a -0.0 from its first branch (the exporter
# puts values that may be -0.0 second, `_aten`).
UNSOUND_ORT_OPTIMIZERS = ["NoopElimination", "NotWhereFusion"]

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
    but the `present.*` outputs of inputs updated in place). input_names are all the
    model's inputs: the caller's (user_input_names), then its state (state_names), fed
    from `state`, the tensors given at load, which each call updates in place.
    """

    def __init__(self, session, path: Path, state: Mapping[str, torch.Tensor] | None = None) -> None:
        self.session = session
        self.path = path
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        meta = session.get_modelmeta().custom_metadata_map
        self.state_names = [n for n in meta.get(STATE_KEY, "").split(",") if n]
        missing = [n for n in self.state_names if state is None or n not in state]
        if missing:
            raise FlashcError(f"the ONNX model at {path} keeps state ({', '.join(missing)}: weights/buffers it "
                              "writes in place) and needs their tensors: OnnxRuntimeModel.load(path, state={name: "
                              "tensor}), e.g. the compiled model's program.params")
        self.state = {n: state[n] for n in self.state_names}
        self.user_input_names = [n for n in self.input_names if n not in self.state]
        # input index -> the output with its new value
        self.in_place = {i: PRESENT_PREFIX + name for i, name in enumerate(self.input_names)
                         if PRESENT_PREFIX + name in self.output_names}
        self.result_names = [n for n in self.output_names if n not in self.in_place.values()]
        shared = meta.get(SHARED_PRESENT_KEY, "").split(",")
        self._runs = _Runs(self, {i for i in self.in_place if self.input_names[i] in shared})
        self.keepalive: object = None  # e.g. the temporary directory holding the model file

    @classmethod
    def load(cls, path: str | Path, providers: str | Sequence[str] | None = None,
             threads: int | None = None, state: Mapping[str, torch.Tensor] | None = None) -> "OnnxRuntimeModel":
        """Open path (external weight data next to it is found automatically).

        providers: None or 'cpu' for the CPU EP, 'cuda' for CUDA with CPU fallback for
        ops it lacks, or a list of ORT provider names. threads: intra-op threads (None:
        ORT's default, one per core). state: the tensors of the model's state inputs, by
        name (updated in place by each call).
        """
        ort = import_onnxruntime()
        path = Path(path)
        if not path.is_file():
            raise FlashcError(f"no ONNX model at {path}")
        names = resolve_providers(providers, ort.get_available_providers())
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=names,
                                           disabled_optimizers=UNSOUND_ORT_OPTIMIZERS)
        except Exception as e:
            raise _load_error(e, path, names) from e
        return cls(session, path, state)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Run on torch tensors; returns the results as torch tensors on the first input's device.

        Inputs with a `present.*` output, and the state, are updated in place.
        """
        names = self.user_input_names
        if len(inputs) != len(names):
            raise InputError(f"expected {len(names)} input(s) ({', '.join(names)}), got {len(inputs)}")
        metas = {m.name: m for m in self.session.get_inputs()}
        for name, x in zip(names, inputs):
            meta = metas[name]
            if not isinstance(x, torch.Tensor):
                raise InputError(f"input {name!r}: expected a tensor, got {type(x).__name__}")
            if list(x.shape) != list(meta.shape):
                raise InputError(f"input {name!r}: expected shape {list(meta.shape)}, got {list(x.shape)}; "
                                 "the model was exported for that shape")
            if _ORT_DTYPES.get(meta.type) != x.dtype:
                raise InputError(f"input {name!r}: expected {meta.type}, got {x.dtype}")
        device = inputs[0].device if inputs else torch.device("cpu")
        given = dict(zip(names, inputs))
        every = [given[n] if n in given else self.state[n] for n in self.input_names]
        return [o.to(device) for o in self._runs(every)]

    def node_origin(self, name: str) -> str:
        """'<op> node <name> (<module> at <source line>)': an ONNX node and the model code it came from."""
        try:
            import onnx

            graph = onnx.load(str(self.path), load_external_data=False).graph
        except Exception:  # a description, not worth a second error
            return f"node {name}"
        return _node_origin(graph, name)


def _node_origin(graph, name: str) -> str:
    for node in graph.node:
        if node.name == name:
            props = {p.key: p.value for p in node.metadata_props}
            module, source = props.get("flashc.module"), props.get("flashc.source")
            where = f"{module} at {source}" if module else source
            return f"{node.op_type} node {name}" + (f" (from {where})" if where else "")
    return f"node {name}"


def _failing_node(message: str) -> str | None:
    """The ONNX node an ONNX Runtime error message names, if any."""
    found = re.search(r"node with name '([^']*)'", message) or re.search(r"Name:'([^']*)'", message)
    return found.group(1) if found else None


def _load_error(e: Exception, path: Path, providers: list[str]) -> FlashcError:
    """ONNX Runtime's refusal to load path, as a FlashcError naming the node and its model code."""
    message = str(e).strip()
    node = _failing_node(message)
    where = ""
    if node:  # '' for a node ONNX Runtime made itself (expanding a function op such as Gelu)
        try:
            import onnx

            where = " at " + _node_origin(onnx.load(str(path), load_external_data=False).graph, node)
        except Exception:  # the model file itself is unreadable: the message says so
            where = f" at node {node}"
    if "NOT_IMPLEMENTED" in message or "Could not find an implementation" in message:
        return UnsupportedOpError(
            f"ONNX Runtime ({', '.join(providers)}) has no kernel for an op of the model{where}: {message}. "
            "Compile for target cpu, or use a dtype this provider runs (float32)")
    return FlashcError(f"ONNX Runtime could not load the model at {path}{where}: {message}")


class _Runs:
    """Runs of a model through one IO binding, kept between calls.

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
    needs). A lock keeps calls one at a time. Tensors are bound by address and ONNX
    element type, so every dtype ORT has (bfloat16 too) passes.
    """

    def __init__(self, model: OnnxRuntimeModel, shared: set[int]) -> None:
        self.model = model
        session = model.session
        self.input_names = model.input_names
        self.in_place = model.in_place
        self.shared = shared
        self.binding = session.io_binding()
        self.bound: list[tuple | None] = [None] * len(self.input_names)  # (input, dtype, present) addresses bound
        self.held: list[torch.Tensor | None] = [None] * len(self.input_names)
        self.present: dict[int, torch.Tensor] = {}  # present buffers of inputs that do not share theirs
        metas = {o.name: o for o in session.get_outputs()}
        for name in model.output_names:
            if metas[name].type not in _ORT_DTYPES:
                raise FlashcError(f"output {name!r} has type {metas[name].type}, which flashc cannot bind")
        self.result_specs = [(name, metas[name].shape, _ORT_DTYPES[metas[name].type]) for name in model.result_names]
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
            try:
                self.model.session.run_with_iobinding(self.binding)
            except Exception as e:
                message = str(e).strip()
                node = _failing_node(message)
                where = f" at {self.model.node_origin(node)}" if node else ""
                raise FlashcError(f"ONNX Runtime failed running the model{where}: {message}") from e
            for x, present in copies:
                x.copy_(present)
            return results


def _bind(bind, name: str, t: torch.Tensor) -> None:
    """Bind a contiguous CPU tensor's memory as an input or output (bind_input / bind_output)."""
    if t.dtype not in _ELEMENT_TYPES:
        raise InputError(f"{name!r}: ONNX Runtime cannot take a {t.dtype} tensor")
    # a tensor without elements may have no memory (data_ptr 0), which ONNX Runtime refuses: it reads
    # and writes nothing there, so any valid address does
    address = t.data_ptr() if t.numel() else _NO_ELEMENTS.data_ptr()
    bind(name, "cpu", 0, _ELEMENT_TYPES[t.dtype], list(t.shape), address)


_NO_ELEMENTS = torch.empty(64, dtype=torch.uint8)
