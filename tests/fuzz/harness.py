"""The differential oracle: a compiled module against an eager copy of itself.

`check(case, target, level)` compiles a fresh instance of the case's module and calls
the result three times on fresh inputs, next to a deep copy of the module made before
compiling (with its own buffers) called on clones of the same inputs. After each call
it compares every output leaf and the inputs (in-place writes to the caller's tensors);
after the first it writes into the outputs that eager returns as new memory and compares
again (an output sharing memory with an input, another output or the compiled model's
state shows there, or in the next call); after the last it checks that the second
call's outputs were not overwritten since. For the PyTorch-run targets it compares the
buffers. Neither compiling nor calling the compiled model may change the module it was
given (the compiled model owns its state, as flashc.capture documents).

Outcomes: ok; refused (a FlashcError at compile or call time: allowed); mismatch (a
silently different result); crash (any other exception).
"""

from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

import flashc
from flashc.errors import FlashcError

OUTCOMES = ("ok", "refused", "mismatch", "crash")
CALLS = 3
STATE_TARGETS = ("cpu", "eager")  # targets whose state (buffers) lives in program.params

# (atol, rtol) per floating dtype: about a few units in the last place of the dtype for
# one op, and 1e-4 for float32, where reductions of up to 70 elements and matmuls reorder
# sums (seen at most ~1e-6 here); integers and bools compare exactly.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-3, 4e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


@dataclass
class Outcome:
    status: str  # one of OUTCOMES
    message: str = ""

    def __str__(self) -> str:
        return f"{self.status}: {self.message}" if self.message else self.status


class Mismatch(Exception):
    """A difference between compiled and eager; the message says where and by how much."""


class InvalidCase(Exception):
    """The eager module itself failed: a bug of the generator, not of flashc."""


def compare_tensor(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    """Raise Mismatch unless got matches want: shape, dtype, NaN and +/-inf positions, finite values."""
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        raise Mismatch(f"{where}: got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}")
    got, want = got.detach().cpu(), want.detach().cpu()
    if not want.is_floating_point():
        if not torch.equal(got, want):
            bad = (got != want).sum().item()
            diff = (got.long() - want.long()).abs().max().item() if want.dtype != torch.bool else 1
            raise Mismatch(f"{where}: {bad}/{want.numel()} elements differ (max abs diff {diff}); "
                           f"got {_preview(got)}, want {_preview(want)}")
        return
    g, w = got.double(), want.double()
    for name, test in (("NaN", torch.isnan), ("+inf", lambda t: t == float("inf")),
                       ("-inf", lambda t: t == float("-inf"))):
        if not torch.equal(test(g), test(w)):
            raise Mismatch(f"{where}: {name} at different positions ({int(test(g).sum())} vs {int(test(w).sum())}); "
                           f"got {_preview(got)}, want {_preview(want)}")
    finite = torch.isfinite(w)
    atol, rtol = TOLERANCE.get(want.dtype, (0.0, 0.0))
    err = (g - w).abs().where(finite, torch.zeros_like(g))
    bad = err > atol + rtol * w.abs().where(finite, torch.zeros_like(w))
    if bad.any():
        raise Mismatch(f"{where}: {int(bad.sum())}/{want.numel()} elements differ, max abs err "
                       f"{err.max().item():.3g} (atol {atol:g}, rtol {rtol:g}); got {_preview(got)}, "
                       f"want {_preview(want)}")


def _preview(t: torch.Tensor, n: int = 6) -> str:
    flat = t.reshape(-1)[:n].tolist()
    return f"[{', '.join(f'{v:.4g}' if isinstance(v, float) else str(v) for v in flat)}{', ...' if t.numel() > n else ''}]"


def compare_trees(got: Any, want: Any, where: str) -> None:
    """Compare two pytrees leaf by leaf (same structure, tensors by compare_tensor)."""
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    if got_spec != want_spec:
        raise Mismatch(f"{where}: structure {got_spec} instead of {want_spec}")
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        here = f"{where}[{i}]" if len(want_leaves) > 1 else where
        if isinstance(w, torch.Tensor):
            if not isinstance(g, torch.Tensor):
                raise Mismatch(f"{here}: got a {type(g).__name__}, want a tensor")
            compare_tensor(g, w, here)
        elif g != w:
            raise Mismatch(f"{here}: got {g!r}, want {w!r}")


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _fresh_leaves(outputs: list, others: list[torch.Tensor]) -> list[int]:
    """Indices of the tensor leaves that share memory with no other leaf nor any of others."""
    fresh = []
    for i, t in enumerate(outputs):
        if not isinstance(t, torch.Tensor):
            continue
        if any(_shares_memory(t, o) for o in others):
            continue
        if any(j != i and isinstance(u, torch.Tensor) and _shares_memory(t, u) for j, u in enumerate(outputs)):
            continue
        fresh.append(i)
    return fresh


def _scribble(leaves: list, indices: list[int]) -> None:
    """Write a distinct constant into each chosen leaf, as a caller owning them may."""
    for k, i in enumerate(indices):
        leaves[i].fill_(True if leaves[i].dtype == torch.bool else k + 2)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _state(module).items()}


def _compiled_buffer(cm: Any, name: str) -> torch.Tensor | None:
    """The compiled program's copy of buffer `name`, under the names capture gives it."""
    key = name.replace(".", "_")
    params = getattr(getattr(cm, "program", None), "params", {})
    for candidate in (f"b_{key}", f"p_{key}", f"c_{key}", key):
        if candidate in params:
            return params[candidate]
    return None


def _where_raised(error: BaseException) -> str:
    """file:line of the innermost frame in flashc's own code (or the innermost at all)."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/flashc/" in f.filename or "/passes/" in f.filename
            or "/backends/" in f.filename or "/codegen/" in f.filename]
    f = (ours or frames or [None])[-1]
    return f" (at {f.filename.split('/main/')[-1]}:{f.lineno})" if f is not None else ""


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The error's type and message on one line (a FlashcError's list of ops included)."""
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    return f"{type(error).__name__}: {text[:limit]}"


def _clone_args(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def check(case, target: str, level: int, compile_fn: Callable | None = None) -> Outcome:
    """Run one case on one target and level; see the module docstring for what is compared."""
    compile_fn = compile_fn or flashc.compile
    module = case.build()
    reference = copy.deepcopy(module)
    before = _snapshot(module)
    try:
        compiled = compile_fn(module, target=target, example_inputs=case.inputs(0), level=level)
    except FlashcError as e:
        return Outcome("refused", f"compile: {_first_line(e)}")
    except Exception as e:
        return Outcome("crash", f"compile: {_first_line(e)}{_where_raised(e)}")
    try:
        for name, value in _snapshot(module).items():
            compare_tensor(value, before[name], f"compiling changed the module's {name!r}")
        _calls(case, compiled, reference, target)
        for name, value in _snapshot(module).items():
            compare_tensor(value, before[name], f"calling the compiled model changed the module's {name!r}")
    except Mismatch as e:
        return Outcome("mismatch", str(e))
    except InvalidCase as e:
        return Outcome("crash", f"the eager module failed, a generator bug, not flashc's: {e}")
    except FlashcError as e:
        return Outcome("refused", f"call: {_first_line(e)}")
    except Exception as e:
        return Outcome("crash", f"call: {_first_line(e)}{_where_raised(e)}")
    return Outcome("ok")


def _calls(case, compiled, reference: torch.nn.Module, target: str) -> None:
    kept = None  # the second call's outputs, checked after the third for being overwritten
    scribbled = ""  # said in later messages: a difference may come from writing into outputs
    for call in range(1, CALLS + 1):
        args = case.inputs(call)
        ref_args, cm_args = _clone_args(args), _clone_args(args)
        try:
            with torch.no_grad():
                want = reference(*ref_args)
        except Exception as e:
            raise InvalidCase(_first_line(e)) from e
        got = compiled(*cm_args)
        where = f"call {call}{scribbled}"
        compare_trees(got, want, f"{where} output")
        compare_trees(list(cm_args), list(ref_args), f"{where} input after the call")
        want_leaves, got_leaves = pytree.tree_leaves(want), pytree.tree_leaves(got)
        if call == 1:
            state = list(_state(reference).values())
            fresh = _fresh_leaves(want_leaves, [*ref_args, *state])
            with torch.no_grad():
                _scribble(want_leaves, fresh)
                _scribble(got_leaves, fresh)
            after = f"{where}, after the caller wrote into outputs {fresh}:"
            compare_trees(got_leaves, want_leaves, f"{after} output")
            compare_trees(list(cm_args), list(ref_args), f"{after} input")
            if fresh:
                scribbled = (f" (after the caller wrote {', '.join(str(k + 2) for k in range(len(fresh)))} "
                             f"into call 1's new output leaves {fresh})")
        if call == 2:
            state = list(_state(reference).values())
            kept = (got_leaves, want_leaves, _fresh_leaves(want_leaves, [*ref_args, *state]))
    if kept is not None:
        got_leaves, want_leaves, fresh = kept
        for i in fresh:
            compare_tensor(got_leaves[i], want_leaves[i], f"call 2 output [{i}] after call 3 (overwritten?)")
    if target in STATE_TARGETS:
        for name, value in reference.named_buffers():
            mine = _compiled_buffer(compiled, name)
            if mine is not None and mine.shape == value.shape and mine.dtype == value.dtype:
                compare_tensor(mine, value, f"buffer {name!r} after {CALLS} calls")
