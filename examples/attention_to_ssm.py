"""Replace half of a model's attention layers with state-space layers, distil them, and generate.

Shows: flashc.passes.ssm.rewrite (convert, align each new layer with the attention it replaces,
distil end to end on flashc's calibration text; which layers keep attention is measured),
perplexity before and after on flashc's evaluation text, and generation with a fixed-size state
in place of those layers' KV cache, checked token for token against the rewritten model's own
full forward. The model is mixtral-ref (flashc's own small float-trained MoE).

    python examples/attention_to_ssm.py            # 200 + 200 training steps
    python examples/attention_to_ssm.py --quick    # 20 + 20 steps, layers chosen on 512 held-out tokens
"""

import argparse
import os

import torch

from flashc import zoo
from flashc.distill import DistillConfig
from flashc.evaluation import load_eval_text, perplexity
from flashc.generation import compile_generation
from flashc.passes.quantize.calibration import CalibrationData
from flashc.passes.ssm import SSMConfig, rewrite


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("FLASHC_EXAMPLES_QUICK") == "1")
    quick = parser.parse_args().quick
    steps = 20 if quick else 200

    model, tokenizer = zoo.build("mixtral-ref"), zoo.tokenizer("mixtral-ref")
    layers = model.config.num_hidden_layers
    config = SSMConfig(layers="all", keep_attention=layers // 2,
                       align=DistillConfig(steps=steps, batch=2, seq_len=128, lr=2e-3),
                       distill=DistillConfig(steps=steps, batch=2, seq_len=128, lr=5e-4))
    tokens = CalibrationData.builtin(tokenizer).tokens
    # which layers keep attention is measured on held-out calibration text: a tenth of it, or 512 tokens in --quick
    held = 512 if quick else len(tokens) // 10
    result = rewrite(model, config, tokens[:-held], eval_tokens=tokens[-held:], progress=False)
    hybrid = result.model
    for what, value in result.rows():
        print(f"{what:22s} {value}")

    text = torch.tensor(tokenizer(load_eval_text("prose"))["input_ids"])
    with torch.no_grad():
        before = perplexity(lambda ids: model(ids).logits, text, 128, 64, limit=8, progress=False).ppl
        after = perplexity(lambda ids: hybrid(ids).logits, text, 128, 64, limit=8, progress=False).ppl
    print(f"evaluation prose perplexity: original {before:.2f}, {len(result.layers)} of {layers} layers as SSM "
          f"{after:.2f} ({100 * (after / before - 1):+.1f}%)")

    gm = compile_generation(hybrid, "cpu", cache_len=96, prefill_chunk=32, draft_len=None)
    names = [s.name for s in gm.decode.inputs[2:]]
    print(f"decode step state inputs: {sum(n.startswith('ssm_state') for n in names)} SSM states, "
          f"{sum(n.startswith('k_cache') for n in names)} KV caches")
    prompt = torch.tensor([tokenizer("def fibonacci(n):\n    ")["input_ids"]])
    out = gm.generate(prompt, 24)
    ids = prompt
    with torch.no_grad():  # the reference: the rewritten model's full forward, greedy
        for _ in range(24):
            ids = torch.cat([ids, hybrid(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    same = torch.equal(out, ids)
    print(tokenizer.decode(out[0]))
    print(f"generation identical to the full forward: {same}")
    ok = same and after < 3 * before
    print("RESULT ok" if ok else "RESULT FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
