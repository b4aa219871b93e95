"""Two CPU processes under torchrun (gloo) train to the same weights as one process with the same global batch,
BatchNorm heads included (synchronised over gloo)."""

from __future__ import annotations

import copy
import json
import re
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
    # head.use_bn as configs/demo_cpu.yaml: the BatchNorm statistics must be those of the global batch
    common = ("optim.epochs=2", "model.drop_path_rate=0", "train.save_every=3", "head.use_bn=true")
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
    # steps of ~1e-6, hence atol 1e-5 (one full step here is ~3e-4). The same holds, at full steps, for the
    # tensors BatchNorm makes invisible: the biases of the Linear layers feeding a BatchNorm (mlp.0, mlp.3),
    # the backbone's final norm bias (it only shifts those Linear outputs) and the running means that carry
    # them. Their gradient is rounding noise, so each of the 8 steps moves them up to ~lr in a random direction
    # (sum of lr: 1.4e-3): atol 3e-3. Without synchronised BatchNorm the other tensors differ too (> 1e-5).
    invisible = re.compile(r"(region_)?head\.mlp\.[03]\.bias|.*\.running_mean|backbone\.norm\.bias")
    for key in ("student", "teacher", "loss"):
        for name in a[key]:
            atol = 3e-3 if invisible.fullmatch(name) else 1e-5
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-4, atol=atol, msg=f"{key}.{name}")
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    assert [e["global_batch"] for e in logs[1]] == [16, 16]
    for e1, e2 in zip(*logs):
        assert e2["loss"] == pytest.approx(e1["loss"], rel=1e-4)


def test_sync_batchnorm_matches_batchnorm(tmp_path):
    """In a process group (here of one gloo process) SyncBatchNorm gives BatchNorm's outputs, gradients and
    running statistics (the 2-process equivalence is the test above)."""
    import torch.distributed as dist
    from torch import nn

    from esvit.distributed import SyncBatchNorm, convert_sync_batchnorm

    ref = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, momentum=0.3))
    sync = convert_sync_batchnorm(copy.deepcopy(ref), torch.device("cpu"))
    assert isinstance(sync[1], SyncBatchNorm) and sync.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(7, 6) * 3 + 2
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for _ in range(2):
            outs = [m(x) for m in (ref, sync)]
            for out in outs:
                (out * torch.arange(5.0)).pow(3).sum().backward()  # grads ~1e3
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
    for (name, p), q in zip(ref.named_parameters(), sync.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-3, msg=name)
    for name, buf in ref.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[name], buf, rtol=1e-5, atol=1e-6, msg=name)
    sync.eval()
    torch.testing.assert_close(sync(x), ref.eval()(x))
