"""EsViT backbones against DESIGN.md section 2, timm, and a literal transcription of the official block."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esvit.models import (
    DINOHead,
    MultiCropWrapper,
    SwinTransformer,
    convert_swin_state_dict,
    create_backbone,
    load_swin_weights,
    set_backend,
)
from esvit.models.swin import PatchMerging, SwinBlock
from esvit_kernels.nn import WindowAttention
from tests import esvit_helpers

one_thread = esvit_helpers.one_thread  # fixture


def _perturb(model: nn.Module) -> nn.Module:
    """Random LayerNorm affine and biases so that nothing is trivially 1 / 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.2)
    return model


@pytest.mark.parametrize("name,window,expected", [
    ("swin_tiny", 7, [(7, 3), (7, 3), (7, 3), (7, 0)]),
    ("swin_tiny", 14, [(14, 7), (14, 7), (14, 0), (7, 0)]),
    ("swin_base", 14, [(14, 7), (14, 7), (14, 0), (7, 0)]),
])
def test_stage_windows_fixed_from_img_size(name, window, expected):
    m = create_backbone(name, window_size=window, embed_dim=32, num_heads=(1, 1, 1, 1), depths=(2, 2, 2, 2))
    assert m.stage_windows == expected
    for stage, (w, s) in zip(m.layers, expected):
        assert [(b.window_size, b.shift_size) for b in stage.blocks] == [(w, 0), (w, s)]
        assert all(b.attn.window_size == (w, w) for b in stage.blocks)


def test_micro_preset_windows_and_size():
    m = create_backbone("swin_micro", window_size=4, img_size=64)
    assert m.stage_windows == [(4, 2), (4, 2), (4, 0)]
    n = sum(p.numel() for p in m.parameters())
    assert 2e5 < n < 5e6
    v, r = m(torch.randn(2, 3, 64, 64))
    assert v.shape == (2, 128) and r.shape == (2, 16, 128)
    v, r = m(torch.randn(2, 3, 32, 32))  # local crop: 8 -> 4 -> 2x2 map padded into one 4x4 window
    assert r.shape == (2, 4, 128)


def test_conv_stem_preset():
    """swin_micro_conv: the same blocks as swin_micro behind a conv stem with the patch embedding's token grid;
    every sample independent of its batch (GroupNorm, not BatchNorm)."""
    from esvit.models.swin import ConvStem

    torch.manual_seed(0)
    m = create_backbone("swin_micro_conv", window_size=4, img_size=64, drop_path_rate=0.0, backend="torch").eval()
    patch = create_backbone("swin_micro", window_size=4, img_size=64)
    assert isinstance(m.patch_embed, ConvStem) and m.stage_windows == patch.stage_windows
    blocks = {k: v.shape for k, v in m.state_dict().items() if not k.startswith("patch_embed.")}
    assert blocks == {k: v.shape for k, v in patch.state_dict().items() if not k.startswith("patch_embed.")}
    x = torch.randn(3, 3, 64, 64)
    v, r = m(x)
    assert v.shape == (3, 128) and r.shape == (3, 16, 128)
    torch.testing.assert_close(m(x[1:2])[1], r[1:2], rtol=1e-5, atol=1e-5)  # batch-independent
    assert m(torch.randn(2, 3, 32, 32))[1].shape == (2, 4, 128)  # local crop
    v.sum().backward()
    assert all(p.grad is not None for p in m.patch_embed.parameters())
    with pytest.raises(ValueError, match="stem must be"):
        SwinTransformer(img_size=64, stem="resnet")
    with pytest.raises(ValueError, match="conv stem downsamples by 4"):
        SwinTransformer(img_size=64, patch_size=8, stem="conv")


@pytest.mark.parametrize("name,timm_name", [("swin_tiny", "swin_tiny_patch4_window7_224"),
                                            ("swin_base", "swin_base_patch4_window7_224"),
                                            ("deit_small", "vit_small_patch16_224"),
                                            ("vit_base", "vit_base_patch16_224")])
def test_parameter_count_matches_timm(name, timm_name):
    import timm

    ours = create_backbone(name)
    ref = timm.create_model(timm_name, pretrained=False, num_classes=0)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_region_tokens_per_crop_and_n_last_blocks():
    m = create_backbone("swin_tiny").eval()
    with torch.no_grad():
        v224, r224 = m(torch.randn(1, 3, 224, 224))
        v96, r96 = m(torch.randn(1, 3, 96, 96))
        x = torch.randn(2, 3, 64, 64)
        feats = m.forward_return_n_last_blocks(x, n=4)
        view, _ = m(x)
    assert r224.shape == (1, 49, 768) and r96.shape == (1, 9, 768) and v224.shape == (1, 768)
    assert torch.allclose(v224, r224.mean(1))
    assert feats.shape == (2, 2304)  # 2 x 384 (stage 3, un-normed) + 2 x 768 (stage 4, final norm)
    torch.testing.assert_close(feats[:, -768:], view)


def test_layernorm_eps_and_drop_path_schedule():
    m = create_backbone("swin_tiny")
    assert all(mod.eps == 1e-6 for mod in m.modules() if isinstance(mod, nn.LayerNorm))
    rates = [b.drop_path.p for stage in m.layers for b in stage.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.1, 12), atol=1e-7)
    assert max(b.drop_path.p for s in create_backbone("swin_small").layers for b in s.blocks) == pytest.approx(0.2)
    teacher = create_backbone("swin_tiny", drop_path_rate=0.0)
    assert all(b.drop_path.p == 0 for s in teacher.layers for b in s.blocks)
    vit = create_backbone("deit_small")
    assert all(mod.eps == 1e-6 for mod in vit.modules() if isinstance(mod, nn.LayerNorm))


def test_swin_tiny_matches_timm_with_converted_weights():
    """timm's Swin (downsample at the start of the next stage) loaded through the key conversion."""
    import timm

    ref = _perturb(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0)).eval()
    ours = create_backbone("swin_tiny", norm_eps=1e-5, backend="torch").eval()  # timm uses LayerNorm eps 1e-5
    load_swin_weights(ours, ref.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = ref.forward_features(x)  # (B, 7, 7, C) after the final norm
        view, regions = ours(x)
    torch.testing.assert_close(regions, want.reshape(2, 49, -1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(view, ref.forward_head(want), rtol=1e-4, atol=1e-4)


def test_stage_window_uses_the_official_floor_resolution():
    """Official EsViT sizes stage i as (img/4) // 2**i at construction: at 112 px stage 4 gets window 3 while
    the map that reaches it (7x7 padded to even, merged) is 4x4 -- padded to 6x6 for the 3x3 windows. (timm
    rounds up and would use window 4; at 224 and 96 px both agree, see the test above.)"""
    m = SwinTransformer(img_size=112, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
                        backend="torch").eval()
    assert m.stage_windows == [(7, 3), (7, 3), (7, 0), (3, 0)]
    with torch.no_grad():
        regions, hw = m.forward_features(torch.randn(1, 3, 112, 112))
    assert hw == (4, 4) and regions.shape == (1, 16, 256)


def test_small_timm_swin_matches():
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    ref = _perturb(TimmSwin(img_size=56, embed_dim=32, depths=(2, 2), num_heads=(1, 2), window_size=7,
                            num_classes=0)).eval()
    ours = SwinTransformer(img_size=56, embed_dim=32, depths=(2, 2), num_heads=(1, 2), window_size=7,
                           norm_eps=1e-5, backend="torch").eval()
    load_swin_weights(ours, ref.state_dict())
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[1], ref.forward_features(x).reshape(2, 49, -1), rtol=1e-4, atol=1e-4)


def test_patch_merging_order_matches_timm_and_official():
    from timm.models.swin_transformer import PatchMerging as TimmMerging

    ref = TimmMerging(16, norm_layer=nn.LayerNorm)
    ours = PatchMerging(16, norm_eps=1e-5)
    ours.load_state_dict(ref.state_dict())
    for h, w in ((8, 8), (7, 5)):
        x = torch.randn(2, h, w, 16)
        got, hw = ours(x.reshape(2, h * w, 16), (h, w))
        assert hw == ((h + 1) // 2, (w + 1) // 2)
        torch.testing.assert_close(got, ref(x).reshape(2, -1, 32))
        # official: cat(x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]) after padding to even
        xp = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        cat = torch.cat([xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]], -1)
        torch.testing.assert_close(got, ours.reduction(ours.norm(cat.reshape(2, -1, 64))))


def _official_block(blk: SwinBlock, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Literal transcription of the official EsViT SwinTransformerBlock.forward (mask from the crop's own H, W):
    LN1 -> zero-pad right/bottom -> roll(-s) -> partition -> attention (+bias, +mask) -> reverse -> roll(+s)
    -> crop -> residual; LN2 -> MLP -> residual."""
    ws, s = blk.window_size, blk.shift_size
    attn = blk.attn
    b, n, c = x.shape
    shortcut = x
    x = blk.norm1(x).view(b, h, w, c)
    pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = x.shape[1:3]
    mask = None
    if s > 0:
        x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        img_mask = torch.zeros((1, hp, wp, 1))
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
                img_mask[:, hs, wsl, :] = cnt
                cnt += 1
        mw = img_mask.view(1, hp // ws, ws, wp // ws, ws, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws)
        mask = (mw.unsqueeze(1) - mw.unsqueeze(2)).masked_fill(lambda_ne := (mw.unsqueeze(1) - mw.unsqueeze(2)) != 0,
                                                               -100.0).masked_fill(~lambda_ne, 0.0)
    win = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
    bw, nn_, _ = win.shape
    heads = attn.num_heads
    qkv = attn.qkv(win).reshape(bw, nn_, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1)
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    index = rel[..., 0] * (2 * ws - 1) + rel[..., 1]
    bias = attn.relative_position_bias_table[index.view(-1)].view(ws * ws, ws * ws, -1).permute(2, 0, 1)
    logits = logits + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.view(bw // nw, nw, heads, nn_, nn_) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, nn_, nn_)
    out = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(bw, nn_, c))
    x = out.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    if s > 0:
        x = torch.roll(x, shifts=(s, s), dims=(1, 2))
    x = x[:, :h, :w].reshape(b, h * w, c)
    x = shortcut + x
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("hw,ws,shift", [((24, 24), 7, 3), ((12, 12), 7, 3), ((3, 3), 7, 0), ((6, 6), 7, 3),
                                         ((8, 8), 4, 2), ((2, 2), 4, 0)])
def test_block_matches_official_on_padded_crops(hw, ws, shift):
    """Local-crop maps that are not a multiple of the window: padded tokens = qkv bias, unmasked, pad then roll."""
    blk = _perturb(SwinBlock(64, 2, ws, shift, 4.0, 0.0, 1e-6, "torch")).eval()
    x = torch.randn(2, hw[0] * hw[1], 64)
    with torch.no_grad():
        torch.testing.assert_close(blk(x, hw), _official_block(blk, x, *hw), rtol=1e-5, atol=1e-5)


def test_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = create_backbone("swin_micro", window_size=4, img_size=64, drop_path_rate=0.0, backend="torch")
    b = create_backbone("swin_micro", window_size=4, img_size=64, drop_path_rate=0.0, backend="torch",
                        use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for m in (a, b):
        v, r = m(x)
        (v.square().sum() + r.sum()).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_vit_and_resnet_contract():
    vit = create_backbone("deit_small").eval()
    with torch.no_grad():
        cls, tokens = vit(torch.randn(1, 3, 224, 224))
        _, local = vit(torch.randn(1, 3, 96, 96))  # position embeddings interpolated
        feats = vit.forward_return_n_last_blocks(torch.randn(1, 3, 224, 224), n=4)
    assert cls.shape == (1, 384) and tokens.shape == (1, 196, 384) and local.shape == (1, 36, 384)
    assert feats.shape == (1, 4 * 384)
    rn = create_backbone("resnet50").eval()
    with torch.no_grad():
        view, regions = rn(torch.randn(1, 3, 96, 96))
    assert rn.num_features == 2048 and view.shape == (1, 2048) and regions.shape == (1, 9, 2048)
    torch.testing.assert_close(view, regions.mean(1))
    with pytest.raises(ValueError, match="unknown architecture"):
        create_backbone("swin_huge")


def test_multicrop_wrapper_groups_by_resolution():
    torch.manual_seed(0)
    bb = create_backbone("swin_micro", window_size=4, img_size=64, drop_path_rate=0.0, backend="torch").eval()
    head = DINOHead(128, 64, hidden_dim=32, bottleneck_dim=16)
    rhead = DINOHead(128, 64, hidden_dim=32, bottleneck_dim=16)
    wrap = MultiCropWrapper(bb, head, rhead).eval()
    crops = [torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)] + [torch.randn(3, 3, 32, 32) for _ in range(3)]
    with torch.no_grad():
        out = wrap(crops)
        assert out.view_logits.shape == (5, 3, 64)
        assert [t.shape for t in out.region_logits] == [(2, 3, 16, 64), (3, 3, 4, 64)]
        assert [t.shape for t in out.region_feats] == [(2, 3, 16, 128), (3, 3, 4, 128)]
        assert out.tokens_per_crop == [16, 16, 4, 4, 4]
        for i, c in enumerate(crops):  # one crop at a time gives the same outputs
            v, r = bb(c)
            g, j = (0, i) if i < 2 else (1, i - 2)
            torch.testing.assert_close(out.view_logits[i], head(v), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.region_feats[g][j], r, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.region_logits[g][j], rhead(r), rtol=1e-5, atol=1e-5)


def test_official_checkpoint_keys_load_and_backend_switch():
    torch.manual_seed(0)
    src = _perturb(create_backbone("swin_micro", window_size=4, img_size=64))
    official = {f"module.backbone.{k}": v for k, v in src.state_dict().items()}
    official["module.backbone.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    official["module.head.last_layer.weight_g"] = torch.ones(8, 1)  # projection heads are dropped
    official["module.head_dense.mlp.0.weight"] = torch.ones(8, 8)
    ckpt = {"teacher": official, "student": {}, "epoch": 3}
    dst = load_swin_weights(create_backbone("swin_micro", window_size=4, img_size=64), ckpt)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert set(convert_swin_state_dict(ckpt)) == set(src.state_dict())
    set_backend(dst, "torch")
    assert all(m.backend == "torch" for m in dst.modules() if isinstance(m, WindowAttention))
