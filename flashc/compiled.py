"""CompiledModel: what flashc.compile returns and flashc.load brings back."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from flashc.artifact import load_tensors, read_manifest, save_tensors, write_artifact
from flashc.errors import ArtifactError, InputError, VerificationError
from flashc.ir import InputSpec, Program, ProgramMeta, dtype_from_name, dtype_name, propagate_shapes
from flashc.lowering import Executable, Fallback
from flashc.pass_manager import PassRecord
from flashc.profiles import HardwareProfile, get_profile
from flashc.report import CompileReport
from flashc.serialize import graph_from_json, graph_to_json


@dataclass
class ModelSource:
    """How to rebuild the eager model an artifact came from (zoo name or file:factory)."""

    kind: str  # "zoo", "factory" or "module" (an in-memory module: not rebuildable)
    name: str
    dtype: str = "float32"
    seed: int = 0
    batch: int = 1
    seq_len: int = 16
    signature: str = "prefill"  # or "decode": one token with a static KV cache of cache_len
    cache_len: int = 0


@dataclass
class CompiledModel:
    """A callable that computes what the model computes, plus how it was made."""

    program: Program
    target: str
    profile: HardwareProfile
    level: int
    executable: Executable
    records: list[PassRecord]
    fallbacks: list[Fallback]
    source: ModelSource
    timings: dict[str, float] = field(default_factory=dict)
    reference_weights: dict[str, torch.Tensor] | None = None  # the original model's, for `flashc run`
    accuracy: list | None = None  # evaluation results when a compile changed numerics
    rewrites: dict[str, list[list[str]]] | None = None  # model-level rewrites (attention -> SSM): table rows
    _kv_cache: list[torch.Tensor] | None = field(default=None, repr=False)  # generate()'s resident cache

    @property
    def inputs(self) -> list[InputSpec]:
        return self.program.inputs

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
        """Run the compiled model on tensors of the compiled shapes, positionally or by input
        name as the model is called (`cm(input_ids, attention_mask=mask)`, `cm(**batch)`)."""
        args = self.program.bind(args, kwargs)
        self.program.check_inputs(args)
        self._check_positions(args)
        with torch.no_grad():
            flat = self.executable(*args)
        return self.program.unflatten(flat)

    def _check_positions(self, args: tuple) -> None:
        """A decode step's cache_position must index its static cache (never a wrong answer)."""
        limits = self.program.meta.input_high
        for spec, a in zip(self.inputs, args):
            if spec.name in limits and a.numel():
                low, high = torch.stack(torch.aminmax(a)).tolist()  # one sync with the device
                if low < 0 or high >= limits[spec.name]:
                    raise InputError(f"input {spec.name!r}: positions {low}..{high} are outside the static KV "
                                     f"cache of {limits[spec.name]} slots this step was compiled for; "
                                     "recompile with a larger cache_len")

    def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_token_id: int | None = None, ignore_eos: bool = False, progress: bool = False) -> torch.Tensor:
        """Greedy (temperature 0) or sampled generation; see flashc.generate.

        Needs a decode-step compile (`flashc.decode.DecodeStep`, or the CLI's
        `--signature decode`). The KV cache is allocated once, where the executable
        runs, and reused by later calls (each call overwrites what it reads).
        input_ids: ids [B, P], or a tokenizer's output (`tokenizer(text, return_tensors="pt")`:
        its input_ids; an attention_mask with padding is refused, use compile_generation's ragged
        batches). A sequence stops at eos_token_id, by default the model's end token (its
        generation config's, as Hugging Face's generate); ignore_eos generates max_new_tokens.
        """
        from flashc.generate import Steps, generate

        input_ids = prompt_ids(input_ids)
        if eos_token_id is None and not ignore_eos:
            eos_token_id = self.program.meta.eos_token_id

        if self.program.meta.signature != "decode":
            raise InputError("generate needs a model compiled with the decode-step signature "
                             "(flashc.decode.DecodeStep, or flashc compile --signature decode)")
        specs = self.inputs
        if input_ids.shape[0] != specs[0].shape[0]:
            raise InputError(f"input_ids has batch {input_ids.shape[0]} but this step was compiled for batch "
                             f"{specs[0].shape[0]}")
        if self._kv_cache is None:
            from flashc.targets import get_target

            on_gpu = get_target(self.target).backend().name == "cuda" and torch.cuda.is_available()
            device = "cuda" if on_gpu else "cpu"
            self._kv_cache = [torch.zeros(s.shape, dtype=s.dtype, device=device) for s in specs[2:]]
        step = self.executable

        def run(ids: torch.Tensor, pos: torch.Tensor, *kv: torch.Tensor) -> torch.Tensor:
            return step(ids, pos, *kv)[0]

        high = self.program.meta.input_high.get("cache_position")
        steps = Steps({1: run}, self._kv_cache, cache_len=int(high) if high else None,
                      stateful=any(s.name.startswith("ssm_state_") for s in specs[2:]))
        with torch.no_grad():
            return generate(steps, input_ids.to(specs[0].dtype), max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            eos_token_id=eos_token_id, progress=progress)

    def report(self) -> CompileReport:
        """What ran, what it changed, what fell back, and the cost model's estimate."""
        from flashc.cost_model import estimate

        if any(n.meta.get("val") is None for n in self.program.op_nodes()):
            propagate_shapes(self.program)
        return CompileReport(
            model=self.source.name, target=self.target, profile=self.profile, level=self.level,
            capture=self.program.meta.capture or "?", warnings=list(self.program.meta.warnings),
            records=self.records, fallbacks=self.fallbacks, estimate=estimate(self.program, self.profile),
            timings=self.timings, weights=len(self.program.params),
            weight_bytes=sum(t.numel() * t.element_size() for t in self.program.params.values()),
            accuracy=self.accuracy, rewrites=self.rewrites,
        )

    def save(self, path: str | os.PathLike, *, weights_elsewhere: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the artifact directory atomically (see flashc.artifact).

        Replaces only an earlier flashc artifact or an empty directory at `path`;
        anything else there, and any filesystem failure, is an ArtifactError.
        weights_elsewhere: weights another artifact stores (a generation artifact's decode
        entry): those equal to it by name, shape, dtype and value are not written, and the
        manifest lists them under `external_weights` for `load(..., external_weights=)`.
        """
        from flashc import __version__
        from flashc.artifact import COMPILED_MODEL_MANIFEST
        from flashc.targets import get_target

        backend = get_target(self.target).backend()
        out_spec, out_type = _dump_out_spec(self.program.out_spec)
        manifest = {
            "flashc_version": __version__, "torch_version": torch.__version__, "target": self.target,
            "profile": self.profile.name, "level": self.level,
            "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": dtype_name(s.dtype)} for s in self.inputs],
            "out_spec": out_spec, "out_type": out_type, "source": asdict(self.source),
            "meta": self.program.meta.to_json(),
            "pipeline": [asdict(r) for r in self.records],
            "fallbacks": [asdict(f) for f in self.fallbacks], "timings": self.timings,
            "estimate": self.report().estimate.summary(),
        }
        payload: dict[str, Any] = {}
        stored, external = _split_weights(self.program.params, weights_elsewhere or {})
        if external:
            manifest["external_weights"] = external

        def write_payload(d: Path) -> None:
            d.mkdir()
            payload.update(backend.save_payload(self.executable, d))

        writers = {
            "graph.json": lambda p: p.write_text(json.dumps(graph_to_json(self.program.graph))),
            "weights.safetensors": lambda p: save_tensors(stored, p),
            "payload": write_payload,
        }
        if self.reference_weights is not None:
            writers["reference.safetensors"] = lambda p: save_tensors(self.reference_weights, p)
        manifest["payload"] = payload
        return write_artifact(path, manifest, writers, schema=COMPILED_MODEL_MANIFEST)


def _split_weights(params: dict[str, torch.Tensor], elsewhere: dict[str, torch.Tensor]):
    """(weights to write here, sorted names of those `elsewhere` holds unchanged)."""
    stored, external = {}, []
    for name, t in params.items():
        other = elsewhere.get(name)
        if other is not None and (other is t or (other.shape == t.shape and other.dtype == t.dtype
                                                 and torch.equal(other.cpu(), t.cpu()))):
            external.append(name)
        else:
            stored[name] = t
    return stored, sorted(external)


def _dump_out_spec(spec: pytree.TreeSpec | None) -> tuple[str | None, str | None]:
    """The output structure as torch's pytree JSON, and the outermost output type's name."""
    import warnings

    from flashc.serialize import output_type_name

    if spec is None:
        return None, None
    try:
        return pytree.treespec_dumps(spec), output_type_name(spec)
    except Exception as e:  # a type registered without a serialized name
        warnings.warn(f"the output type {output_type_name(spec)} cannot be stored ({e}); the loaded artifact "
                      "will return a flat tuple instead", stacklevel=3)
        return None, output_type_name(spec)


def load(path: str | os.PathLike, *, external_weights: dict[str, torch.Tensor] | None = None):
    """Load an artifact written by CompiledModel.save (or GenerationModel.save, which gives a
    flashc.generation.GenerationModel); checks checksums, never unpickles. external_weights:
    the weights an entry of a generation artifact shares with its decode entry.

    The manifest is checked field by field and the output type is rebuilt from what it
    records (see flashc.serialize.output_spec_from_json); any problem is an ArtifactError
    naming the file and the field.
    """
    from flashc.artifact import COMPILED_MODEL_MANIFEST, MANIFEST
    from flashc.generation import is_generation_artifact, load_generation

    path = Path(path)
    if is_generation_artifact(path):
        return load_generation(path)
    mpath = path / MANIFEST
    manifest = read_manifest(path, schema=COMPILED_MODEL_MANIFEST)
    for name in ("graph.json", "weights.safetensors"):
        if name not in manifest["files"]:
            raise ArtifactError(f"{mpath}: field 'files' does not list {name}; the artifact is incomplete: recompile")
    try:
        entries = json.loads((path / "graph.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path / 'graph.json'}: cannot read graph ({e})") from None
    gm = graph_from_json(entries)
    params = load_tensors(path / "weights.safetensors")
    wanted = manifest.get("external_weights", [])
    if wanted:
        missing = [n for n in wanted if n not in (external_weights or {})]
        if missing:
            raise ArtifactError(f"{mpath}: {len(missing)} weights ({', '.join(missing[:3])}...) live in the artifact "
                                "this one is part of (a generation artifact's decode entry): load that artifact")
        params.update({n: external_weights[n] for n in wanted})
    inputs = [InputSpec(i["name"], tuple(i["shape"]), _manifest_value(mpath, f"inputs[{n}].dtype", dtype_from_name,
                                                                     i["dtype"]))
              for n, i in enumerate(manifest["inputs"])]
    source = ModelSource(**manifest["source"])
    records = [PassRecord(**r) for r in manifest["pipeline"]]
    fallbacks = [Fallback(**f) for f in manifest["fallbacks"]]
    level = manifest["level"]
    profile = _manifest_value(mpath, "profile", get_profile, manifest["profile"])
    target = _manifest_value(mpath, "target", _get_target, manifest["target"])
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    expected = [p for p in placeholders if p in params] + [s.name for s in inputs]
    if placeholders != expected or set(params) - set(placeholders):
        raise ArtifactError(f"{path}: graph.json and weights.safetensors disagree on the graph's inputs")
    out_spec = _load_out_spec(manifest, mpath)
    try:
        meta = ProgramMeta.from_json(manifest.get("meta", {}), "meta")
    except VerificationError as e:
        raise ArtifactError(f"{mpath}: {e}") from None
    meta.profile = profile.name
    program = Program(gm, params, inputs, out_spec, meta)
    try:
        propagate_shapes(program)  # backends and reports read node shapes
    except Exception as e:
        raise ArtifactError(f"{path / 'graph.json'}: the stored graph does not type-check ({e})") from None
    try:
        from flashc import lowering

        executable = lowering.load(target.backend(), program, profile, path / "payload", manifest.get("payload", {}))
    except OSError as e:
        raise ArtifactError(f"{path / 'payload'}: cannot read the backend payload ({e}); recompile") from None
    reference = None
    if "reference.safetensors" in manifest["files"]:  # only a listed file has been checksummed
        reference = load_tensors(path / "reference.safetensors")
    return CompiledModel(program, manifest["target"], profile, level, executable, records, fallbacks, source,
                         dict(manifest.get("timings", {})), reference)


def _get_target(name: str):
    from flashc.targets import get_target

    return get_target(name)


def _manifest_value(mpath: Path, field: str, resolve, value):
    """resolve(value), with a failure reported as the manifest field that holds the value."""
    from flashc.errors import UnknownNameError

    try:
        return resolve(value)
    except (UnknownNameError, ValueError) as e:
        raise ArtifactError(f"{mpath}: field '{field}': {e}") from None


def _load_out_spec(manifest: dict, mpath: Path) -> pytree.TreeSpec | None:
    """The output structure the manifest records; None (outputs as a flat tuple) with a warning
    when its type cannot be rebuilt here."""
    import warnings

    from flashc.serialize import output_spec_from_json

    if manifest.get("out_spec"):
        return output_spec_from_json(manifest["out_spec"], f"{mpath}: field 'out_spec'", stacklevel=4)
    out_type = manifest.get("out_type")
    if out_type and out_type not in ("builtins.tuple", "builtins.list"):
        warnings.warn(f"{mpath}: the model returned {out_type}, which could not be stored; outputs load as a "
                      "flat tuple", stacklevel=3)
    return None


def tokenizer_output(prompt) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(input_ids [B, P], kept [B, P] bool: the attention_mask, all True without one) when prompt is a
    tokenizer's output (a mapping with input_ids), else None."""
    from collections.abc import Mapping

    if not isinstance(prompt, Mapping):
        return None
    if "input_ids" not in prompt:
        raise InputError(f"a mapping prompt needs 'input_ids' (a tokenizer's output); got keys {sorted(prompt)}")
    ids = torch.as_tensor(prompt["input_ids"])
    ids = ids[None] if ids.dim() == 1 else ids
    mask = prompt.get("attention_mask")
    kept = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).reshape(ids.shape).bool()
    return ids, kept


def prompt_ids(prompt):
    """Token ids from what a user hands generate(): ids themselves, or a tokenizer's output whose
    attention_mask marks no padding (padded batches are prompts of different lengths, which
    compile_generation(..., ragged=True) takes as a list)."""
    given = tokenizer_output(prompt)
    if given is None:
        return prompt
    ids, kept = given
    if not bool(kept.all()):
        raise InputError("the tokenizer's attention_mask marks padding: prompts of different lengths go to a "
                         "ragged generation model (flashc.compile_generation(..., ragged=True)) as a list of "
                         "1-D id tensors, one per prompt")
    return ids
