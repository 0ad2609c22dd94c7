"""Relax expressions for flashc's ops, mirroring the reference code in flashc/ops.py."""

from __future__ import annotations

from typing import Callable

import torch

from flashc.backends.tvm.common import _dtype, _shape, _tvm_dtype


class FlashcOps:
    """Relax expressions for flashc's ops, mirroring the reference code in flashc/ops.py."""

    def __init__(self, bb, relax) -> None:
        self.bb, self.R = bb, relax

    def emit(self, expr):
        return self.bb.emit(expr)

    def cast(self, x, dtype: str):
        return x if _dtype(x) == dtype else self.emit(self.R.op.astype(x, dtype))

    def const(self, value, dtype: str):
        return self.R.const(value, dtype)

    def promote(self, *xs) -> str:
        dt = [getattr(torch, _dtype(x)) for x in xs]
        out = dt[0]
        for d in dt[1:]:
            out = torch.promote_types(out, d)
        return _tvm_dtype(out)

    def _rms(self, x, eps: float):
        op = self.R.op
        xf = self.cast(x, "float32")
        ms = self.emit(op.mean(self.emit(op.multiply(xf, xf)), axis=[-1], keepdims=True))
        inv = self.emit(op.rsqrt(self.emit(op.add(ms, self.const(eps, "float32")))))
        return self.cast(self.emit(op.multiply(xf, inv)), _dtype(x))

    def rms_norm(self, x, weight, eps: float):
        out = self.promote(x, weight)
        return self.emit(self.R.op.multiply(self.cast(self._rms(x, eps), out), self.cast(weight, out)))

    def add_rms_norm(self, x, residual, weight, eps: float):
        sdt = self.promote(x, residual)
        s = self.emit(self.R.op.add(self.cast(x, sdt), self.cast(residual, sdt)))
        return self.rms_norm(s, weight, eps), s

    def rotary(self, x, cos, sin, interleaved: bool = False):
        op = self.R.op
        out = self.promote(x, cos)
        d = _shape(x)[-1]
        half = d // 2
        c = self.cast(self.emit(op.expand_dims(cos, 1)), out)
        s = self.cast(self.emit(op.expand_dims(sin, 1)), out)
        xo = self.cast(x, out)
        if interleaved:  # rotate_pairs: x as pairs [B, H, S, D/2, 2], (-odd, even), back to [B, H, S, D]
            pairs = self.emit(op.reshape(xo, [*_shape(x)[:-1], half, 2]))
            even = self.emit(op.strided_slice(pairs, axes=[4], begin=[0], end=[1]))
            odd = self.emit(op.strided_slice(pairs, axes=[4], begin=[1], end=[2]))
            swapped = self.emit(op.concat([self.emit(op.negative(odd)), even], axis=4))
            rotated = self.emit(op.reshape(swapped, _shape(x)))
        else:
            lo = self.emit(op.strided_slice(xo, axes=[3], begin=[0], end=[half]))
            hi = self.emit(op.strided_slice(xo, axes=[3], begin=[half], end=[d]))
            rotated = self.emit(op.concat([self.emit(op.negative(hi)), lo], axis=3))
        return self.emit(op.add(self.emit(op.multiply(xo, c)), self.emit(op.multiply(rotated, s))))

    def rotary_interleaved(self, x, cos, sin):
        return self.rotary(x, cos, sin, interleaved=True)

    def gated(self, act: Callable, gate, up):
        out = self.promote(gate, up)
        return self.emit(self.R.op.multiply(self.cast(self.emit(act(gate)), out), self.cast(up, out)))

    def swiglu(self, gate, up):
        return self.gated(self.R.op.nn.silu, gate, up)

    def geglu(self, gate, up, approximate: str):
        act = self.R.op.nn.gelu_tanh if approximate == "tanh" else self.R.op.nn.gelu
        return self.gated(act, gate, up)

    def attention(self, q, k, v, mask, is_causal: bool, scale: float, causal_offset: int | None = None):
        """softmax(q k^T * scale + mask) v with grouped-query heads as plain batched matmuls.

        GQA without repeating K/V: the G query heads sharing a KV head become rows, q
        [B, Hq, S, D] -> [B*Hkv, G*S, D] against k [B*Hkv, L, D], so every matmul has
        equal batch dims (no broadcast batch). The causal mask lets query i see keys
        j <= i + causal_offset: L - S (bottom-right, flashc.attention's convention)
        unless given (0 for SDPA's top-left alignment); it is an additive constant.
        """
        import numpy as np

        op = self.R.op
        b, hq, s, d = _shape(q)
        hkv, l = _shape(k)[1], _shape(k)[2]
        dv = _shape(v)[-1]
        g, n = hq // hkv, b * hkv
        q3 = self.emit(op.reshape(q, [n, g * s, d]))
        kt = self.emit(op.permute_dims(self.emit(op.reshape(k, [n, l, d])), [0, 2, 1]))  # [N, D, L]
        scores = self.emit(op.matmul(q3, kt, out_dtype="float32"))  # [N, G*S, L], accumulated in fp32
        scores = self.emit(op.multiply(scores, self.const(scale, "float32")))
        if mask is not None:
            if _dtype(mask) == "bool":
                # an additive bias, made on the mask's own (small) shape: a boolean operand
                # inside the fused scores/softmax kernel came out wrong on CUDA (2026-11-25)
                mask = self.emit(op.where(mask, self.const(0.0, "float32"), self.const(float("-inf"), "float32")))
            m = self.emit(op.reshape(self.emit(op.broadcast_to(mask, [b, hq, s, l])), [n, g * s, l]))
            scores = self.emit(op.add(scores, self.cast(m, "float32")))
        if is_causal:
            offset = l - s if causal_offset is None else causal_offset
            allowed = np.arange(l)[None, :] <= np.arange(s)[:, None] + offset
            bias = np.tile(np.where(allowed, 0.0, -np.inf).astype("float32"), (g, 1))  # [G*S, L]
            scores = self.emit(op.add(scores, self.R.const(bias, "float32")))
        probs = self.cast(self.emit(op.nn.softmax(scores, axis=-1)), _dtype(v))
        out = self.cast(self.emit(op.matmul(probs, self.emit(op.reshape(v, [n, l, dv])), out_dtype="float32")),
                        _dtype(v))  # [N, G*S, Dv]: a sum over L keys, accumulated in fp32
        return self.emit(op.reshape(out, [b, hq, s, dv]))

    def decode_attention(self, q, k_cache, v_cache, cache_position, scale: float):
        """flashc.decode_attention: `attention` with decode_mask (query s sees the keys j <= cache_position[s]);
        every cache slot is read (TVM has no kernel bounded by the live length)."""
        op = self.R.op
        keys = self.emit(op.arange(_shape(k_cache)[2], dtype="int64"))
        position = self.emit(op.astype(cache_position, "int64"))
        mask = self.emit(op.less_equal(op.expand_dims(keys, 0), op.expand_dims(position, 1)))  # [S, L]
        return self.attention(q, k_cache, v_cache, mask, False, scale)

    def moe(self, x, router_logits, gate_up_cols, down_rows, top_k: int, normalize: bool, threshold=None):
        """Top-k SwiGLU experts, DENSE formulation: every expert runs on every token; with a
        threshold (flashc.moe_sparse) each expert's intermediate is sparsified before down.

        Correct (unrouted pairs get weight 0) but costs E/top_k times the expert FLOPs
        of a routed kernel; fine for small expert counts, a known cost for large ones.
        Two plain GEMMs: x @ gate_up_cols [H, E*2F], then the activations, scaled by
        each token's routing weight for that expert (a scalar, so it commutes with the
        down projection), @ down_rows [E*F, H], which sums over experts.
        """
        import numpy as np

        op = self.R.op
        t, _ = _shape(x)
        e = _shape(router_logits)[-1]
        f = _shape(down_rows)[0] // e
        probs = self.emit(op.nn.softmax(self.cast(router_logits, "float32"), axis=-1))
        top = self.emit(op.topk(probs, top_k, axis=-1, ret_type="both", dtype="int32"))
        values = self.emit(self.R.TupleGetItem(top, 0))
        index = self.emit(self.R.TupleGetItem(top, 1))
        if normalize:
            values = self.emit(op.divide(values, self.emit(op.sum(values, axis=[-1], keepdims=True))))
        values = self.cast(values, _dtype(x))
        experts = self.R.const(np.arange(e, dtype="int32"), "int32")
        onehot = self.emit(op.equal(self.emit(op.expand_dims(index, -1)), experts))  # [T,k,E]
        dense = self.emit(op.sum(self.emit(op.multiply(self.cast(onehot, _dtype(x)),
                                                       self.emit(op.expand_dims(values, -1)))), axis=[1]))
        h = self.emit(op.reshape(self.emit(op.matmul(x, gate_up_cols)), [t, e, 2 * f]))
        gate = self.emit(op.strided_slice(h, axes=[2], begin=[0], end=[f]))
        up = self.emit(op.strided_slice(h, axes=[2], begin=[f], end=[2 * f]))
        act = self.swiglu(gate, up)  # [T, E, F]
        if threshold is not None:
            kept = self.emit(op.greater(self.emit(op.abs(act)), self.cast(threshold, _dtype(act))))
            act = self.emit(op.where(kept, act, self.const(0.0, _dtype(act))))
        act = self.emit(op.multiply(act, self.cast(self.emit(op.expand_dims(dense, -1)), _dtype(act))))
        out = self.emit(op.matmul(self.emit(op.reshape(act, [t, e * f])), down_rows))
        return self.cast(out, _dtype(x))

    def sparsify(self, x, threshold):
        """flashc.sparsify: x where |x| > threshold (0-d or per channel), else 0."""
        op = self.R.op
        kept = self.emit(op.greater(self.emit(op.abs(x)), self.cast(threshold, _dtype(x))))
        return self.emit(op.where(kept, x, self.const(0.0, _dtype(x))))

    def predicted_sparsify(self, h, x, a, b, threshold):
        """flashc.predicted_sparsify: h where the predictor's score (x @ a) @ b, in a's dtype, is above
        the threshold (0-d or per neuron), else 0."""
        op = self.R.op
        dt = _dtype(a)
        score = self.emit(op.matmul(self.emit(op.matmul(self.cast(x, dt), a)), self.cast(b, dt)))
        kept = self.emit(op.greater(score, self.cast(threshold, dt)))
        return self.emit(op.where(kept, h, self.const(0.0, _dtype(h))))
