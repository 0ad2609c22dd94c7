"""Calibration: example inputs run once through the program, gathering per-layer input statistics.

GPTQ needs each layer's input Hessian H = mean x x^T, AWQ the mean |x| per input channel
(and H, to measure output errors exactly). Both come from one run over the calibration
tokens (`collect_statistics`), with a progress bar.

The calibration data is flashc's built-in text (`flashc/data/calibration/`, English
licence prose and CPython standard-library source, disjoint from the evaluation texts of
`flashc/data/eval/`: calibrating on the test set would flatter every method), a text or
safetensors file of the user's, or tensors. It is cut into calls of the program's own
input shape; a decode-step program is fed one position at a time over a fresh cache.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from flashc.errors import FlashcError, InputError
from flashc.ir import InputSpec, Program, dtype_name

BUILTIN_FILES = ("prose.txt", "code.txt")

# Inputs besides the token ids that a calibration call fills in itself.
DEFAULT_INPUTS: dict[str, Callable[[InputSpec], torch.Tensor]] = {
    "attention_mask": lambda s: torch.ones(s.shape, dtype=s.dtype),
    "token_type_ids": lambda s: torch.zeros(s.shape, dtype=s.dtype),
    "position_ids": lambda s: torch.arange(s.shape[-1], dtype=s.dtype).expand(s.shape).contiguous(),
}


def calibration_dir() -> Path:
    """Where the built-in calibration text lives (inside the installed flashc package)."""
    import flashc

    return Path(flashc.__file__).resolve().parent / "data" / "calibration"


def load_builtin_text() -> str:
    """The built-in calibration text: ~63 KB of English prose, then ~126 KB of Python source."""
    directory = calibration_dir()
    missing = [f for f in BUILTIN_FILES if not (directory / f).is_file()]
    if missing:
        raise FlashcError(f"the built-in calibration text is missing from {directory} ({', '.join(missing)}); "
                          "the flashc install is incomplete: reinstall it, or pass calibration=FILE")
    return "\n\n".join((directory / f).read_text(encoding="utf-8") for f in BUILTIN_FILES)


@dataclass
class CalibrationData:
    """Calibration inputs: a token stream (`tokens`, int64 [n]) or samples per input name
    (`tensors`, each [N, ...] stacked along dim 0), and where they came from."""

    description: str
    tokens: torch.Tensor | None = None
    tensors: dict[str, torch.Tensor] | None = None
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def builtin(cls, tokenizer=None, vocab_size: int | None = None) -> "CalibrationData":
        """flashc's built-in calibration text, tokenized (see from_text)."""
        return cls.from_text(load_builtin_text(), tokenizer, vocab_size, "built-in calibration text")

    @classmethod
    def from_text(cls, text: str, tokenizer=None, vocab_size: int | None = None,
                  description: str = "text") -> "CalibrationData":
        """Tokens of text. Without a tokenizer (a random-weight model) the UTF-8 bytes are the
        token ids, which needs a vocabulary of at least 256: enough to exercise the pass, and
        such a model's accuracy means nothing anyway (the report says so)."""
        if tokenizer is not None:
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            return cls(f"{description}, {len(ids)} tokens", torch.tensor(ids, dtype=torch.long))
        if vocab_size is None or vocab_size < 256:
            raise FlashcError(f"calibration from {description} needs the model's tokenizer, and this model has none "
                              f"known to flashc{'' if vocab_size is None else f' (vocabulary {vocab_size})'}: "
                              "pass token ids instead (a tensor, or a .safetensors file with 'input_ids')")
        ids = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
        return cls(f"{description} as UTF-8 bytes, {ids.numel()} tokens", ids,
                   warnings=[f"calibrated on {description} read as UTF-8 bytes (the model has no tokenizer): "
                             "fine for a random-weight model, meaningless for a trained one"])

    @classmethod
    def from_file(cls, path: str | os.PathLike, tokenizer=None, vocab_size: int | None = None) -> "CalibrationData":
        """A text file (tokenized), or a .safetensors file of tensors (see from_tensors)."""
        path = Path(path)
        if not path.is_file():
            raise FlashcError(f"calibration file {path} does not exist (give 'builtin', a text file or a "
                              ".safetensors file)")
        if path.suffix in (".pt", ".pth", ".bin", ".pkl"):
            raise FlashcError(f"calibration file {path}: flashc never unpickles; save the tensors with "
                              "safetensors.torch.save_file (e.g. {'input_ids': ids}) and pass the .safetensors file")
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                tensors = load_file(str(path))
            except (SafetensorError, OSError) as e:
                raise FlashcError(f"calibration file {path} is not a readable safetensors file ({e})") from None
            return cls.from_tensors(tensors, str(path))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FlashcError(f"calibration file {path} is not UTF-8 text ({e}); give a text file or a "
                              ".safetensors file of token ids") from None
        return cls.from_text(text, tokenizer, vocab_size, str(path))

    @classmethod
    def from_tensors(cls, tensors: torch.Tensor | dict[str, torch.Tensor], description: str = "tensors"
                     ) -> "CalibrationData":
        """Integer ids (a tensor, or {'input_ids': ...}) of any shape become a token stream
        read row by row; otherwise one tensor per input name, samples stacked along dim 0."""
        if isinstance(tensors, torch.Tensor):
            tensors = {"input_ids": tensors}
        if not isinstance(tensors, dict) or not tensors or not all(isinstance(t, torch.Tensor)
                                                                   for t in tensors.values()):
            raise FlashcError("calibration tensors must be a tensor or a non-empty dict of tensors by input name")
        if set(tensors) == {"input_ids"} and not tensors["input_ids"].is_floating_point():
            ids = tensors["input_ids"].reshape(-1).long()
            return cls(f"{description}, {ids.numel()} tokens", ids)
        return cls(f"{description} ({', '.join(f'{k}{list(v.shape)}' for k, v in tensors.items())})",
                   tensors={k: v.detach() for k, v in tensors.items()})


def resolve_calibration(calibration: Any, tokenizer=None, vocab_size: int | None = None) -> CalibrationData:
    """CalibrationData from what flashc.compile's `calibration` accepts: None or 'builtin'
    (the built-in text), a path (text or .safetensors), a tensor or dict of tensors, or
    CalibrationData itself."""
    if isinstance(calibration, CalibrationData):
        return calibration
    if calibration is None or (isinstance(calibration, str) and calibration == "builtin"):
        return CalibrationData.builtin(tokenizer, vocab_size)
    if isinstance(calibration, (str, os.PathLike)):
        return CalibrationData.from_file(calibration, tokenizer, vocab_size)
    if isinstance(calibration, (torch.Tensor, dict)):
        return CalibrationData.from_tensors(calibration)
    raise FlashcError(f"calibration must be 'builtin', a file path, tensors or CalibrationData, "
                      f"got {type(calibration).__name__}")


def calibration_for_model(calibration: Any, model: torch.nn.Module, source=None) -> CalibrationData:
    """resolve_calibration with what flashc knows of the model: a zoo model with real weights
    tokenizes text with its own tokenizer; a random-weight zoo model reads it as bytes (its
    vocabulary size from its config); any other model needs token ids or tensors."""
    tokenizer, vocab_size = None, None
    if source is not None and source.kind == "zoo":
        from flashc import zoo

        if zoo.get_entry(source.name).pretrained:
            tokenizer = zoo.tokenizer(source.name)
        else:
            vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    return resolve_calibration(calibration, tokenizer, vocab_size)


# --------------------------------------------------------------------------------- calls


@dataclass
class CalibrationCalls:
    """The calls a calibration run makes: `count` argument tuples from `make()`, each giving
    `rows_per_call` activation rows (tokens) to the layers."""

    count: int
    rows_per_call: int
    make: Callable[[], Iterator[tuple[torch.Tensor, ...]]]
    unit: str  # what one row is, for messages ("tokens")

    @property
    def rows(self) -> int:
        return self.count * self.rows_per_call


def calibration_calls(program: Program, data: CalibrationData, max_rows: int,
                      device: torch.device | str = "cpu") -> CalibrationCalls:
    """Cut data into calls of the program's input signature, at most max_rows rows in all."""
    specs = program.inputs
    if not specs:
        raise FlashcError("the program has no inputs to calibrate with")
    if program.meta.signature == "decode":
        return _decode_calls(program, data, max_rows, device)
    if data.tensors is not None:
        return _tensor_calls(specs, data, max_rows, device)
    first = specs[0]
    if first.dtype.is_floating_point or len(first.shape) != 2:
        raise InputError(f"calibration {data.description} is token ids, but the model's first input is "
                         f"{first.describe()}: give tensors for each input instead "
                         f"({', '.join(s.describe() for s in specs)})")
    others = [s for s in specs[1:] if s.name not in DEFAULT_INPUTS]
    if others:
        raise InputError(f"calibration with token ids fills in {', '.join(DEFAULT_INPUTS)} itself, but the model "
                         f"also takes {', '.join(s.describe() for s in others)}: give a dict of tensors, one per "
                         "input name, samples stacked along dim 0")
    batch, seq = first.shape
    per_call = batch * seq
    count = min(data.tokens.numel(), max_rows) // per_call
    tokens = data.tokens

    def make():
        extra = [DEFAULT_INPUTS[s.name](s).to(device) for s in specs[1:]]
        for i in range(count):
            ids = tokens[i * per_call:(i + 1) * per_call].reshape(batch, seq).to(device, first.dtype)
            yield (ids, *extra)

    return CalibrationCalls(count, per_call, make, f"tokens (windows of {seq})")


def split_calls(calls: CalibrationCalls, rows: int) -> tuple[CalibrationCalls, CalibrationCalls]:
    """(fit, held out): the last calls holding about `rows` rows held out (at least one call, and
    at least one left to fit on). A decode step's calls are positions of windows over a cache,
    so its held-out part is whole windows only when they are given: here the first calls are
    shared instead (held-out = fit's start), which the caller reports."""
    held = max(1, min(calls.count - 1, -(-rows // max(calls.rows_per_call, 1))))
    if calls.count < 2 or calls.unit.startswith("tokens (decode"):
        first = CalibrationCalls(min(calls.count, held), calls.rows_per_call,
                                 lambda: itertools.islice(calls.make(), held), calls.unit)
        return calls, first
    fit = calls.count - held
    return (CalibrationCalls(fit, calls.rows_per_call, lambda: itertools.islice(calls.make(), fit), calls.unit),
            CalibrationCalls(held, calls.rows_per_call, lambda: itertools.islice(calls.make(), fit, None), calls.unit))


def _tensor_calls(specs: list[InputSpec], data: CalibrationData, max_rows: int, device) -> CalibrationCalls:
    tensors = data.tensors
    unknown = sorted(set(tensors) - {s.name for s in specs})
    if unknown:
        raise InputError(f"calibration tensors {unknown} name no input of the model; its inputs: "
                         f"{', '.join(s.describe() for s in specs)}")
    samples = None
    for s in specs:
        if s.name not in tensors:
            if s.name in DEFAULT_INPUTS:
                continue
            raise InputError(f"calibration tensors have no {s.name!r}; the model takes "
                             f"{', '.join(s.describe() for s in specs)}")
        t = tensors[s.name]
        if tuple(t.shape[1:]) != s.shape[1:] or t.dim() != len(s.shape):
            raise InputError(f"calibration tensor {s.name!r} is {list(t.shape)}; the model takes {s.describe()} "
                             f"per call, so give [N, {', '.join(map(str, s.shape[1:]))}] (N samples along dim 0)")
        if t.is_floating_point() != s.dtype.is_floating_point or (t.dtype == torch.bool) != (s.dtype == torch.bool):
            raise InputError(f"calibration tensor {s.name!r} is {dtype_name(t.dtype)}; the model takes "
                             f"{dtype_name(s.dtype)}")
        if samples is not None and t.shape[0] != samples:
            raise InputError(f"calibration tensors have different numbers of samples ({samples} and {t.shape[0]} "
                             f"for {s.name!r})")
        samples = t.shape[0]
    if samples is None:
        raise InputError("calibration tensors give none of the model's inputs")
    batch = specs[0].shape[0] if specs[0].shape else 1
    per_call = math.prod(specs[0].shape[:-1]) if specs[0].dtype.is_floating_point else math.prod(specs[0].shape)
    count = min(samples // batch, max_rows // max(per_call, 1))

    def make():
        for i in range(count):
            args = []
            for s in specs:
                if s.name in tensors:
                    args.append(tensors[s.name][i * batch:(i + 1) * batch].to(device, s.dtype))
                else:
                    args.append(DEFAULT_INPUTS[s.name](s).to(device))
            yield tuple(args)

    return CalibrationCalls(count, per_call, make, "rows (samples x positions)")


def _decode_calls(program: Program, data: CalibrationData, max_rows: int, device) -> CalibrationCalls:
    """A decode step sees one token per sequence per call: feed windows position by position
    over a zeroed cache (the caches are inputs the step writes in place)."""
    specs = program.inputs
    if data.tokens is None:
        raise InputError("calibrating a decode step needs token ids (text or a token tensor), not per-input tensors")
    ids_spec, pos_spec, caches = specs[0], specs[1], specs[2:]
    batch = ids_spec.shape[0]
    cache_len = program.meta.input_high.get("cache_position") or caches[0].shape[2]
    window = min(cache_len, 256)
    windows = min(data.tokens.numel(), max_rows) // (batch * window)
    tokens = data.tokens

    def make():
        for w in range(windows):
            chunk = tokens[w * batch * window:(w + 1) * batch * window].reshape(batch, window).to(device)
            kv = [torch.zeros(s.shape, dtype=s.dtype, device=device) for s in caches]
            for p in range(window):
                yield (chunk[:, p:p + 1].to(ids_spec.dtype), torch.tensor([p], dtype=pos_spec.dtype, device=device),
                       *kv)

    return CalibrationCalls(windows * window, batch, make, f"tokens (decode steps over windows of {window})")


# ---------------------------------------------------------------------------- statistics


class InputStatistics:
    """Sums over the rows x [K] a layer read: x^T x (fp32) and |x| (fp64), the largest |x| per
    channel, and their count."""

    def __init__(self, k: int, device) -> None:
        self.sum_xxt = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.sum_abs = torch.zeros(k, dtype=torch.float64, device=device)
        self.amax = torch.zeros(k, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(rows).all():
            raise FlashcError("calibration produced non-finite activations (inf or NaN); check the model in float "
                              "on the calibration data, or quantize with the rtn method")
        self.sum_xxt.addmm_(rows.t(), rows)
        self.sum_abs += rows.abs().sum(0, dtype=torch.float64)
        if rows.shape[0]:
            torch.maximum(self.amax, rows.abs().amax(0), out=self.amax)
        self.rows += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """mean x x^T (float64); zeros when no row was seen."""
        return self.sum_xxt.double() / max(self.rows, 1)

    def mean_abs(self) -> torch.Tensor:
        return self.sum_abs / max(self.rows, 1)


@dataclass
class ActivationSample:
    """Every `stride`-th row an input gets during calibration, at most `limit` rows: a sample
    spread over the whole run (the built-in text is prose, then code)."""

    stride: int
    limit: int
    position: int = 0  # of the input among the node's arguments
    rows: list[torch.Tensor] = field(default_factory=list)
    seen: int = 0
    kept: int = 0

    def __call__(self, args: tuple) -> None:
        x = args[self.position].detach()
        flat = x.reshape(-1, x.shape[-1])
        first = (-self.seen) % self.stride
        take = flat[first::self.stride][: self.limit - self.kept]
        if take.shape[0]:
            self.rows.append(take.float())
            self.kept += take.shape[0]
        self.seen += flat.shape[0]

    def tensor(self) -> torch.Tensor:
        """The sampled rows [R, K] (float32)."""
        return torch.cat(self.rows) if self.rows else torch.zeros(0, 0)


@dataclass
class LinearProbe:
    """Statistics of the input of a group of linear layers that read the same value."""

    stats: InputStatistics
    position: int = 0  # of the input among the node's arguments (addmm's is 1)

    def __call__(self, args: tuple) -> None:
        self.stats.add(args[self.position])


@dataclass
class MoeProbe:
    """Per-expert statistics of a flashc.moe node: each expert's routed tokens (gate_up's
    input) and its SwiGLU activations (down's input), computed with the float weights."""

    gate_up: list[InputStatistics]
    down: list[InputStatistics]
    gate_up_samples: list[ActivationSample] | None = None  # rows kept per expert, when asked
    down_samples: list[ActivationSample] | None = None

    def __call__(self, args: tuple) -> None:
        from flashc.ops import moe_routing

        x, logits, gate_up, down, top_k, normalize = args[:6]
        _, experts = moe_routing(logits, top_k, normalize, x.dtype)
        f = down.shape[-1]
        for e in range(gate_up.shape[0]):
            token, _ = torch.where(experts == e)
            if token.numel() == 0:
                continue
            xe = x[token]
            gu = xe @ gate_up[e].t()
            h = F.silu(gu[:, :f]) * gu[:, f:]
            self.gate_up[e].add(xe)
            self.down[e].add(h)
            if self.gate_up_samples is not None:
                self.gate_up_samples[e]((xe,))
                self.down_samples[e]((h,))


class _Recorder(fx.Interpreter):
    """Runs the graph, calling each probe with a node's arguments just before the node runs
    (so a probe sees exactly what the layer reads, even around in-place writes)."""

    def __init__(self, gm: fx.GraphModule, probes: dict[fx.Node, list]) -> None:
        super().__init__(gm)
        self.probes = probes

    def run_node(self, n: fx.Node) -> Any:
        if n in self.probes:
            args, _ = self.fetch_args_kwargs_from_env(n)
            for probe in self.probes[n]:
                probe(args)
        return super().run_node(n)


def collect_statistics(program: Program, probes: dict[fx.Node, list], calls: CalibrationCalls,
                       progress: bool = True) -> None:
    """Run every calibration call through program's graph, feeding the probes.

    The program's state (weights or buffers the graph writes) is copied first, so the
    model is left as it was; writes carry from call to call as they would in use.
    """
    from flashc.checking import written_state

    params = dict(program.params)
    for name in written_state(program):
        params[name] = params[name].clone()
    weights = [params[n.name] for n in program.param_nodes()]
    recorder = _Recorder(program.graph_module, probes)
    with torch.no_grad():
        for args in tqdm(calls.make(), total=calls.count, desc="calibrating", unit="call", disable=not progress):
            recorder.run(*weights, *args)
