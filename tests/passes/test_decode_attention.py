"""DecodeAttention: masks computed from cache positions become flashc.decode_attention, others stay."""

import torch
from flashc_testing import rel_err

import flashc
from flashc.ir import op_name
from flashc.ops import decode_mask


class CacheAttention(torch.nn.Module):
    """Attention of one new query over a cache, with the mask spelled by `mask_fn`."""

    def __init__(self, mask_fn):
        super().__init__()
        self.mask_fn = mask_fn

    def forward(self, q, k, v, pos):
        mask = self.mask_fn(pos, k.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)


def _ops(cm):
    return [op_name(n) for n in cm.program.op_nodes()]


def _inputs(s=1, length=12):
    q, k, v = torch.randn(2, 4, s, 8), torch.randn(2, 4, length, 8), torch.randn(2, 4, length, 8)
    return q, k, v, torch.arange(s) + (length - s - 3)


def test_position_mask_becomes_decode_attention():
    # the same mask written differently from flashc.ops.decode_mask: arange < pos + 1
    def spelled(pos, length):
        return (torch.arange(length) < (pos + 1)[:, None])[None, None]

    for fn in (lambda p, n: decode_mask(p, n)[None, None], spelled):
        example = _inputs()
        cm = flashc.compile(CacheAttention(fn), "cpu", example, level=2)
        assert "flashc.decode_attention" in _ops(cm) and "flashc.attention" not in _ops(cm)
        for pos in (0, 5, 11):
            q, k, v, _ = _inputs()
            p = torch.tensor([pos])
            ref = CacheAttention(fn)(q.double(), k.double(), v.double(), p)
            assert rel_err(cm(q, k, v, p), ref) < 1e-5


def _additive(visible, dtype=torch.float32):
    """A boolean mask as transformers' eager_mask makes it additive: 0 where visible, the dtype's min elsewhere."""
    return torch.where(visible, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)


def test_additive_position_mask_becomes_decode_attention():
    def additive(pos, length):
        return _additive(decode_mask(pos, length))[None, None]

    def minus_inf(pos, length):  # the -inf spelling of the same mask
        return torch.zeros(length).masked_fill(torch.arange(length) > pos[:, None], float("-inf"))[None, None]

    for fn in (additive, minus_inf):
        cm = flashc.compile(CacheAttention(fn), "cpu", _inputs(), level=2)
        assert _ops(cm).count("flashc.decode_attention") == 1 and "flashc.attention" not in _ops(cm)
        for pos in (0, 5, 11):
            q, k, v, _ = _inputs()
            p = torch.tensor([pos])
            # in fp32: torch's SDPA misreads an fp32 mask given with fp64 q, k, v
            assert rel_err(cm(q, k, v, p), CacheAttention(fn)(q, k, v, p)) < 1e-5


def test_other_additive_masks_stay_attention():
    def boolean_added(pos, length):  # a boolean mask cast to 0/1 and added: hides nothing
        return decode_mask(pos, length).float()[None, None]

    def shallow(pos, length):  # -1 where hidden only damps the hidden keys, it does not hide them
        return _additive(decode_mask(pos, length)).clamp(min=-1.0)[None, None]

    def shifted(pos, length):  # off by one, additive
        return _additive(torch.arange(length) <= (pos + 1)[:, None])[None, None]

    for fn in (boolean_added, shallow, shifted):
        cm = flashc.compile(CacheAttention(fn), "cpu", _inputs(), level=2)
        assert "flashc.decode_attention" not in _ops(cm) and _ops(cm).count("flashc.attention") == 1
        q, k, v, _ = _inputs()
        p = torch.tensor([6])
        assert rel_err(cm(q, k, v, p), CacheAttention(fn)(q, k, v, p)) < 1e-5


def test_other_masks_stay_attention():
    def shifted(pos, length):  # off by one: sees the key after the query too
        return (torch.arange(length) <= (pos + 1)[:, None])[None, None]

    def window(pos, length):  # a sliding window of 4 keys is not the full-cache mask
        j = torch.arange(length)
        return ((j <= pos[:, None]) & (j > pos[:, None] - 4))[None, None]

    for fn in (shifted, window):
        cm = flashc.compile(CacheAttention(fn), "cpu", _inputs(), level=2)
        assert "flashc.decode_attention" not in _ops(cm) and "flashc.attention" in _ops(cm)
        q, k, v, _ = _inputs()
        p = torch.tensor([6])
        assert rel_err(cm(q, k, v, p), CacheAttention(fn)(q, k, v, p)) < 1e-5
