"""Two CPU processes under torchrun (gloo) train to the same weights as one process with the same global batch."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from esvit.checkpoint import load_checkpoint
from esvit.cli import main
from esvit.data import ensure_embedded
from tests.esvit_helpers import PYTHON, subprocess_env, tiny_args


def test_two_process_ddp_equals_one_process(tmp_path, capsys):
    cache = tmp_path / "cache"
    ensure_embedded(cache, 64, 4, 48)  # generated once, before the processes race for it
    common = ("optim.epochs=2", "model.drop_path_rate=0", "train.save_every=3")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(tiny_args(tmp_path / "one", cache, *common, "optim.batch_size=16")) == 0
    finally:
        torch.set_num_threads(n)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "esvit",
           *tiny_args(tmp_path / "two", cache, *common, "optim.batch_size=8")]
    run = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    a = load_checkpoint(tmp_path / "one" / "checkpoint.pth")
    b = load_checkpoint(tmp_path / "two" / "checkpoint.pth")
    assert (b["world_size"], b["iteration"], len(b["rng"])) == (2, a["iteration"], 2)
    # equal up to float summation order; AdamW turns the rounding noise of gradients that are exactly zero in
    # exact arithmetic (the key part of the qkv bias: softmax ignores a constant added to every key) into
    # steps of ~1e-6, hence atol 1e-5 (one full step here is ~3e-4)
    for key in ("student", "teacher", "loss"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    assert [e["global_batch"] for e in logs[1]] == [16, 16]
    for e1, e2 in zip(*logs):
        assert e2["loss"] == pytest.approx(e1["loss"], rel=1e-4)
