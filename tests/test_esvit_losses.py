"""Heads, the combined loss and the schedules against literal transcriptions of the official code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esvit.losses import EsViTLoss
from esvit.models import DINOHead
from esvit.models.wrapper import MultiCropOutput
from esvit.schedules import cosine_scheduler, teacher_temp_schedule


def test_dino_head_shapes_weight_norm_and_frozen_gain():
    head = DINOHead(96, 300, hidden_dim=64, bottleneck_dim=32, norm_last_layer=True)
    out = head(torch.randn(5, 96))
    assert out.shape == (5, 300)
    w = head.last_layer.weight()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(300))  # gain 1 -> unit rows
    assert not head.last_layer.weight_g.requires_grad and head.last_layer.weight_v.requires_grad
    assert set(head.last_layer.state_dict()) == {"weight_g", "weight_v"}  # names of nn.utils.weight_norm
    assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)] == [64, 64, 32]
    assert DINOHead(96, 10, norm_last_layer=False).last_layer.weight_g.requires_grad
    # same function as torch's weight norm with the same parameters
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(32, 300, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        ref.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    x = torch.randn(4, 32)
    torch.testing.assert_close(head.last_layer(x), ref(x))


def _official_ddino(s_cls_out, s_region_out, s_fea, s_npatch, t_cls_out, t_region_out, t_fea, t_npatch, ncrops,
                    center, center_grid, temp, student_temp=0.1, m=0.9):
    """Literal transcription of the official DDINOLoss.forward + update_center (one process)."""
    t_cls = F.softmax((t_cls_out - center) / temp, dim=-1).detach().chunk(2)
    t_region = F.softmax((t_region_out - center_grid) / temp, dim=-1).detach().chunk(2)
    t_fea = t_fea.chunk(2)
    n = t_npatch[0]
    b = t_region[0].shape[0] // n
    s_cls = (s_cls_out / student_temp).chunk(ncrops)
    s_region = s_region_out / student_temp
    split = [s_npatch[0]] * 2 + [s_npatch[1]] * (ncrops - 2)
    s_region = torch.split(s_region, [i * b for i in split], dim=0)
    s_fea = torch.split(s_fea, [i * b for i in split], dim=0)
    total, terms = 0, 0
    for iq, q in enumerate(t_cls):
        for v in range(len(s_cls)):
            if v == iq:
                continue
            loss = 0.5 * torch.sum(-q * F.log_softmax(s_cls[v], dim=-1), dim=-1)
            s_r, s_f = s_region[v].view(b, split[v], -1), s_fea[v].view(b, split[v], -1)
            t_r, t_f = t_region[iq].view(b, n, -1), t_fea[iq].view(b, n, -1)
            sim = torch.matmul(F.normalize(s_f, p=2, dim=-1), F.normalize(t_f, p=2, dim=-1).permute(0, 2, 1))
            ind = sim.max(dim=2)[1]
            t_idx = torch.gather(t_r, 1, ind.unsqueeze(2).expand(-1, -1, t_r.size(2)))
            loss += 0.5 * torch.sum(-t_idx * F.log_softmax(s_r, dim=-1), dim=[-1]).mean(-1)
            total += loss.mean()
            terms += 1
    total /= terms
    new_center = center * m + t_cls_out.sum(0, keepdim=True) / len(t_cls_out) * (1 - m)
    new_grid = center_grid * m + t_region_out.sum(0, keepdim=True) / len(t_region_out) * (1 - m)
    return total, new_center, new_grid


def _outputs(b, k, d, n_local, tg, tl, requires_grad=False):
    """Student / teacher MultiCropOutputs plus the official flat layout (crop-major, then batch, then token)."""
    s_view = torch.randn(2 + n_local, b, k, requires_grad=requires_grad)
    s_rl = [torch.randn(2, b, tg, k, requires_grad=requires_grad), torch.randn(n_local, b, tl, k)]
    s_rf = [torch.randn(2, b, tg, d), torch.randn(n_local, b, tl, d)]
    t_view, t_rl, t_rf = torch.randn(2, b, k), torch.randn(2, b, tg, k), torch.randn(2, b, tg, d)
    student = MultiCropOutput(s_view, s_rl, s_rf, torch.zeros(2 + n_local, b, d))
    teacher = MultiCropOutput(t_view, [t_rl], [t_rf], torch.zeros(2, b, d))
    flat = {
        "s_cls_out": s_view.reshape(-1, k), "s_region_out": torch.cat([x.reshape(-1, k) for x in s_rl]),
        "s_fea": torch.cat([x.reshape(-1, d) for x in s_rf]), "s_npatch": [tg, tl],
        "t_cls_out": t_view.reshape(-1, k), "t_region_out": t_rl.reshape(-1, k), "t_fea": t_rf.reshape(-1, d),
        "t_npatch": [tg], "ncrops": 2 + n_local,
    }
    return student, teacher, flat


def test_combined_loss_and_centers_match_official():
    torch.manual_seed(0)
    loss = EsViTLoss(50, backend="torch")
    loss.center = torch.randn(1, 50) * 0.1
    loss.region_center = torch.randn(1, 50) * 0.1
    c0, g0 = loss.center.clone(), loss.region_center.clone()
    student, teacher, flat = _outputs(b=3, k=50, d=8, n_local=4, tg=16, tl=4)
    out = loss(student, teacher, teacher_temp=0.05)
    want, want_c, want_g = _official_ddino(**flat, center=c0, center_grid=g0, temp=0.05)
    torch.testing.assert_close(out.total, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.total, 0.5 * out.view + 0.5 * out.region)
    torch.testing.assert_close(loss.center, want_c)
    torch.testing.assert_close(loss.region_center, want_g)


def test_region_teacher_temp_and_center_momentum():
    """The demo-scale options: a separate region teacher temperature / centre momentum change the region part
    only, and None (the default) is the official recipe."""
    torch.manual_seed(3)
    student, teacher, _ = _outputs(b=2, k=20, d=4, n_local=2, tg=4, tl=1)
    ref = EsViTLoss(20, backend="torch")
    same = EsViTLoss(20, backend="torch", region_teacher_temp=0.05, region_center_momentum=0.9)
    other = EsViTLoss(20, backend="torch", region_teacher_temp=0.02, region_center_momentum=0.5)
    a, b, c = (m(student, teacher, 0.05) for m in (ref, same, other))
    torch.testing.assert_close(a.total, b.total)
    torch.testing.assert_close(ref.region_center, same.region_center)
    torch.testing.assert_close(a.view, c.view)
    torch.testing.assert_close(ref.center, other.center)
    assert not torch.allclose(a.region, c.region)
    torch.testing.assert_close(other.region_center, ref.region_center / 0.1 * 0.5)  # from zero: (1 - m) x mean


def test_view_only_and_weights():
    torch.manual_seed(1)
    student, teacher, flat = _outputs(b=2, k=20, d=4, n_local=2, tg=4, tl=1)
    v_only = EsViTLoss(20, region_weight=0.0, backend="torch")(student, teacher, 0.04)
    assert v_only.region is None
    both = EsViTLoss(20, view_weight=1.0, region_weight=1.0, backend="torch")(student, teacher, 0.04)
    torch.testing.assert_close(v_only.total, both.view)  # the official view-only loss: L_V at weight 1
    torch.testing.assert_close(both.total, both.view + both.region)
    with pytest.raises(ValueError):
        EsViTLoss(20, view_weight=0.0)


def test_gradient_reaches_student_only():
    torch.manual_seed(2)
    student, teacher, _ = _outputs(b=2, k=20, d=4, n_local=2, tg=4, tl=1, requires_grad=True)
    EsViTLoss(20, backend="torch")(student, teacher, 0.04).total.backward()
    assert student.view_logits.grad.abs().sum() > 0 and student.region_logits[0].grad.abs().sum() > 0
    assert teacher.view_logits.grad is None


def _dino_cosine(base, final, epochs, niter, warmup_epochs=0, start_warmup_value=0):
    warmup = np.array([])
    warmup_iters = warmup_epochs * niter
    if warmup_epochs > 0:
        warmup = np.linspace(start_warmup_value, base, warmup_iters)
    iters = np.arange(epochs * niter - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def test_schedules_match_dino():
    np.testing.assert_allclose(cosine_scheduler(5e-4, 1e-6, 7, 13, warmup_epochs=2), _dino_cosine(5e-4, 1e-6, 7, 13, 2))
    np.testing.assert_allclose(cosine_scheduler(0.996, 1.0, 3, 5), _dino_cosine(0.996, 1.0, 3, 5))
    t = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert t[0] == pytest.approx(0.04) and t[29] == pytest.approx(0.07) and t[99] == pytest.approx(0.07)
    assert len(teacher_temp_schedule(0.04, 0.07, 30, 10)) == 10  # warmup longer than the run: clamped
