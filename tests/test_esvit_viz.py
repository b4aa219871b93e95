"""Correspondence matching and accuracy, recomputed attention, the pictures and the viz CLI."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from esvit.cli import main
from esvit.data.synthetic import render_image
from esvit.eval.model import load_eval_model, token_grid
from esvit.models import create_backbone
from esvit.viz.attention import attention_maps, draw_attention, last_block_attention
from esvit.viz.correspondence import (
    augmented_view,
    draw_correspondence,
    match_regions,
    match_tokens,
    mirrored_index,
)
from tests import esvit_eval_helpers as helpers

tiny_ckpt = helpers.tiny_ckpt  # fixtures
one_thread = helpers.one_thread


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()  # a valid PNG, not truncated
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_mirrored_index():
    assert mirrored_index((2, 3)).tolist() == [2, 1, 0, 5, 4, 3]
    assert mirrored_index((1, 1)).tolist() == [0]


def test_match_tokens_known_answers():
    g = torch.Generator().manual_seed(0)
    grid = (3, 4)
    a = torch.randn(2, 12, 8, generator=g)
    flipped = a[:, mirrored_index(grid)]  # the view's token (r, c) is the image's (r, w-1-c)
    corr = match_tokens(a, flipped, grid)
    assert all(c.accuracy == 1.0 and c.correct.all() for c in corr)
    assert torch.allclose(corr[0].score, torch.ones(12))
    same = match_tokens(a, a, grid)  # no flip: every token matches itself, never its mirror (w even)
    assert all(c.accuracy == 0.0 for c in same) and same[0].match.tolist() == list(range(12))
    ranked = corr[0].top(5)
    assert len(ranked) == 5 and (corr[0].score[ranked[:-1]] >= corr[0].score[ranked[1:]]).all()


def test_augmented_view_is_an_exact_flip_without_jitter():
    x = torch.randn(2, 3, 16, 16).clamp(-1.5, 1.5)
    v = augmented_view(x, jitter=False)
    assert torch.allclose(v, x.flip(-1), atol=1e-5)
    j1, j2 = augmented_view(x, seed=3), augmented_view(x, seed=3)
    assert torch.equal(j1, j2) and not torch.allclose(j1, x.flip(-1), atol=1e-3)


def test_flip_equivariant_backbone_gives_perfect_correspondence():
    """A backbone whose final map is exactly flip-equivariant (8x8 average pooling, dispatched as a ResNet
    grid) matches every token to its mirror: token grid, matching and scoring with a known answer."""
    from esvit.models import ResNetBackbone

    class Pool(ResNetBackbone):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)

        def forward_map(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool2d(x, 8)

    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    corr = match_regions(Pool(), x, x.flip(-1))[0]
    assert corr.grid == (4, 4) and corr.accuracy == 1.0
    assert match_regions(Pool(), x, x)[0].accuracy == 0.0  # without the flip nothing lands on the mirror


def test_draw_correspondence_writes_a_png_of_the_expected_size(tmp_path, tiny_ckpt):
    m = load_eval_model(tiny_ckpt)
    x = torch.randn(1, 3, m.crop_size, m.crop_size)
    view = augmented_view(x)
    corr = match_regions(m.backbone, x, view)[0]
    assert corr.grid == (2, 2) and 0.0 <= corr.accuracy <= 1.0
    out = tmp_path / "c.png"
    size = draw_correspondence(x, view, corr, out, num_lines=3, panel=128, title="t")
    assert size == (2 * 128 + 128 // 16, 128 + 48) == png_size(out)


def test_swin_attention_recomputation_reproduces_the_block():
    """probs @ v -> proj of the recomputed attention equals the block's own (fused-path) attention output."""
    torch.manual_seed(0)
    net = create_backbone("swin_micro", window_size=4, img_size=32, backend="torch", drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    probs, grid, has_cls = last_block_attention(net, x)
    assert grid == (2, 2) and not has_cls and probs.shape == (2, 4, 4, 4)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 4, 4), atol=1e-6)
    seen = {}
    blk = net.layers[-1].blocks[-1]
    h = blk.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    net(x)
    h.remove()
    y = blk.norm1(seen["x"])
    attn = blk.attn
    v = attn.qkv(y).view(2, 4, 3, attn.num_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
    mine = attn.proj((probs @ v).transpose(1, 2).reshape(2, 4, -1))
    theirs = attn.forward_map(y.view(2, 2, 2, -1), 0).reshape(2, 4, -1)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    maps = attention_maps(probs, grid, has_cls, "mean")
    assert maps.shape == (2, 4, 2, 2) and torch.allclose(maps.sum((-1, -2)), torch.ones(2, 4), atol=1e-5)
    assert torch.equal(attention_maps(probs, grid, has_cls, "center")[0, 0].flatten(), probs[0, 0, 3])
    with pytest.raises(ValueError, match="cls"):
        attention_maps(probs, grid, has_cls, "cls")


def test_vit_attention_recomputation_reproduces_the_block():
    torch.manual_seed(0)
    net = create_backbone("deit_small", img_size=32, embed_dim=32, depth=2, num_heads=2, patch_size=8).eval()
    x = torch.randn(1, 3, 32, 32)
    probs, grid, has_cls = last_block_attention(net, x)
    assert grid == (4, 4) and has_cls and probs.shape == (1, 2, 17, 17)
    seen = {}
    blk = net.blocks[-1]
    h = blk.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    net(x)
    h.remove()
    y = blk.norm1(seen["x"])
    v = blk.attn.qkv(y).view(1, 17, 3, 2, 16)[:, :, 2].transpose(1, 2)
    torch.testing.assert_close(blk.attn.proj((probs @ v).transpose(1, 2).reshape(1, 17, 32)), blk.attn(y),
                               atol=1e-5, rtol=1e-5)
    assert attention_maps(probs, grid, has_cls, "cls").shape == (1, 2, 4, 4)


def test_attention_needs_the_training_resolution_and_attention():
    net = create_backbone("swin_micro", window_size=4, img_size=32, backend="torch", drop_path_rate=0.0).eval()
    with pytest.raises(ValueError, match="training resolution"):
        last_block_attention(net, torch.randn(1, 3, 64, 64))
    with pytest.raises(TypeError, match="no attention"):
        last_block_attention(create_backbone("resnet50").eval(), torch.randn(1, 3, 32, 32))


def test_draw_attention_png_size(tmp_path):
    out = tmp_path / "a.png"
    size = draw_attention(torch.randn(1, 3, 32, 32), torch.rand(5, 2, 2), out, panel=64, cols=4, title="x")
    assert size == (4 * 64, 2 * 64 + 40) == png_size(out)


def test_token_grid_of_every_family():
    x = torch.randn(1, 3, 64, 64)
    swin = create_backbone("swin_micro", window_size=4, img_size=64, backend="torch").eval()
    vit = create_backbone("deit_small", img_size=64, embed_dim=32, depth=1, num_heads=1, patch_size=16).eval()
    with torch.no_grad():
        assert token_grid(swin, x)[0].shape == (1, 16, 128) and token_grid(swin, x)[1] == (4, 4)
        assert token_grid(vit, x)[0].shape == (1, 16, 32) and token_grid(vit, x)[1] == (4, 4)


def test_cli_viz_commands_end_to_end(tmp_path, tiny_ckpt, capsys):
    img = tmp_path / "img.png"
    render_image(3, 3, 48).save(img)
    out = tmp_path / "corr.png"
    assert main(["viz-correspondence", "--checkpoint", str(tiny_ckpt), "--image", str(img), "--output", str(out),
                 "--panel-size", "96"]) == 0
    text = capsys.readouterr().out
    assert "correspondence accuracy" in text and "of 4 tokens" in text
    assert png_size(out) == (2 * 96 + 6, 96 + 48)
    out = tmp_path / "attn.png"
    assert main(["viz-attention", "--checkpoint", str(tiny_ckpt), "--image", str(img), "--output", str(out),
                 "--panel-size", "64", "--query", "center"]) == 0
    assert "4 attention maps" in capsys.readouterr().out
    assert png_size(out) == (5 * 64, 64 + 40)  # the image + 4 heads of the last stage in one row
    out = tmp_path / "rand.png"
    assert main(["viz-correspondence", "--random-init", "--arch", "swin_micro", "--window-size", "4", "--crop-size",
                 "32", "--image", str(img), "--output", str(out)]) == 0
    assert "random init" in capsys.readouterr().out and png_size(out) == (2 * 384 + 24, 384 + 48)


def test_cli_viz_bad_inputs(tmp_path, tiny_ckpt, capsys):
    img = tmp_path / "img.png"
    render_image(0, 0, 32).save(img)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    cases = [(["--checkpoint", str(tiny_ckpt), "--image", str(tmp_path / "none.png")], "no such image"),
             (["--checkpoint", str(tiny_ckpt), "--image", str(bad)], "cannot read image"),
             (["--checkpoint", str(tmp_path / "none.pth"), "--image", str(img)], "no such checkpoint")]
    broken = helpers.broken_checkpoints(tmp_path, tiny_ckpt)
    cases += [(["--checkpoint", str(broken[name]), "--image", str(img)], message)
              for name, message in helpers.BROKEN_MESSAGES.items()]
    for cmd in ("viz-correspondence", "viz-attention"):
        for args, message in cases:
            assert main([cmd, *args, "--output", str(tmp_path / "o.png")]) == 2
            err = capsys.readouterr().err
            assert re.search(f"esvit {cmd}: error: .*{message}", err) and err.count("\n") == 1, err
    resnet = ["--random-init", "--arch", "resnet50", "--crop-size", "32", "--image", str(img)]
    assert main(["viz-attention", *resnet, "--output", str(tmp_path / "o.png")]) == 2
    assert "no attention" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_cli_viz_output_directory_is_created_or_refused_before_any_work(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """--output in a missing directory was a FileNotFoundError traceback after the model had run."""
    img = tmp_path / "img.png"
    render_image(1, 1, 32).save(img)
    args = ["--checkpoint", str(tiny_ckpt), "--image", str(img), "--panel-size", "64"]
    out = tmp_path / "new" / "deeper" / "corr.png"
    assert main(["viz-correspondence", *args, "--output", str(out)]) == 0
    assert png_size(out) == (2 * 64 + 4, 64 + 48)
    capsys.readouterr()

    import esvit.viz.common as common

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before --output was checked")

    monkeypatch.setattr(common, "model_from_args", no_work)
    (tmp_path / "afile").write_text("x")
    for cmd in ("viz-correspondence", "viz-attention"):
        for output, message in ((tmp_path, "is a directory"), (tmp_path / "afile" / "o.png", "afile is a file")):
            assert main([cmd, *args, "--output", str(output)]) == 2
            err = capsys.readouterr().err
            assert re.search(f"esvit {cmd}: error: .*--output .*{message}", err) and err.count("\n") == 1, err
