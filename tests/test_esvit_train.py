"""The training step and loop: step semantics, loss going down, exact resumption, non-finite loss, fused vs torch."""

from __future__ import annotations

import copy
import errno
import os
import re

import pytest
import torch

import esvit.losses
from esvit.checkpoint import load_checkpoint
from esvit.errors import TrainingError
from esvit.train import Trainer, pretrain
from tests import esvit_helpers
from tests.esvit_helpers import state_equal, tiny_config

cache = esvit_helpers.cache  # fixture
one_thread = esvit_helpers.one_thread  # fixture


def _crops(b=4, g=32, loc=16, n_local=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ([torch.randn(b, 3, g, g, generator=gen) for _ in range(2)]
            + [torch.randn(b, 3, loc, loc, generator=gen) for _ in range(n_local)])


def test_step_semantics(tmp_path, cache):
    cfg = tiny_config(tmp_path, cache, "optim.warmup_epochs=0", "optim.clip_grad=0.001", "optim.batch_size=4")
    torch.manual_seed(0)
    tr = Trainer(cfg, steps_per_epoch=10)
    assert tr.lr_schedule.max() == pytest.approx(0.005 * 4 / 256)  # linear scaling with the global batch
    decay, no_decay = tr.optimizer.param_groups
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert all(not p.requires_grad for p in tr.teacher.parameters())
    s0 = {k: v.clone() for k, v in tr.student_module.state_dict().items()}
    t0 = {k: v.clone() for k, v in tr.teacher.state_dict().items()}
    assert not state_equal(s0, t0)  # the teacher starts as a copy of the student
    stats = tr.train_step(_crops())
    s1, t1 = tr.student_module.state_dict(), tr.teacher.state_dict()
    changed = set(state_equal(s0, s1))
    assert {k for k in s0 if ".last_layer." in k}.isdisjoint(changed)  # frozen in epoch 0
    assert "backbone.layers.0.blocks.0.attn.qkv.weight" in changed and "region_head.mlp.0.weight" in changed
    assert decay["weight_decay"] == pytest.approx(stats.wd) and decay["lr"] == pytest.approx(stats.lr)
    m = stats.momentum
    for k in t0:  # teacher EMA of the updated student
        torch.testing.assert_close(t1[k], m * t0[k] + (1 - m) * s1[k], rtol=0, atol=1e-7)
    for p in tr.student_module.parameters():  # per-parameter clipping to 0.001
        if p.grad is not None:
            assert p.grad.norm() <= 0.001 * (1 + 1e-4)
    # past the first epoch the last layers train
    tr.iteration = 10
    tr.train_step(_crops())
    assert not torch.equal(tr.student_module.head.last_layer.weight_v, s0["head.last_layer.weight_v"])


def test_loss_goes_down(tmp_path, cache):
    result = pretrain(tiny_config(tmp_path / "run", cache, "train.keep_every=4"))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint0*.pth")) == ["checkpoint0004.pth",
                                                                                  "checkpoint0008.pth"]
    assert load_checkpoint(tmp_path / "run" / "checkpoint0004.pth")["epoch"] == 4
    losses = [e["loss"] for e in result["epochs"]]
    assert len(losses) == 8 and all(x == x for x in losses)
    assert losses[-1] < losses[0] - 0.2, losses
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 8 and '"images_per_s"' in lines[0]


def test_resume_gives_the_same_weights(tmp_path, cache):
    # 4 steps per epoch, 3 epochs; stopped at step 6 (mid epoch 2, checkpoint written there), then resumed
    over = ("optim.epochs=3", "model.drop_path_rate=0.1")
    full = pretrain(tiny_config(tmp_path / "full", cache, *over))
    part = pretrain(tiny_config(tmp_path / "part", cache, *over, "train.stop_at_step=6"))
    assert part["stopped"] and part["iteration"] == 6
    mid = load_checkpoint(tmp_path / "part" / "checkpoint.pth")
    assert (mid["epoch"], mid["step_in_epoch"], mid["iteration"]) == (1, 2, 6)
    resumed = pretrain(tiny_config(tmp_path / "part", cache, *over))
    assert resumed["iteration"] == full["iteration"] == 12
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pth")
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pth")
    for key in ("student", "teacher", "loss"):
        assert not state_equal(a[key], b[key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i in a["optimizer"]["state"]:
        assert not state_equal(a["optimizer"]["state"][i], b["optimizer"]["state"][i])
    assert full["epochs"][-1]["loss"] == pytest.approx(resumed["epochs"][-1]["loss"], rel=1e-6)


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, cache, monkeypatch):
    calls = {"n": 0}
    forward = esvit.losses.EsViTLoss.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 6:  # second step of the second epoch
            out.total = out.total * float("nan")
        return out

    monkeypatch.setattr(esvit.losses.EsViTLoss, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss is nan.*last good checkpoint"):
        pretrain(tiny_config(out, cache, "optim.epochs=3"))
    state = load_checkpoint(out / "checkpoint.pth")
    assert (state["epoch"], state["iteration"]) == (1, 4)
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def _fused_unavailable(part: str) -> str | None:
    """Why the Triton window attention ("attention") or losses ("losses") cannot run here (None if they can)."""
    import esvit_kernels

    status = esvit_kernels.available_backends()["triton"]
    if not (status.available and "cpu" in status.devices):
        return f"triton backend unavailable on CPU: {status.reason}"
    try:
        if part == "attention":
            import esvit_kernels._triton.window_attention  # noqa: F401

            esvit_kernels.shifted_window_attention(torch.randn(1, 3, 3, 6), num_heads=1, window_size=2,
                                                   shift_size=1, backend="triton")
        else:
            c = torch.zeros(4)
            kw = {"student_temp": 0.1, "teacher_temp": 0.04, "backend": "triton"}
            esvit_kernels.dino_loss(torch.randn(3, 2, 4), torch.randn(2, 2, 4), c, **kw)
            esvit_kernels.multi_region_loss([torch.randn(3, 2, 2, 4)], [torch.randn(3, 2, 2, 5)],
                                            torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 5), c, **kw)
    except Exception as exc:  # not merged yet, or not importable
        return f"fused Triton {part} not available: {type(exc).__name__}: {exc}"
    return None


@pytest.mark.parametrize("part", [
    pytest.param(p, marks=pytest.mark.skipif(_fused_unavailable(p) is not None, reason=str(_fused_unavailable(p))))
    for p in ("attention", "losses")])
def test_fused_step_equals_torch_step(tmp_path, cache, part):
    """One step of the tiny preset with the Triton window attention (or losses) equals the torch reference."""
    results = {}
    for backend in ("torch", "triton"):
        which = "model.backend" if part == "attention" else "loss.backend"
        cfg = tiny_config(tmp_path, cache, f"{which}={backend}", "optim.warmup_epochs=0", "optim.batch_size=2",
                          "optim.freeze_last_layer=0")
        torch.manual_seed(0)
        tr = Trainer(cfg, steps_per_epoch=10)
        stats = tr.train_step(_crops(b=2))
        grads = {n: p.grad.clone() for n, p in tr.student_module.named_parameters() if p.grad is not None}
        results[backend] = (stats, grads, tr.student_module.state_dict(), tr.teacher.state_dict(),
                            tr.loss.state_dict())
    (s_ref, g_ref, w_ref, t_ref, c_ref), (s_f, g_f, w_f, t_f, c_f) = results["torch"], results["triton"]
    assert s_f.loss == pytest.approx(s_ref.loss, rel=1e-5)
    assert s_f.loss_region == pytest.approx(s_ref.loss_region, rel=1e-5)
    assert g_ref.keys() == g_f.keys()
    for n in g_ref:
        scale = g_ref[n].abs().max().clamp_min(1e-12)
        assert (g_f[n] - g_ref[n]).abs().max() <= 1e-4 * scale, n
        # AdamW's first step moves every weight by +-lr (plus decay); elements whose gradient is within the
        # kernels' rounding of zero may flip sign, all others must agree
        sure = g_ref[n].abs() > 1e-3 * scale
        torch.testing.assert_close(w_f[n][sure], w_ref[n][sure], rtol=0, atol=1e-6, msg=n)
    for k in c_ref:
        torch.testing.assert_close(c_f[k], c_ref[k], rtol=1e-5, atol=1e-6)
    for k in t_ref:
        torch.testing.assert_close(t_f[k], t_ref[k], rtol=0, atol=2e-6)


def test_load_backbone_contract(tmp_path, cache):
    from esvit.checkpoint import load_backbone
    from esvit.errors import CheckpointError

    out = tmp_path / "run"
    pretrain(tiny_config(out, cache, "optim.epochs=1"))
    model, cfg = load_backbone(out / "checkpoint.pth", backend="torch")
    assert cfg["model"]["arch"] == "swin_micro" and not model.training
    state = load_checkpoint(out / "checkpoint.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["teacher"][f"backbone.{k}"])
    student, _ = load_backbone(out / "checkpoint.pth", which="student")
    assert not torch.equal(student.norm.weight, model.norm.weight)
    with torch.no_grad():
        view, regions = model(torch.randn(1, 3, 32, 32))
        assert model.forward_return_n_last_blocks(torch.randn(1, 3, 32, 32), n=2).shape == (1, 256)
    assert view.shape == (1, 128) and regions.shape == (1, 4, 128)
    with pytest.raises(CheckpointError, match="holds a swin_micro backbone, not swin_tiny"):
        load_backbone(out / "checkpoint.pth", expect_arch="swin_tiny")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_backbone(out / "missing.pth")
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an esvit pretraining checkpoint"):
        load_backbone(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_backbone(tmp_path / "junk.pth")


def test_resume_refuses_another_configuration(tmp_path, cache):
    from esvit.errors import ConfigError

    out = tmp_path / "run"
    pretrain(tiny_config(out, cache, "optim.epochs=1"))
    with pytest.raises(ConfigError, match=r"another configuration \(head.out_dim: 256 -> 128\)"):
        pretrain(tiny_config(out, cache, "optim.epochs=2", "head.out_dim=128"))
    with pytest.raises(ConfigError, match="global batch of 16, this run has 8"):
        pretrain(tiny_config(out, cache, "optim.epochs=2", "optim.batch_size=8"))
    summary = pretrain(tiny_config(out, cache, "optim.epochs=2", "model.backend=torch"))  # allowed changes
    assert [e["epoch"] for e in summary["epochs"]] == [1]


def test_trainer_from_a_partial_config():
    from esvit.errors import ConfigError

    part = {"model": {"arch": "swin_micro", "window_size": 4, "backend": "torch"},
            "data": {"global_crop_size": 32, "local_crop_size": 16},
            "head": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}, "optim": {"batch_size": 2}}
    tr = Trainer(part, steps_per_epoch=2)
    assert tr.cfg["optim"]["lr"] == 5e-4 and tr.global_batch == 2
    assert tr.train_step(_crops(b=2)).loss > 0
    with pytest.raises(ConfigError, match="unknown config key optim.bs"):
        Trainer({"optim": {"bs": 2}}, steps_per_epoch=2)


def _nonfinite_in(path) -> list[str]:
    from esvit.checkpoint import named_tensors, nonfinite

    state = load_checkpoint(path)
    return nonfinite(named_tensors({k: state[k] for k in ("student", "teacher", "optimizer", "loss")}))


def test_a_nonfinite_update_is_never_checkpointed(tmp_path, cache):
    """The issue's repro: lr=1e6 checkpointed NaN weights (the loss, computed before the update, was still
    finite). The update is checked; the last good checkpoint stays; an old NaN checkpoint is refused."""
    from esvit.checkpoint import atomic_save
    from esvit.errors import CheckpointError

    out = tmp_path / "run"
    args = ("head.use_bn=true", "optim.lr=1e6", "optim.warmup_epochs=0", "train.save_every=1", "optim.epochs=2")
    with pytest.raises(TrainingError, match=r"update of iteration 1 .* made \d+ of the student's weights non-finite"
                                            r".*last good checkpoint .*checkpoint.pth \(epoch 0, step 1\) is kept"):
        pretrain(tiny_config(out, cache, *args))
    assert load_checkpoint(out / "checkpoint.pth")["iteration"] == 1
    assert _nonfinite_in(out / "checkpoint.pth") == []
    state = load_checkpoint(out / "checkpoint.pth")  # as an older version wrote it
    state["teacher"]["head.mlp.0.weight"][0, 0] = float("nan")
    atomic_save(state, out / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"non-finite values in 1 tensors \(e.g. teacher.head.mlp.0.weight"):
        pretrain(tiny_config(out, cache, *args))


def test_the_finiteness_check_is_exact():
    """The fused check (a global 2-norm) overflows on huge finite weights: those are not called non-finite."""
    part = {"model": {"arch": "swin_micro", "window_size": 4, "backend": "torch"},
            "data": {"global_crop_size": 32, "local_crop_size": 16},
            "head": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}, "optim": {"batch_size": 2}}
    tr = Trainer(part, steps_per_epoch=2)
    assert tr.nonfinite_state() == []
    with torch.no_grad():
        tr.student_module.head.mlp[0].weight[0, 0] = 1e30  # finite, but its square is not
        assert tr.nonfinite_state() == []
        tr.loss.region_center[0, 1] = float("nan")
        tr.teacher.backbone.norm.bias[2] = -float("inf")
    assert tr.nonfinite_state() == ["teacher.backbone.norm.bias", "loss.region_center"]


def test_global_norm_mixes_dtypes_and_devices():
    """Optimiser step counters (CPU, fp32) sit next to the weights (CUDA on a GPU, fp32 / bf16): the norm
    groups them (the first GPU run failed at the first save with 'Expected all tensors to be on the same
    device' from one torch.stack over every tensor's norm)."""
    from esvit.checkpoint import global_norm

    ts = [torch.full((3,), 2.0), torch.full((4,), 1.0, dtype=torch.bfloat16), torch.tensor(5.0, dtype=torch.float64)]
    want = (3 * 4.0 + 4 * 1.0 + 25.0) ** 0.5
    assert abs(global_norm(ts).item() - want) < 1e-5
    if torch.cuda.is_available():
        assert abs(global_norm([t.cuda() if i else t for i, t in enumerate(ts)]).item() - want) < 1e-5


def test_nonfinite_centers_are_never_checkpointed(tmp_path, cache, monkeypatch):
    """The centers (and optimiser state, teacher) are checked before every save, not only the student."""
    calls = {"n": 0}
    update = esvit.losses.EsViTLoss.update_centers

    def poisoned(self, *args):
        update(self, *args)
        calls["n"] += 1
        if calls["n"] == 6:  # the step of iteration 5 (epoch 1, step 2)
            self.center[0, 3] = float("inf")

    monkeypatch.setattr(esvit.losses.EsViTLoss, "update_centers", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"1 tensors .* non-finite at iteration 6 \(e.g. loss.center\); nothing "
                                            r"was saved.*checkpoint.pth \(epoch 1, step 1\) is kept"):
        pretrain(tiny_config(out, cache, "optim.epochs=2", "train.save_every=1"))
    assert load_checkpoint(out / "checkpoint.pth")["iteration"] == 5
    assert _nonfinite_in(out / "checkpoint.pth") == []


def test_a_fresh_run_starts_a_fresh_log(tmp_path, cache, capsys):
    out = tmp_path / "run"
    pretrain(tiny_config(out, cache, "optim.epochs=1"))
    old = (out / "log.jsonl").read_text()
    (out / "checkpoint.pth").unlink()  # what the error on a changed configuration advises
    pretrain(tiny_config(out, cache, "optim.epochs=1", "optim.lr=0.001"))
    assert "the earlier log.jsonl is kept as log.jsonl.1" in capsys.readouterr().out
    assert (out / "log.jsonl.1").read_text() == old
    assert len((out / "log.jsonl").read_text().splitlines()) == 1


def test_resuming_on_other_data(tmp_path, cache, capsys):
    """Data whose size changes the steps per epoch is refused (the checkpoint's epoch, step and schedule
    positions would not fit); another size with the same steps per epoch resumes, with a warning."""
    import esvit.checkpoint
    from esvit.data import make_dataset
    from esvit.errors import ConfigError

    for name, n in (("a", 64), ("fewer", 48), ("more", 70)):
        make_dataset(tmp_path / name, n, 4, image_size=48)
    out = tmp_path / "run"
    pretrain(tiny_config(out, cache, "optim.epochs=1", f"data.path={tmp_path / 'a'}"))
    message = (r"trained on 64 images \(4 steps per epoch at a global batch of 16\); .*fewer has 48 images \(3 steps "
               r"per epoch\).*resume with the data it was trained on")
    with pytest.raises(ConfigError, match=message):
        pretrain(tiny_config(out, cache, "optim.epochs=2", f"data.path={tmp_path / 'fewer'}"))
    capsys.readouterr()
    summary = pretrain(tiny_config(out, cache, "optim.epochs=2", f"data.path={tmp_path / 'more'}"))
    said = capsys.readouterr().out
    assert "the steps per epoch are the same, so it resumes" in said and "resuming on other data" in said
    assert [(e["epoch"], e["iteration"]) for e in summary["epochs"]] == [(1, 8)]
    assert summary["epochs"][0]["lr"] > 0
    state = load_checkpoint(out / "checkpoint.pth")  # as an older version wrote it, without the data size
    del state["dataset_size"], state["steps_per_epoch"]
    esvit.checkpoint.atomic_save(state, out / "checkpoint.pth")
    with pytest.raises(ConfigError, match=r"trained on data of another size .* has 48 images \(3 steps per epoch\)"):
        pretrain(tiny_config(out, cache, "optim.epochs=3", f"data.path={tmp_path / 'fewer'}"))


class _FillsUp:
    """A file whose disk fills up after ``room`` bytes (ENOSPC from its write, as a full disk gives)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_during_a_save(tmp_path, cache, capsys, monkeypatch):
    """ENOSPC while writing the second checkpoint: a one-line error saying the previous one is intact (torch.save
    turns the failed write into an opaque RuntimeError; the OSError is what is reported)."""
    import builtins

    import esvit.checkpoint
    from esvit.cli import main
    from tests.esvit_helpers import tiny_args

    opened = []

    def open_on_a_filling_disk(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (closed by the caller)
        if ".checkpoint.pth.tmp-" in str(file):
            opened.append(file)
            return _FillsUp(f, 10_000) if len(opened) == 2 else f
        return f

    monkeypatch.setattr(esvit.checkpoint, "open", open_on_a_filling_disk, raising=False)
    out = tmp_path / "run"
    assert main(tiny_args(out, cache, "optim.epochs=2")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(r"cannot write .*checkpoint.pth: No space left on device; the previous checkpoint "
                     r".*checkpoint.pth \(epoch 1, step 0\) is kept", err), err
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1
    assert not list(out.glob(".*.tmp-*"))


def test_atomic_save_reports_a_full_disk(tmp_path):
    """A real ENOSPC (the temp file is /dev/full): an OSError, the old file intact, no temp file left."""
    from esvit.checkpoint import atomic_save

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    path = tmp_path / "c.pth"
    atomic_save({"a": torch.ones(3)}, path)
    before = path.read_bytes()
    (tmp_path / f".c.pth.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(OSError) as info:
        atomic_save({"a": torch.randn(100_000)}, path)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and not list(tmp_path.glob(".c.pth.tmp-*"))


def test_remove_stale_temps_leaves_directories(tmp_path):
    from esvit.checkpoint import remove_stale_temps

    for name in (".checkpoint.pth.tmp-1", ".log.jsonl.tmp-2", ".write-test.tmp-3"):
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / ".embedded-v2-x.tmp-4").mkdir()  # someone's dataset in the making, not a write of ours
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == [".checkpoint.pth.tmp-1", ".log.jsonl.tmp-2",
                                                                    ".write-test.tmp-3"]
    assert [p.name for p in tmp_path.iterdir()] == [".embedded-v2-x.tmp-4"]


def test_determinism_sets_the_cublas_workspace_first(monkeypatch):
    """train.deterministic on a GPU: cuBLAS raises at the first matmul unless CUBLAS_WORKSPACE_CONFIG is set
    before its first use; enable_determinism sets it (keeping a user's value) before turning determinism on."""
    from esvit.train import enable_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        enable_determinism()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        enable_determinism()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_resume_treats_a_field_missing_from_an_older_checkpoint_as_its_default():
    from esvit.config import from_dict
    from esvit.errors import ConfigError
    from esvit.train import _check_resumable

    new = from_dict({})
    old = copy.deepcopy(new)
    del old["loss"]["region_center_momentum"], old["head"]["out_dim"]  # written before these fields existed
    assert _check_resumable(old, new, 1, 1) == []
    changed = from_dict({"head": {"out_dim": new["head"]["out_dim"] // 2}})
    with pytest.raises(ConfigError, match=r"head.out_dim: 65536 -> 32768"):
        _check_resumable(old, changed, 1, 1)
