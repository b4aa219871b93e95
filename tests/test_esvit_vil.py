"""ViL (Vision Longformer) backbones: presets and parameter counts, the attention module's wiring against a dense
brute-force oracle, MODE 1's seeded draws, local crops, fused-vs-eager backends, the backbone contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esvit.models import ARCHS, create_backbone, min_crop_size, set_backend
from esvit.models.vil import FullAttention, LongformerAttention, VisionLongformer, parse_vil_arch
from esvit_kernels import functional as KF
from esvit_kernels.backends import BackendUnavailableError

from .conftest import requires_triton


def _perturb(model: torch.nn.Module, std: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised biases and global-token tables matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def _micro(**kw) -> VisionLongformer:
    kw.setdefault("drop_path_rate", 0.0)
    kw.setdefault("backend", "torch")
    return create_backbone("vil_micro", img_size=64, **kw)


# -- presets -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    # counted on the official MsViT (microsoft/esvit models/vision_longformer.py) built on the CPU with the
    # README's vil_2262 overrides / vil_small/base.yaml, img_size 224, no classifier: the paper rounds to 28M
    ("vil_2262", 27_569_352),
    ("vil_small", 23_866_752),
])
def test_parameter_count_matches_the_official_msvit(name, expected):
    m = create_backbone(name)
    assert sum(p.numel() for p in m.parameters()) == expected
    assert m.num_features == 768


def test_presets_are_registered():
    for name in ("vil_micro", "vil_2262", "vil_small"):
        assert name in ARCHS
    assert min_crop_size("vil_2262") == 32 and min_crop_size("vil_micro") == 16
    m = create_backbone("vil_2262")
    assert [s.depth for s in m.stages] == [2, 2, 6, 2]
    assert [s.num_heads for s in m.stages] == [3, 6, 12, 24]
    assert [s.sparse for s in m.stages] == [True, True, False, False]
    assert [s.num_global for s in m.stages] == [1, 1, 1, 0]
    sparse = [mod for mod in m.modules() if isinstance(mod, LongformerAttention)]
    assert len(sparse) == 4 and all(a.mode == 1 and a.window_size == 7 for a in sparse)
    assert sum(isinstance(mod, FullAttention) for mod in m.modules()) == 8
    small = create_backbone("vil_small")
    assert [s.depth for s in small.stages] == [1, 2, 8, 1] and all(s.ape for s in small.stages)
    assert all(a.mode == 0 for a in small.modules() if isinstance(a, LongformerAttention))
    # shared global projections (official SHARE_W): one set of weights
    a = sparse[0]
    assert a.query_global is a.query and a.kv_global is a.kv and a.proj_global is a.proj


def test_parse_errors_are_clear():
    with pytest.raises(ValueError, match="bad field"):
        parse_vil_arch("l1,h3,x9_l2_l3")
    with pytest.raises(ValueError, match="numbered"):
        parse_vil_arch("l1_l3_l2")
    with pytest.raises(ValueError, match="3 or 4"):
        parse_vil_arch("l1,h1,d8_l2,h1,d8")
    with pytest.raises(ValueError, match="multiple"):
        parse_vil_arch("l1,h3,d8_l2_l3")
    with pytest.raises(ValueError, match="mode"):
        _micro(mode=2)
    with pytest.raises(ValueError, match="smaller than"):
        _micro()(torch.randn(1, 3, 12, 12))


# -- the sparse attention module against a dense oracle -----------------------------------------------------

def _dense_oracle(attn: LongformerAttention, x: torch.Tensor, hw: tuple[int, int], neighbor: int) -> torch.Tensor:
    """ViL attention written densely from the rules: local query (r, c) sees the global tokens (bias g2l[1])
    and every existing key of the windows within one window step (or its own + neighbour ``neighbor``), with
    the ((4w-1)^2, heads) table at ((r-r'+2w-1)(4w-1) + c-c'+2w-1); global queries see everything (g2g, g2l[0])."""
    b, n, c = x.shape
    g, (h, w), ws, nh = attn.num_global, hw, attn.window_size, attn.num_heads
    d = c // nh
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    dm = rows[None, :] // ws - rows[:, None] // ws  # key window - query window
    dn = cols[None, :] // ws - cols[:, None] // ws
    if neighbor == 0:
        allowed = (dm.abs() <= 1) & (dn.abs() <= 1)
    else:
        om, on = [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)][neighbor - 1]
        allowed = ((dm == 0) & (dn == 0)) | ((dm == om) & (dn == on))
    idx = (rows[:, None] - rows[None, :] + 2 * ws - 1) * (4 * ws - 1) + cols[:, None] - cols[None, :] + 2 * ws - 1
    lbias = attn.local_relative_position_bias_table[idx.where(allowed, 0)].permute(2, 0, 1)  # (heads, L, L)
    bias = torch.full((nh, n, n), float("-inf"))
    bias[:, g:, g:] = lbias.masked_fill(~allowed, float("-inf"))
    if g:
        bias[:, g:, :g] = attn.g2l_relative_position_bias[1][:, None, :]
        bias[:, :g, :g] = attn.g2g_relative_position_bias
        bias[:, :g, g:] = attn.g2l_relative_position_bias[0][:, :, None]

    def heads(t):
        return t.reshape(b, -1, nh, d).transpose(1, 2)

    k, v = attn.kv(x).split(c, dim=-1)
    ql = heads(attn.query(x[:, g:]))
    out_l = torch.softmax(ql @ heads(k).transpose(-1, -2) * d**-0.5 + bias[:, g:], -1) @ heads(v)
    out_l = attn.proj(out_l.transpose(1, 2).reshape(b, -1, c))
    if not g:
        return out_l
    kg, vg = attn.kv_global(x).split(c, dim=-1)
    qg = heads(attn.query_global(x[:, :g]))
    out_g = torch.softmax(qg @ heads(kg).transpose(-1, -2) * d**-0.5 + bias[:, :g], -1) @ heads(vg)
    return torch.cat([attn.proj_global(out_g.transpose(1, 2).reshape(b, -1, c)), out_l], dim=1)


@pytest.mark.parametrize("hw, num_global, share_w, neighbor", [
    ((7, 5), 1, True, 0),     # padding on both axes, a 3x2 grid of windows
    ((9, 9), 2, False, 0),    # separate global projections
    ((6, 8), 0, True, 0),     # no global tokens
    ((9, 7), 1, False, 3),    # own window + up-right only
    ((9, 7), 2, True, 7),     # own window + down only
    ((2, 3), 1, True, 0),     # map smaller than one window
])
def test_sparse_attention_matches_a_dense_oracle(hw, num_global, share_w, neighbor):
    attn = LongformerAttention(8, 2, 3, num_global, rpe=True, share_w=share_w, mode=0, backend="torch")
    _perturb(attn, std=0.3)
    x = torch.randn(2, num_global + hw[0] * hw[1], 8)
    if neighbor:
        attn.neighbor = lambda: neighbor  # the op call with this neighbour (what mode 1 draws)
    got = attn(x, hw)
    want = _dense_oracle(attn, x, hw, neighbor)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_full_attention_stage_has_the_official_bias_layout():
    """At img_size the full-attention bias is table[Swin index] with the global rows/columns of the sparse
    stages; a smaller crop resamples the (N, N) matrix to (n, n)."""
    fa = _perturb(FullAttention(8, 2, (3, 3), 1, rpe=True), std=0.3)
    bias = fa.attention_bias(9)
    assert bias.shape == (2, 10, 10)
    # local (0,0) -> (2,2): relative (-2, -2) -> index 0 of the (2*3-1)^2 table
    torch.testing.assert_close(bias[:, 1, 9], fa.local_relative_position_bias_table[0])
    torch.testing.assert_close(bias[:, 0, 0], fa.g2g_relative_position_bias[:, 0, 0])
    torch.testing.assert_close(bias[:, 0, 5], fa.g2l_relative_position_bias[0, :, 0])
    torch.testing.assert_close(bias[:, 5, 0], fa.g2l_relative_position_bias[1, :, 0])
    assert fa.attention_bias(4).shape == (2, 5, 5)
    assert fa(torch.randn(1, 5, 8), (2, 2)).shape == (1, 5, 8)


# -- MODE 1 ---------------------------------------------------------------------------------------------------

def _record_neighbors(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = KF.neighborhood_window_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["neighbor"])
        return real(*args, **kwargs)

    monkeypatch.setattr(KF, "neighborhood_window_attention", spy)
    return seen


def test_mode1_draws_are_seeded_and_eval_is_full(monkeypatch):
    seen = _record_neighbors(monkeypatch)
    m = _micro().train()
    x = torch.randn(2, 3, 64, 64)
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        seen.clear()
        out = m(x)[0]
        runs.append((list(seen), out))
    assert len(runs[0][0]) == 4 and all(1 <= k <= 8 for k in runs[0][0])  # one draw per layer call
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=0)
    assert runs[0][0] != runs[2][0]
    seen.clear()
    m.eval()(x)
    assert seen == [0, 0, 0, 0]
    seen.clear()
    _micro(mode=0).train()(x)
    assert seen == [0, 0, 0, 0]


def test_checkpointing_replays_the_mode1_draws():
    ref = _perturb(_micro()).train()
    ckpt = _micro(use_checkpoint=True).train()
    ckpt.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 40, 40)
    grads = []
    for m in (ref, ckpt):
        torch.manual_seed(7)
        view, regions = m(x)
        (view.square().sum() + regions.sin().sum()).backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# -- the backbone contract, local crops -----------------------------------------------------------------------

@pytest.mark.parametrize("size, tokens", [(64, 16), (40, 4), (32, 4), (16, 1)])
def test_micro_crops_and_contract(size, tokens):
    m = _micro().eval()
    view, regions = m(torch.randn(2, 3, size, size))
    assert view.shape == (2, 128) and regions.shape == (2, tokens, 128)
    torch.testing.assert_close(view, regions.mean(dim=1))  # last stage has no global token: the mean
    feats, hw = m.forward_features(torch.randn(1, 3, size, size))
    assert feats.shape == (1, tokens, 128) and hw[0] * hw[1] == tokens
    # last 4 blocks: two of stage 2 (its global token, 64-d) and two of stage 3 (normed mean, 128-d)
    assert m.forward_return_n_last_blocks(torch.randn(2, 3, size, size), 4).shape == (2, 384)
    with pytest.raises(ValueError, match="n must be"):
        m.forward_return_n_last_blocks(torch.randn(1, 3, size, size), 7)


def test_view_is_the_global_token_when_the_last_stage_has_one():
    arch = "l1,h1,d16,n1,s1,g1,p4,f4,a0_l2,h2,d32,n1,s1,g2,p2,f4,a0_l3,h2,d32,n1,s0,g2,p2,f4,a0"
    m = _perturb(_micro(arch=arch)).eval()
    x = torch.randn(2, 3, 64, 64)
    view, regions = m(x)
    tokens = m.norm(list(m._blocks(x))[-1][1])
    assert regions.shape == (2, 16, 32)
    torch.testing.assert_close(view, tokens[:, 0])
    torch.testing.assert_close(regions, tokens[:, 2:])


@pytest.mark.parametrize("name, size, tokens", [("vil_2262", 224, 49), ("vil_2262", 96, 9), ("vil_small", 96, 9)])
def test_full_size_presets_on_global_and_local_crops(name, size, tokens):
    m = create_backbone(name, backend="torch").eval()
    with torch.no_grad():
        view, regions = m(torch.randn(1, 3, size, size))
    assert view.shape == (1, 768) and regions.shape == (1, tokens, 768)
    assert torch.isfinite(view).all() and torch.isfinite(regions).all()


def test_set_backend_switches_the_sparse_attention():
    m = _micro()
    set_backend(m, "triton")
    sparse = [a for a in m.modules() if isinstance(a, LongformerAttention)]
    assert sparse and all(a.backend == "triton" for a in sparse)
    set_backend(m, "torch")
    assert all(a.backend == "torch" for a in sparse)


def test_official_parameter_names():
    names = set(dict(_micro().named_parameters()))
    for key in ("layer1.0.proj.weight", "layer1.0.norm_embed.weight", "layer1.0.cls_token",
                "layer1.1.norm.weight", "layer1.1.attn.query.weight", "layer1.1.attn.kv.bias",
                "layer1.1.attn.local_relative_position_bias_table", "layer1.1.attn.g2l_relative_position_bias",
                "layer1.2.mlp.fc1.weight", "layer3.1.attn.qkv.weight", "norm.weight"):
        assert key in names, key


@requires_triton
@pytest.mark.parametrize("size", [64, 40, 32])
def test_micro_triton_matches_torch(size):
    """backend="triton" (interpreted) gives the eager reference's values and gradients, MODE-1 training."""
    ref = _perturb(_micro()).train()
    x = torch.randn(2, 3, size, size)
    out = {}
    for backend in ("torch", "triton"):
        set_backend(ref, backend)
        ref.zero_grad()
        xi = x.clone().requires_grad_()
        torch.manual_seed(11)
        try:
            view, regions = ref(xi)
        except BackendUnavailableError as exc:
            pytest.skip(f"the op has no Triton path yet: {exc}")
        (view.square().sum() + regions.sin().sum()).backward()
        out[backend] = (view, regions, xi.grad, [p.grad.clone() for p in ref.parameters()])
    (v0, r0, g0, p0), (v1, r1, g1, p1) = out["torch"], out["triton"]
    torch.testing.assert_close(v1, v0, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(r1, r0, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(g1, g0, atol=2e-5, rtol=2e-5)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cli_pretrain_and_eval_end_to_end(tmp_path, capsys):
    """The issue's command on a small generated ImageFolder: `esvit pretrain --config configs/demo_cpu.yaml
    --arch vil_micro ... --epochs 1 --batch-size 8 --device cpu` writes a checkpoint; k-NN and the linear probe
    evaluate its teacher."""
    from esvit.cli import main

    data = tmp_path / "D"
    assert main(["make-dataset", str(data), "--num-images", "24", "--num-classes", "2", "--val-fraction", "0.25",
                 "--image-size", "64"]) == 0
    out = tmp_path / "run"
    config = str(Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml")
    assert main(["pretrain", "--config", config, "--arch", "vil_micro", "--data", str(data / "train"),
                 "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--output", str(out),
                 "data.num_workers=0", "train.progress=false"]) == 0
    assert (out / "checkpoint.pth").is_file()
    assert "vil_micro" in capsys.readouterr().out
    ckpt = str(out / "checkpoint.pth")
    split = ["--train-data", str(data / "train"), "--val-data", str(data / "val"), "--device", "cpu"]
    assert main(["eval-knn", "--checkpoint", ckpt, *split]) == 0
    assert "vil_micro at 64 px" in capsys.readouterr().out
    assert main(["eval-linear", "--checkpoint", ckpt, *split, "--epochs", "1", "--lr", "0.1"]) == 0
    assert "384-d features" in capsys.readouterr().out


@pytest.mark.parametrize("arch, size", [
    (None, 40),  # vil_micro: no global token in the last stage; a local crop (the bias matrix resampled)
    ("l1,h1,d16,n1,s1,g1,p4,f4,a0_l2,h2,d32,n1,s1,g1,p2,f4,a0_l3,h2,d32,n2,s0,g1,p2,f4,a0", 64),
])
def test_attention_picture_recomputation_reproduces_the_block(arch, size):
    """viz-attention's recomputed probabilities of the last (full-attention) block, @ v -> proj, give that
    block's own attention output."""
    from esvit.viz.attention import attention_maps, last_block_attention

    net = _perturb(_micro(**({"arch": arch} if arch else {}))).eval()
    x = torch.randn(2, 3, size, size)
    probs, grid, has_cls = last_block_attention(net, x)
    g = net.stages[-1].num_global
    n = g + grid[0] * grid[1]
    assert has_cls == bool(g) and probs.shape == (2, net.stages[-1].num_heads, n, n)
    seen = {}
    blk = net.layer3[-2]
    hook = blk.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0], hw=args[1]))
    net(x)
    hook.remove()
    y = blk.norm(seen["x"])
    attn = blk.attn
    c = y.shape[-1]
    v = attn.qkv(y).view(2, n, 3, attn.num_heads, c // attn.num_heads)[:, :, 2].transpose(1, 2)
    mine = attn.proj((probs @ v).transpose(1, 2).reshape(2, n, c))
    torch.testing.assert_close(mine, attn(y, seen["hw"]), atol=1e-5, rtol=1e-5)
    assert attention_maps(probs, grid, has_cls, "cls" if g else "mean").shape[-2:] == grid
