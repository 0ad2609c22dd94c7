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
