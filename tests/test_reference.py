"""The eager reference itself against independent implementations: timm (roll, then pad) and a literal
transcription of the official EsViT block (pad, then roll)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, get_relative_position_index

from esvit_kernels import reference as R


@pytest.mark.parametrize("ws", [(7, 7), (3, 5), (1, 1), (14, 14)])
def test_relative_position_index_matches_timm(ws):
    assert torch.equal(R.relative_position_index(ws), get_relative_position_index(*ws))


def _timm_block(dim, res, heads, ws, shift):
    blk = SwinTransformerBlock(dim, res, num_heads=heads, window_size=ws, shift_size=shift).eval()
    with torch.no_grad():
        blk.attn.qkv.bias.normal_()
        blk.attn.relative_position_bias_table.normal_()
    return blk


@pytest.mark.parametrize(
    "res,ws,shift",
    [((14, 14), 7, 3), ((10, 13), 4, 2), ((5, 9), (3, 4), (1, 2)), ((7, 7), 7, 0), ((6, 11), 5, 2)],
)
def test_shifted_reference_matches_timm(res, ws, shift):
    blk = _timm_block(32, res, 2, ws, shift)
    x = torch.randn(2, *res, 32)
    ref = blk._attn(x)
    qkv = blk.attn.qkv(x)
    out = R.shifted_window_attention(
        qkv, 2, blk.window_size, blk.shift_size, blk.attn.relative_position_bias_table, blk.attn.scale,
        blk.attn.qkv.bias, roll_before_pad=True,
    )
    torch.testing.assert_close(blk.attn.proj(out), ref, rtol=1e-5, atol=1e-5)
    if blk.attn_mask is not None:
        hp = -(-res[0] // blk.window_size[0]) * blk.window_size[0]
        wp = -(-res[1] // blk.window_size[1]) * blk.window_size[1]
        assert torch.equal(R.shift_mask((hp, wp), blk.window_size, blk.shift_size), blk.attn_mask)


def _official_esvit_attn(x, qkv_lin, table, heads, w, s):
    """Literal transcription of the official EsViT SwinTransformerBlock attention path (square window)."""
    b, h, wd, c = x.shape
    pad_r, pad_b = (w - wd % w) % w, (w - h % w) % w
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, hp, wp, _ = x.shape
    if s > 0:
        shifted = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        img_mask = torch.zeros((1, hp, wp, 1))
        cnt = 0
        for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            for ws_ in (slice(0, -w), slice(-w, -s), slice(-s, None)):
                img_mask[:, hs, ws_, :] = cnt
                cnt += 1
        mw = img_mask.view(1, hp // w, w, wp // w, w, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w)
        mask = mw.unsqueeze(1) - mw.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    else:
        shifted, mask = x, None
    xw = shifted.view(b, hp // w, w, wp // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
    bw, n, _ = xw.shape
    qkv = qkv_lin(xw).reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (c // heads) ** -0.5
    attn = q @ k.transpose(-2, -1)
    idx = get_relative_position_index(w, w)
    attn = attn + table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.view(bw // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
    out = out.view(b, hp // w, wp // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    if s > 0:
        out = torch.roll(out, shifts=(s, s), dims=(1, 2))
    return out[:, :h, :wd]


@pytest.mark.parametrize("res,w,s", [((14, 14), 7, 3), ((12, 10), 7, 3), ((3, 3), 7, 0), ((6, 6), 7, 3)])
def test_shifted_reference_matches_official_esvit(res, w, s):
    c, heads = 24, 3
    lin = torch.nn.Linear(c, 3 * c)
    torch.nn.init.normal_(lin.bias)
    table = torch.randn((2 * w - 1) ** 2, heads)
    x = torch.randn(2, *res, c)
    ref = _official_esvit_attn(x, lin, table, heads, w, s)
    out = R.shifted_window_attention(lin(x), heads, (w, w), (s, s), table, None, lin.bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_region_match_ties_lowest_index():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = torch.tensor([[[0.0, 2.0], [3.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # duplicates after normalising
    assert R.region_match(s, t).tolist() == [[1, 0]]


def test_region_match_nan_wins_lowest_index_in_range():
    """A NaN similarity wins as in torch.max (the matching used to return the out-of-range index Tt)."""
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [float("nan"), 1.0]]])
    t = torch.tensor([[[0.0, 2.0], [1.0, float("nan")], [3.0, 0.0], [float("nan"), 0.0]]])
    assert R.region_match(s, t).tolist() == [[1, 1, 0]]


def test_dino_loss_pairs_and_region_loss_definition():
    torch.manual_seed(0)
    s, t, c = torch.randn(4, 3, 10), torch.randn(2, 3, 10), torch.randn(10)
    loss = R.dino_loss(s, t, c, 0.1, 0.04)
    pt = torch.softmax((t - c) / 0.04, -1)
    ls = torch.log_softmax(s / 0.1, -1)
    pairs = [(i, v) for i in range(2) for v in range(4) if v != i]
    want = sum(-(pt[i] * ls[v]).sum(-1).mean() for i, v in pairs) / len(pairs)
    torch.testing.assert_close(loss, want)
