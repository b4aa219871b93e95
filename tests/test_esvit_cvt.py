"""EsViT's windowed CvT (cvt_v4) on the fused window attention: the official forward's semantics, the
triton backend against torch, the presets and the backbone contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esvit.models import MultiCropWrapper, create_backbone, min_crop_size, set_backend
from esvit.models.cvt import CvTAttention, CvTBlock, CvTTransformer, cvt_window
from esvit.models.heads import DINOHead
from tests import esvit_helpers
from tests.conftest import requires_triton

one_thread = esvit_helpers.one_thread  # fixture
cache = esvit_helpers.cache  # fixture


def _perturb(model: nn.Module) -> nn.Module:
    """Random norm affines, biases, BatchNorm statistics and bias tables so nothing is trivially 1 / 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(mean=1.0 if name.endswith("weight") else 0.0, std=0.2)
            elif "rel_pos_bias_table" in name:
                p.normal_(std=0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(std=0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _official_attention(attn: CvTAttention, x: torch.Tensor, shift: bool) -> torch.Tensor:
    """Eager transcription of the official cvt_v4 ``Attention.forward`` on a (B, H, W, C) map, channels-first
    as the official module runs: window w = min(window, H, W); zero-pad right/bottom; q, k, v = chunk(3) of
    dw-conv -> BN -> 1x1 conv of the padded map; windows; softmax(q k^T * C^-0.5 + bias) v; crop; 1x1 proj.
    ``shift`` adds what our ``shift`` option means (Swin's roll by -(w // 2) and the shift mask on each axis with
    more than one window; the official switch does not roll, see esvit/models/cvt.py)."""
    b, h, w, c = x.shape
    heads, ws = attn.num_heads, attn.window_size
    win = min(ws, h, w)
    pad_b, pad_r = (win - h % win) % win, (win - w % win) % win
    x = F.pad(x.permute(0, 3, 1, 2), (0, pad_r, 0, pad_b))
    hp, wp = x.shape[-2:]
    p = attn.qkv
    qkv = F.conv2d(p.bn(p.dw(x)), p.pw.weight[:, :, None, None], p.pw.bias)
    sh, sw = (win // 2 if shift and hp > win else 0), (win // 2 if shift and wp > win else 0)
    qkv = torch.roll(qkv, shifts=(-sh, -sw), dims=(2, 3))
    sx, sy = hp // win, wp // win

    def windows(t: torch.Tensor) -> torch.Tensor:  # b (heads d) (sx win) (sy win) -> (b sx sy) heads (win win) d
        t = t.reshape(b, heads, c // heads, sx, win, sy, win)
        return t.permute(0, 3, 5, 1, 4, 6, 2).reshape(b * sx * sy, heads, win * win, c // heads)

    q, k, v = (windows(t) for t in qkv.chunk(3, dim=1))
    dots = torch.einsum("bhid,bhjd->bhij", q, k) * c**-0.5
    if attn.rel_pos_bias_table is not None:  # offsets of a win-window, indexed into the window_size table
        coords = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        index = rel[..., 0] * (2 * ws - 1) + rel[..., 1]
        dots = dots + attn.rel_pos_bias_table[index.reshape(-1)].view(win * win, win * win, heads).permute(2, 0, 1)
    if sh or sw:
        label = torch.zeros(hp, wp)
        cnt = 0
        for hs in ((slice(0, -win), slice(-win, -sh), slice(-sh, None)) if sh else (slice(None),)):
            for wsl in ((slice(0, -win), slice(-win, -sw), slice(-sw, None)) if sw else (slice(None),)):
                label[hs, wsl] = cnt
                cnt += 1
        lw = label.view(sx, win, sy, win).permute(0, 2, 1, 3).reshape(sx * sy, win * win)
        mask = torch.where(lw[:, None, :] != lw[:, :, None], -100.0, 0.0)
        dots = (dots.view(b, sx * sy, heads, win * win, win * win) + mask[None, :, None]).flatten(0, 1)
    out = torch.einsum("bhij,bhjd->bhid", dots.softmax(-1), v)
    out = out.reshape(b, sx, sy, heads, win, win, c // heads).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, c, hp, wp)
    out = torch.roll(out, shifts=(sh, sw), dims=(2, 3))[:, :, :h, :w]
    return F.conv2d(out, attn.proj.weight[:, :, None, None], attn.proj.bias).permute(0, 2, 3, 1)


@pytest.mark.parametrize("hw,window,shift,rpe", [
    ((16, 16), 7, 0, False),   # 64-px cvt_micro stage 1: padded to 21, 3 x 3 windows
    ((10, 10), 7, 0, False),   # 40 px: padded to 14
    ((5, 5), 7, 0, True),      # map < window: one 5 x 5 window, bias sub-table
    ((6, 10), 7, 0, False),    # non-square: w = 6, W padded to 12
    ((6, 10), 7, 3, True),     # shifted along W only (one window along H)
    ((12, 12), 7, 3, True),    # 96-px crop's stage 2: padded 14, shifted
    ((24, 24), 7, 3, False),
    ((8, 8), 4, 2, True),
    ((3, 3), 7, 0, True),      # 96-px crop's last stage
])
@pytest.mark.parametrize("train", [False, True])
def test_attention_matches_official_semantics(hw, window, shift, rpe, train):
    """Values, input gradient and every parameter gradient (BatchNorm in train mode: statistics of the padded
    map, as the official module computes them)."""
    attn = _perturb(CvTAttention(32, 2, window, shift=shift > 0, rel_pos_embed=rpe, backend="torch")).train(train)
    ref = CvTAttention(32, 2, window, shift=shift > 0, rel_pos_embed=rpe, backend="torch").train(train)
    ref.load_state_dict(attn.state_dict())
    x = torch.randn(2, *hw, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = attn(x1), _official_attention(ref, x2, shift > 0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(attn.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_windows_per_map_size():
    # (window, Hp, Wp) the official forward uses: 224 px -> 56, 28, 14, 7; 96 px -> 24, 12, 6, 3
    assert [cvt_window(n, n, 7) for n in (56, 28, 14, 7)] == [(7, 56, 56), (7, 28, 28), (7, 14, 14), (7, 7, 7)]
    assert [cvt_window(n, n, 7) for n in (24, 12, 6, 3)] == [(7, 28, 28), (7, 14, 14), (6, 6, 6), (3, 3, 3)]
    assert cvt_window(6, 10, 7) == (6, 6, 12)


def test_s1_preset_matches_table_8():
    """cvt_v4_s1: 29.30 M parameters without a classifier (Table 8: 29 M); the rpe variant adds 12 tables."""
    m = create_backbone("cvt_v4_s1")
    assert sum(p.numel() for p in m.parameters()) == 29_303_616
    assert m.num_features == 768 and m.depths == (2, 2, 6, 2)
    assert [s.embed.proj.kernel_size + s.embed.proj.stride + s.embed.proj.padding for s in m.stages] == [
        (7, 7, 4, 4, 2, 2), (3, 3, 2, 2, 1, 1), (3, 3, 2, 2, 1, 1), (3, 3, 2, 2, 1, 1)]
    assert [(b.attn.dim, b.attn.num_heads) for s in m.stages for b in s.blocks][::2] == [
        (64, 1), (192, 3), (384, 6), (384, 6), (384, 6), (768, 12)]
    rpe = create_backbone("cvt_v4_s1_rpe_shift")
    extra = sum(13 * 13 * b.attn.num_heads for s in rpe.stages for b in s.blocks)
    assert sum(p.numel() for p in rpe.parameters()) == 29_303_616 + extra
    assert [b.attn.shift for b in rpe.stages[2].blocks] == [False, True] * 3


def test_micro_preset_contract():
    m = create_backbone("cvt_micro", img_size=64, drop_path_rate=0.0, backend="torch").eval()
    assert 2e5 < sum(p.numel() for p in m.parameters()) < 2e6 and m.num_features == 128
    with torch.no_grad():
        for size, tokens in ((64, 16), (40, 9), (32, 4), (3, 1)):
            v, r = m(torch.randn(2, 3, size, size))
            assert v.shape == (2, 128) and r.shape == (2, tokens, 128)
            torch.testing.assert_close(v, r.mean(1))
        x = torch.randn(2, 3, 64, 64)
        feats = m.forward_return_n_last_blocks(x, n=3)  # stage 2's last block (no norm), stage 3's two (norm)
        blocks = []
        h = x
        for i, stage in enumerate(m.stages):
            h = stage.embed(h if i == 0 else h.permute(0, 3, 1, 2))
            for blk in stage.blocks:
                h = blk(h)
                blocks.append(m.norm(h) if i == 2 else h)
        want = torch.cat([t.mean(dim=(1, 2)) for t in blocks[-3:]], dim=-1)
        assert feats.shape == (2, 64 + 2 * 128)
        torch.testing.assert_close(feats, want)
    assert min_crop_size("cvt_micro") == min_crop_size("cvt_v4_s1") == 3


def test_bad_input_errors():
    m = create_backbone("cvt_micro", backend="torch")
    with pytest.raises(ValueError, match="smaller than the 3 px"):
        m(torch.randn(1, 3, 2, 8))
    with pytest.raises(ValueError, match=r"images \(B, C, H, W\)"):
        m(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="n must be in"):
        m.forward_return_n_last_blocks(torch.randn(1, 3, 32, 32), n=7)
    with pytest.raises(ValueError, match="one entry per stage"):
        CvTTransformer(embed_dims=(32, 64), depths=(1,), num_heads=(1, 2), patch_sizes=(7, 3),
                       patch_strides=(4, 2), patch_paddings=(2, 1))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        CvTAttention(30, 4, 7)
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        create_backbone("cvt_micro", window_size=0)
    with pytest.raises(ValueError, match=r"\(B, H, W, 32\) map"):
        CvTAttention(32, 2, 7)(torch.randn(1, 4, 4, 16))
    with pytest.raises(TypeError):
        create_backbone("cvt_micro", embed_dim=32)  # a Swin field, not a CvT one


def test_checkpointing_and_drop_path():
    a = create_backbone("cvt_micro", drop_path_rate=0.0, backend="torch")
    b = create_backbone("cvt_micro", drop_path_rate=0.0, backend="torch", use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 40, 40)
    for m in (a, b):
        v, r = m(x)
        (v.square().sum() + r.sum()).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
    rates = [blk.drop_path.p for s in create_backbone("cvt_v4_s1").stages for blk in s.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)


def test_set_backend_switches_every_block_and_wrapper_runs():
    m = create_backbone("cvt_micro", backend="triton")
    set_backend(m, "torch")
    attns = [mod for mod in m.modules() if isinstance(mod, CvTAttention)]
    assert len(attns) == 6 and {a.backend for a in attns} == {"torch"}
    wrap = MultiCropWrapper(m, DINOHead(128, 32, hidden_dim=16, bottleneck_dim=8),
                            DINOHead(128, 32, hidden_dim=16, bottleneck_dim=8))
    out = wrap([torch.randn(2, 3, 64, 64)] * 2 + [torch.randn(2, 3, 32, 32)] * 3)
    assert [t.shape for t in out.region_feats] == [(2, 2, 16, 128), (3, 2, 4, 128)]


@requires_triton
@pytest.mark.parametrize("size,variant", [(64, {}), (40, {}), (32, {}), (40, {"shift": True, "rel_pos_embed": True})])
def test_micro_triton_matches_torch(size, variant):
    """The fused (interpreted) backend gives the torch backend's values and every gradient, train mode
    (BatchNorm batch statistics) at the global 64 px and the 40 / 32-px crops (padding, maps < window)."""
    ref = _perturb(create_backbone("cvt_micro", drop_path_rate=0.0, backend="torch", **variant))
    fused = create_backbone("cvt_micro", drop_path_rate=0.0, backend="triton", **variant)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, size, size)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (v1, r1), (v2, r2) = fused(x1), ref(x2)
    torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r1, r2, rtol=1e-4, atol=1e-5)
    gv, gr = torch.randn_like(v2), torch.randn_like(r2)
    ((v1 * gv).sum() + (r1 * gr).sum()).backward()
    ((v2 * gv).sum() + (r2 * gr).sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max().clamp_min(1e-6)
        assert ((p.grad - q.grad).abs().max() / scale).item() < 1e-4, name


def test_block_is_pre_norm_residual():
    blk = _perturb(CvTBlock(32, 2, 7, 4.0, 0.0, shift=False, rel_pos_embed=False, backend="torch")).eval()
    x = torch.randn(2, 9, 9, 32)
    with torch.no_grad():
        y = x + blk.attn(blk.norm1(x))
        h = blk.mlp[0](blk.norm2(y))
        want = y + blk.mlp[2](h * torch.sigmoid(1.702 * h))  # QuickGELU
        torch.testing.assert_close(blk(x), want)
    assert blk.norm1.eps == blk.norm2.eps == 1e-5


def test_pretrain_then_evaluate_cvt_micro(tmp_path, cache, capsys):
    """`esvit pretrain --arch cvt_micro` writes a checkpoint whose teacher rebuilds as a CvT; k-NN and the
    linear probe (n last blocks) run on it."""
    from esvit.checkpoint import load_backbone
    from esvit.cli import main
    from esvit.data import make_dataset

    out = tmp_path / "run"
    assert main(esvit_helpers.tiny_args(out, cache, "--arch", "cvt_micro", "--epochs", "1")) == 0
    model, cfg = load_backbone(out / "checkpoint.pth", backend="torch")
    assert isinstance(model, CvTTransformer) and cfg["model"]["arch"] == "cvt_micro"
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["teacher"][f"backbone.{k}"]), k
    data = tmp_path / "data"
    make_dataset(data, num_images=24, num_classes=3, val_fraction=0.25, image_size=32)
    common = ["--checkpoint", str(out / "checkpoint.pth"), "--train-data", str(data), "--val-data", str(data),
              "--num-workers", "0"]
    assert main(["eval-knn", *common, "--k", "3"]) == 0
    assert main(["eval-linear", *common, "--epochs", "2", "--n-last-blocks", "2"]) == 0
    text = capsys.readouterr().out
    assert "cvt_micro at 32 px" in text and "best: top-1" in text


def test_presets_build_the_table_8_cvt():
    from esvit.config import load_config, validate
    from esvit.train import build_backbone

    vr = validate(load_config(esvit_helpers.REPO / "configs" / "cvt_v4_s1.yaml"))
    v = validate(load_config(esvit_helpers.REPO / "configs" / "cvt_v4_s1_v.yaml"))
    assert (vr["loss"]["region_weight"], v["loss"]["region_weight"], v["loss"]["view_weight"]) == (0.5, 0.0, 1.0)
    student, teacher = build_backbone(vr), build_backbone(vr, teacher=True)
    assert isinstance(student, CvTTransformer) and student.window_size == 7
    assert sum(p.numel() for p in student.parameters()) == 29_303_616
    assert max(b.drop_path.p for s in teacher.stages for b in s.blocks) == 0.0


def test_official_checkpoint_keys_convert():
    """An official EsViT CvT checkpoint (names of models/cvt_v4_transformer.py, 1x1 convolutions, module./
    backbone. prefixes, projection heads, derived rel_pos_idx) loads strictly, every tensor where it belongs."""
    from esvit.models.cvt import convert_cvt_state_dict

    model = create_backbone("cvt_micro", rel_pos_embed=True, backend="torch")
    dims, mapping = (32, 64, 128), {}
    for i, c in enumerate(dims):
        k, cin = (7, 3) if i == 0 else (3, dims[i - 1])
        mapping[f"stage{i}.0.proj.weight"] = (f"stages.{i}.embed.proj.weight", (c, cin, k, k))
        for p in ("proj.bias", "norm.weight", "norm.bias"):
            mapping[f"stage{i}.0.{p}"] = (f"stages.{i}.embed.{p}", (c,))
        for j in range(2):
            o, n = f"stage{i}.1.layers.{j}", f"stages.{i}.blocks.{j}"
            mapping.update({
                f"{o}.0.norm.weight": (f"{n}.norm1.weight", (c,)), f"{o}.0.norm.bias": (f"{n}.norm1.bias", (c,)),
                f"{o}.0.fn.qkv.dw.weight": (f"{n}.attn.qkv.dw.weight", (c, 1, 3, 3)),
                f"{o}.0.fn.qkv.bn.weight": (f"{n}.attn.qkv.bn.weight", (c,)),
                f"{o}.0.fn.qkv.bn.bias": (f"{n}.attn.qkv.bn.bias", (c,)),
                f"{o}.0.fn.qkv.bn.running_mean": (f"{n}.attn.qkv.bn.running_mean", (c,)),
                f"{o}.0.fn.qkv.bn.running_var": (f"{n}.attn.qkv.bn.running_var", (c,)),
                f"{o}.0.fn.qkv.pw.weight": (f"{n}.attn.qkv.pw.weight", (3 * c, c, 1, 1)),
                f"{o}.0.fn.qkv.pw.bias": (f"{n}.attn.qkv.pw.bias", (3 * c,)),
                f"{o}.0.fn.proj_out.weight": (f"{n}.attn.proj.weight", (c, c, 1, 1)),
                f"{o}.0.fn.proj_out.bias": (f"{n}.attn.proj.bias", (c,)),
                f"{o}.0.fn.rel_pos_bias_table": (f"{n}.attn.rel_pos_bias_table", (169, c // 32)),
                f"{o}.1.norm.weight": (f"{n}.norm2.weight", (c,)), f"{o}.1.norm.bias": (f"{n}.norm2.bias", (c,)),
                f"{o}.1.fn.net.0.weight": (f"{n}.mlp.0.weight", (4 * c, c, 1, 1)),
                f"{o}.1.fn.net.0.bias": (f"{n}.mlp.0.bias", (4 * c,)),
                f"{o}.1.fn.net.2.weight": (f"{n}.mlp.2.weight", (c, 4 * c, 1, 1)),
                f"{o}.1.fn.net.2.bias": (f"{n}.mlp.2.bias", (c,)),
            })
    mapping["norm.weight"], mapping["norm.bias"] = ("norm.weight", (128,)), ("norm.bias", (128,))
    official = {k: torch.randn(shape) for k, (_, shape) in mapping.items()}
    official.update({k.replace("running_mean", "num_batches_tracked"): torch.tensor(7)
                     for k in official if k.endswith("running_mean")})
    ckpt = {"teacher": {f"module.backbone.{k}": v for k, v in official.items()} | {
        "module.backbone.stage0.1.layers.0.0.fn.rel_pos_idx": torch.zeros(49, 49, dtype=torch.long),
        "module.head.mlp.0.weight": torch.ones(4, 4), "module.head_dense.last_layer.weight_g": torch.ones(4, 1)}}
    model.load_state_dict(convert_cvt_state_dict(ckpt), strict=True)
    state = model.state_dict()
    for k, (ours, _) in mapping.items():
        assert torch.equal(state[ours], official[k].reshape(state[ours].shape)), k
    assert int(state["stages.2.blocks.1.attn.qkv.bn.num_batches_tracked"]) == 7
