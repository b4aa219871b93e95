"""The esvit command: help, make-dataset, clear errors on bad input, and surviving SIGKILL mid-checkpoint."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from esvit.checkpoint import load_checkpoint
from esvit.cli import main
from esvit.config import SCHEMA
from esvit.data import make_dataset, render_image
from tests import esvit_helpers
from tests.esvit_helpers import PYTHON, REPO, subprocess_env, tiny_args

cache = esvit_helpers.cache  # fixture
one_thread = esvit_helpers.one_thread  # fixture


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pretrain", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--arch", "--data", "--output", "--epochs", "--batch-size", "--device", "--backend",
                 "--seed", "--save-every"):
        assert flag in text
    for section, fields in SCHEMA.items():
        for key in fields:
            assert f"{section}.{key} =" in text


def test_make_dataset_command(tmp_path, capsys):
    assert main(["make-dataset", str(tmp_path / "d"), "--num-images", "30", "--num-classes", "3",
                 "--val-fraction", "0.2", "--image-size", "32"]) == 0
    assert "24 train / 6 val" in capsys.readouterr().out
    assert len(list((tmp_path / "d" / "val").rglob("*.png"))) == 6
    assert main(["make-dataset", str(tmp_path / "e"), "--num-images", "30", "--num-classes", "40"]) == 2
    assert "between 1 and 10 for textures" in capsys.readouterr().err
    assert main(["make-dataset", str(tmp_path / "f"), "--num-images", "30", "--num-classes", "12", "--kind", "shapes",
                 "--image-size", "32"]) == 0
    assert (tmp_path / "f" / "train" / "11_hexagon_solid").is_dir()


def _bad_folders(root: Path) -> dict[str, Path]:
    (root / "empty").mkdir()
    (root / "afile").write_text("x")
    only_bad = root / "only_bad" / "cls"
    only_bad.mkdir(parents=True)
    (only_bad / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    mixed = root / "mixed"
    make_dataset(mixed, 20, 2, image_size=32)
    (mixed / "train" / "00_stripes" / "00_stripes_000002.png").write_bytes(b"garbage")
    return {"empty": root / "empty", "file": root / "afile", "only_bad": root / "only_bad",
            "mixed": mixed, "missing": root / "missing"}


@pytest.mark.parametrize("case,extra,message", [
    ("empty", [], "no images"),
    ("missing", [], "does not exist"),
    ("file", [], "not a directory"),
    ("only_bad", [], r"cannot read image .*a\.png"),
    ("mixed", ["optim.batch_size=20"], r"cannot read image .*000002\.png"),
    ("mixed", ["optim.batch_size=64"], "fewer than one global batch"),
    ("mixed", ["optim.lrr=1"], r"unknown config key optim\.lrr \(did you mean optim\.lr\?\)"),
    ("mixed", ["optimizer.lr=1"], "unknown config section 'optimizer'"),
    ("mixed", ["optim.lr=fast"], "optim.lr must be a number"),
    ("mixed", ["optim.lr=inf"], "optim.lr must be a finite number, got .inf"),
    ("mixed", ["loss.teacher_temp=.inf"], "loss.teacher_temp must be a finite number, got inf"),
    ("mixed", ["--arch", "deit_small", "data.local_crop_size=8"],
     r"data.local_crop_size = 8 px is smaller than one patch of deit_small \(16 px\)"),
    ("mixed", ["data.global_crop_size=2"], "smaller than one patch of swin_micro"),
    ("mixed", ["data.embedded_kind=faces"], "data.embedded_kind must be one of textures, shapes"),
    ("mixed", ["data.embedded_classes=11"], r"data.embedded_classes must be in \[1, 10\] for the textures dataset"),
    ("mixed", ["data.blur=maybe"], "data.blur must be"),
])
def test_bad_input_gives_a_clear_error(tmp_path, cache, capsys, case, extra, message):
    folders = _bad_folders(tmp_path)
    rc = main(tiny_args(tmp_path / "out", cache, "--data", str(folders[case]), *extra))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "esvit pretrain: error:" in err and "Traceback" not in err
    assert re.search(message, err), err


def test_unknown_key_in_yaml_and_base_include(tmp_path, cache, capsys):
    (tmp_path / "base.yaml").write_text("optim:\n  epochs: 3\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  window: 7\n")
    rc = main(tiny_args(tmp_path / "out", cache, "--config", str(tmp_path / "child.yaml")))
    err = capsys.readouterr().err
    assert rc == 2 and "child.yaml: unknown config key model.window (did you mean model.window_size?)" in err
    from esvit.config import load_config

    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel:\n  window_size: 14\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.lr=1e-3"])
    assert (cfg["optim"]["epochs"], cfg["model"]["window_size"], cfg["optim"]["lr"]) == (3, 14, 1e-3)


def test_config_refuses_non_finite_numbers():
    """inf passed the range checks (inf >= 0, inf > 0) of lr and the temperatures; nan of none."""
    from esvit.config import ConfigError, load_config, validate

    floats = [f"{s}.{k}" for s, fields in SCHEMA.items() for k, f in fields.items() if f.type.endswith("float")]
    assert {"optim.lr", "loss.student_temp", "loss.teacher_temp", "loss.warmup_teacher_temp"} <= set(floats)
    for key in floats:
        for value in ("inf", "-inf", "nan", ".inf", ".nan"):
            with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
                validate(load_config(None, [f"{key}={value}"]))
    with pytest.raises(ConfigError, match="data.global_crops_scale must be a pair of finite numbers"):
        load_config(None, ["data.global_crops_scale=[0.4, nan]"])


def test_every_preset_validates():
    from esvit.config import load_config, validate

    presets = sorted((REPO / "configs").glob("*.yaml"))
    assert len(presets) >= 13
    for p in presets:
        validate(load_config(p))


def test_view_only_is_the_official_loss_however_asked(tmp_path):
    """region_weight 0 -- as an override of a 0.8 / 0.2 preset, in a YAML, or with a view_weight of its own --
    trains the official view-only loss (view_weight 1.0); the *_v.yaml presets say the same."""
    from esvit.config import load_config, validate
    from esvit.train import Trainer

    demo = REPO / "configs" / "demo_cpu.yaml"
    assert validate(load_config(demo))["loss"]["view_weight"] != 1.0  # the override below has work to do
    yaml_v = tmp_path / "v.yaml"
    yaml_v.write_text(f"base: {demo}\nloss:\n  view_weight: 0.3\n  region_weight: 0\n")
    for cfg in (validate(load_config(demo, ["loss.region_weight=0"])), validate(load_config(yaml_v)),
                validate(load_config(None, ["loss.region_weight=0.0", "loss.view_weight=0.5"])),
                validate(load_config(REPO / "configs" / "swin_tiny_w7_v.yaml"))):
        assert (cfg["loss"]["view_weight"], cfg["loss"]["region_weight"]) == (1.0, 0.0)
    cfg = validate(load_config(demo, ["loss.region_weight=0", "head.out_dim=16", "head.hidden_dim=8",
                                      "head.bottleneck_dim=4"]))
    cfg["loss"]["view_weight"] = 0.5  # a config dict built by hand: the loss itself applies the rule too
    trainer = Trainer(cfg, steps_per_epoch=1)
    assert trainer.loss.view_weight == 1.0 and not trainer.loss.use_region
    assert validate(load_config(demo, ["loss.region_weight=0.5", "loss.view_weight=0.5"]))["loss"]["view_weight"] \
        == 0.5


_KILL_DURING_SAVE = textwrap.dedent("""
    import io, sys, time, torch
    save = torch.save
    def stalled(obj, f, *a, **k):  # write half the checkpoint, then hang: the parent SIGKILLs us here
        buf = io.BytesIO()
        save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        open(sys.argv[1], "w").close()
        time.sleep(600)
    torch.save = stalled
    from esvit.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_sigkill_while_writing_checkpoint_resumes_from_previous(tmp_path, cache, capsys):
    """A run killed mid-save: the previous checkpoint is intact; while it lived, a second run on its directory
    was refused; once dead, its lock does not block the resumption."""
    out = tmp_path / "run"
    args = tiny_args(out, cache, "optim.epochs=2", "train.save_every=2")
    assert main(args[:] + ["optim.epochs=1"]) == 0  # first epoch: checkpoint.pth at epoch 1
    before = (out / "checkpoint.pth").read_bytes()
    marker = tmp_path / "writing"
    proc = subprocess.Popen([PYTHON, "-c", _KILL_DURING_SAVE, str(marker), *args], env=subprocess_env(),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the child never started writing a checkpoint"
        time.sleep(0.1)
    # the stalled run holds the directory: a second run is refused, naming it
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search(rf"pretrain: error: .*/run is in use by another esvit pretrain \(pid {proc.pid} on "
                     rf"{re.escape(socket.gethostname())}, started 20\d\d-", err), err
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(out.glob(".checkpoint.pth.tmp-*")), "a partial temp file was expected"
    assert (out / "checkpoint.pth").read_bytes() == before  # untouched by the killed write
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1
    capsys.readouterr()
    assert main(args) == 0  # the same command resumes and finishes
    assert "resuming from" in capsys.readouterr().out
    final = load_checkpoint(out / "checkpoint.pth")
    assert (final["epoch"], final["iteration"]) == (2, 8)
    assert not list(out.glob(".checkpoint.pth.tmp-*"))


def test_python_dash_m_esvit(tmp_path):
    run = subprocess.run([PYTHON, "-m", "esvit", "make-dataset", str(tmp_path / "d"), "--num-images", "4",
                          "--num-classes", "2", "--image-size", "16"], env=subprocess_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "d" / "train").rglob("*.png"))) == 4
    assert render_image(0, 0, 16).size == (16, 16)
    assert sys.executable == PYTHON


@pytest.mark.parametrize("extra,message", [
    (["--num-workers", "-1"], "esvit demo: error: --num-workers must be >= 0"),
    (["--epochs", "0"], "esvit demo: error: .*--epochs >= 1"),
    (["--device", "gpu"], "argument --device: must be auto, cpu, cuda or cuda:N"),
])
def test_demo_checks_its_arguments_before_any_work(tmp_path, capsys, extra, message):
    try:
        rc = main(["demo", "--output", str(tmp_path / "demo"), "--no-progress", *extra])
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    assert rc == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "demo").exists()


_KILL_AT_EPOCH_END = textwrap.dedent("""
    import os, signal, sys
    import esvit.checkpoint as ckpt
    save = ckpt.atomic_save
    def dies(state, path):  # SIGKILL around the epoch-1 checkpoint, on one side or the other of its rename
        if state["epoch"] == 1 and state["step_in_epoch"] == 0 and sys.argv[1] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        save(state, path)
        if state["epoch"] == 1 and state["step_in_epoch"] == 0 and sys.argv[1] == "after":
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.atomic_save = dies
    from esvit.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("when", ["before", "after"])
def test_sigkill_at_the_epoch_checkpoint_loses_no_log_line(tmp_path, cache, capsys, when):
    """SIGKILL just before / just after the epoch's checkpoint is renamed into place: every epoch of the
    checkpoint is in log.jsonl, and the resumed run's log has each epoch exactly once."""
    import json

    out = tmp_path / "run"
    args = tiny_args(out, cache, "optim.epochs=2", "train.save_every=2")
    proc = subprocess.run([PYTHON, "-c", _KILL_AT_EPOCH_END, when, *args], env=subprocess_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    epochs = [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()]
    state = load_checkpoint(out / "checkpoint.pth")
    assert (state["epoch"], state["step_in_epoch"]) == ((1, 0) if when == "after" else (0, 2))
    assert epochs == [0]  # the line of epoch 0 is written before its checkpoint
    assert main(args) == 0
    final = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in final] == [0, 1]
    assert load_checkpoint(out / "checkpoint.pth")["log"] == final


def test_unwritable_output_is_a_clear_error(tmp_path, cache, capsys, monkeypatch):
    """Files cannot be created in --output (root ignores permission bits, so EACCES is simulated): a one-line
    error before the data (here missing) is looked at."""
    import builtins
    import errno
    import io

    out = tmp_path / "out"
    out.mkdir()

    def refuse(real):
        def opener(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and Path(file).resolve().is_relative_to(out.resolve()):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real(file, *args, **kwargs)
        return opener

    for mod, name in ((os, "open"), (builtins, "open"), (io, "open")):
        monkeypatch.setattr(mod, name, refuse(getattr(mod, name)))
    rc = main(tiny_args(out, cache, "--data", str(tmp_path / "missing")))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"cannot write to the output directory {out} (Permission denied); pass a writable --output" in err


@pytest.mark.parametrize("backend,message", [
    ("cuda", "model.backend = 'cuda' cannot run here: window_attention: backend 'cuda' is unavailable"),
    ("triton", "model.backend = 'triton' cannot run here: .*set TRITON_INTERPRET=1"),
])
def test_unavailable_backend_is_refused_before_the_data(tmp_path, cache, capsys, monkeypatch, backend, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    rc = main(tiny_args(tmp_path / "out", cache, "--data", str(tmp_path / "missing"), "--backend", backend))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "does not exist" not in err, err
    assert re.search(message, err), err
    assert "use --backend auto (or torch)" in err
