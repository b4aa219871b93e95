"""k-NN and linear probe with known answers, feature extraction and gathering, eval data, the eval CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from esvit.cli import main
from esvit.errors import CheckpointError, ConfigError, DataError
from esvit.eval import eval_transform, gather_in_order, knn_classify, load_eval_model, train_linear_probe
from esvit.eval.data import EvalImageFolder, split_pair
from esvit.eval.knn import topk_neighbours
from tests import esvit_eval_helpers as helpers
from tests.esvit_eval_helpers import save_checkpoint

tiny_ckpt = helpers.tiny_ckpt  # fixtures
tiny_data = helpers.tiny_data
one_thread = helpers.one_thread

REPO = Path(__file__).resolve().parents[1]


def clusters(n: int, num_classes: int, dim: int = 16, spread: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)), dim=1)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g) / dim**0.5, y


def dino_knn(train_f, train_y, test_f, test_y, k, T, num_classes):
    """DINO's eval_knn.knn_classifier, unchunked: the oracle of the chunked implementation."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    sim = test_f @ train_f.T
    d, idx = sim.topk(k, dim=1)
    one_hot = torch.zeros(test_f.shape[0] * k, num_classes).scatter_(1, train_y[idx].view(-1, 1), 1)
    probs = (one_hot.view(test_f.shape[0], k, num_classes) * (d / T).exp().unsqueeze(-1)).sum(1)
    pred = torch.sort(probs, dim=1, descending=True, stable=True).indices
    correct = pred == test_y[:, None]
    return 100.0 * correct[:, 0].float().mean().item(), 100.0 * correct[:, :min(5, k)].any(1).float().mean().item()


# ------------------------------------------------------------------------------------------------ k-NN


def test_knn_separable_clusters_is_perfect():
    xt, yt = clusters(300, 6)
    xv, yv = clusters(120, 6, seed=1)
    res = knn_classify(xt, yt, xv, yv, ks=[1, 10, 20, 100], T=0.07, num_classes=6, chunk_size=7,
                       train_chunk_size=29)
    assert [r["k"] for r in res] == [1, 10, 20, 100]
    assert all(r["top1"] == 100.0 and r["top5"] == 100.0 for r in res)


def test_knn_shuffled_labels_is_chance():
    xt, yt = clusters(2000, 4, dim=8, spread=3.0)
    xv, yv = clusters(1000, 4, dim=8, spread=3.0, seed=1)
    yt = yt[torch.randperm(len(yt), generator=torch.Generator().manual_seed(3))]
    for r in knn_classify(xt, yt, xv, yv, ks=[20, 200], num_classes=4):
        assert abs(r["top1"] - 25.0) < 6.0, r


@pytest.mark.parametrize("chunk,train_chunk", [(1000, 100000), (13, 37), (1, 1)])
def test_knn_matches_dense_dino_reference(chunk, train_chunk):
    g = torch.Generator().manual_seed(5)
    xt, yt = torch.randn(150, 12, generator=g), torch.randint(0, 7, (150,), generator=g)
    xv, yv = torch.randn(40, 12, generator=g), torch.randint(0, 7, (40,), generator=g)
    res = knn_classify(xt, yt, xv, yv, ks=[1, 3, 20, 150], T=0.1, num_classes=7, chunk_size=chunk,
                       train_chunk_size=train_chunk)
    for r in res:
        top1, top5 = dino_knn(xt, yt, xv, yv, r["k"], 0.1, 7)
        assert r["top1"] == pytest.approx(top1) and r["top5"] == pytest.approx(top5), r


def test_topk_neighbours_chunked_equals_dense_with_ties():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s, i = topk_neighbours(q, bank, 3, bank_chunk_size=2)
    assert i.tolist() == [[0, 2, 4], [1, 3, 0]]  # equal similarities: lower bank index first
    assert torch.allclose(s, torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.8, 0.0]]))


def test_knn_caps_k_at_the_bank_and_rejects_bad_input():
    xt, yt = clusters(30, 3)
    res = knn_classify(xt, yt, xt, yt, ks=[200], num_classes=3)
    assert res[0]["k"] == 200 and res[0]["neighbours"] == 30
    with pytest.raises(ValueError, match="no test samples"):
        knn_classify(xt, yt, xt[:0], yt[:0], ks=[5])
    with pytest.raises(ValueError, match="empty"):
        knn_classify(xt[:0], yt[:0], xt, yt, ks=[5])
    with pytest.raises(ValueError, match="widths"):
        knn_classify(xt, yt, xt[:, :3], yt, ks=[5])


def test_knn_refuses_non_finite_temperature_and_features():
    xt, yt = clusters(30, 3)
    for T in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            knn_classify(xt, yt, xt, yt, ks=[5], T=T)
    bad = xt.clone()
    bad[4, 2] = float("nan")
    with pytest.raises(CheckpointError, match="1 of 30 training features are not finite"):
        knn_classify(bad, yt, xt, yt, ks=[5])
    with pytest.raises(CheckpointError, match="1 of 30 test features are not finite"):
        knn_classify(xt, yt, bad, yt, ks=[5])


def test_knn_small_temperature_does_not_overflow():
    """exp(cos / T) overflowed to inf for T = 1e-4: the classes of several neighbours tied at inf and the lowest
    class index won (17.5%, chance). As T -> 0 the nearest neighbour's vote dominates: k=20 must equal k=1."""
    xt, yt = clusters(300, 6, spread=2.0)
    xv, yv = clusters(120, 6, seed=1, spread=2.0)
    one, twenty = knn_classify(xt, yt, xv, yv, ks=[1, 20], T=1e-4, num_classes=6)
    assert twenty["top1"] == one["top1"] == 42.5


# -------------------------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_is_perfect():
    xt, yt = clusters(400, 5)
    xv, yv = clusters(200, 5, seed=1)
    res = train_linear_probe(xt, yt, xv, yv, 5, epochs=15, lrs=[0.1, 1.0], batch_size=64)
    assert res["top1"] == 100.0 and res["top5"] == 100.0
    assert {r["lr"] for r in res["per_lr"]} == {0.1, 1.0}


def test_linear_probe_random_labels_is_chance():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3000, 32, generator=g), torch.randint(0, 4, (3000,), generator=g)
    res = train_linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], 4, epochs=10, batch_size=128)
    assert 15.0 < res["top1"] < 33.0  # best of 10 epochs x 3 rates on 1000 samples of a 25% chance
    assert all(abs(r["final_top1"] - 25.0) < 6.0 for r in res["per_lr"])


def test_linear_probe_reports_a_diverged_rate_and_refuses_when_all_diverge():
    """An lr that blows the weights to inf/NaN scored chance without a word (and could be reported as best)."""
    xt, yt = clusters(200, 4)
    xv, yv = clusters(80, 4, seed=1)
    xt, xv = 10 * xt, 10 * xv  # features of norm ~10: lr 1e38 overflows float32 in the first epoch
    res = train_linear_probe(xt, yt, xv, yv, 4, epochs=3, lrs=[0.1, 1e38], batch_size=64)
    ok, blown = res["per_lr"]
    assert ok["diverged_epoch"] is None and blown["diverged_epoch"] == 1
    assert res["lr"] == 0.1 and res["top1"] == 100.0
    with pytest.raises(ConfigError, match=r"diverged .* at every learning rate \(1e\+38 in epoch 1\)"):
        train_linear_probe(xt, yt, xv, yv, 4, epochs=2, lrs=[1e38], batch_size=64)
    for lr in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="finite number > 0"):
            train_linear_probe(xt, yt, xv, yv, 4, epochs=1, lrs=[lr])
    bad = xt.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="1 of 200 training features are not finite"):
        train_linear_probe(bad, yt, xv, yv, 4, epochs=1)


# ---------------------------------------------------------------------------------------------- features


def test_extract_features_refuses_non_finite_features():
    from esvit.eval import extract_features

    x = torch.randn(6, 3)
    x[4] = float("nan")
    loader = [{"image": x[i:i + 2], "label": torch.zeros(2, dtype=torch.long), "index": torch.arange(i, i + 2)}
              for i in range(0, 6, 2)]
    assert extract_features(lambda t: t, loader[:2], "cpu", 4)[0].shape == (4, 3)
    with pytest.raises(CheckpointError, match="1 of 6 val features are not finite"):
        extract_features(lambda t: t, loader, "cpu", 6, desc="val features")


def test_gather_in_order_single_process():
    f, y, idx = torch.arange(12.0).view(6, 2), torch.tensor([5, 4, 3, 2, 1, 0]), torch.tensor([3, 0, 5, 1, 4, 2])
    out_f, out_y = gather_in_order(f, y, idx, 6)
    assert out_f[idx].equal(f) and out_y.tolist() == [4, 2, 0, 5, 1, 3]
    with pytest.raises(RuntimeError, match="exactly once"):
        gather_in_order(f[:5], y[:5], idx[:5], 6)


def test_eval_transform_scales_the_paper_crop():
    img = Image.new("RGB", (96, 80), (200, 10, 10))
    assert eval_transform(64)(img).shape == (3, 64, 64)
    assert eval_transform(224)(img).shape == (3, 224, 224)


def test_split_pair_aligns_classes_by_name(tmp_path, tiny_data):
    val = EvalImageFolder(tiny_data / "val", eval_transform(32))
    train, val2 = split_pair(tiny_data, tiny_data, eval_transform(32))
    assert train.root.name == "train" and val2.root.name == "val" and val2.classes == train.classes
    # a validation folder with a subset of the classes keeps the training label of each class
    sub = tmp_path / "val_sub"
    (sub / train.classes[2]).mkdir(parents=True)
    src = next((tiny_data / "val" / train.classes[2]).iterdir())
    (sub / train.classes[2] / src.name).write_bytes(src.read_bytes())
    ds = EvalImageFolder(sub, eval_transform(32), class_names=train.classes)
    assert ds.labels.tolist() == [2] and len(val) == 12
    (sub / "zebra").mkdir()
    Image.new("RGB", (8, 8)).save(sub / "zebra" / "z.png")
    with pytest.raises(DataError, match="zebra"):
        EvalImageFolder(sub, eval_transform(32), class_names=train.classes)


def test_eval_data_errors(tmp_path, tiny_data):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        split_pair(tiny_data, tmp_path / "empty", eval_transform(32))
    with pytest.raises(DataError, match="does not exist"):
        split_pair(tiny_data, tmp_path / "nope", eval_transform(32))
    from esvit.data.synthetic import make_dataset

    make_dataset(tmp_path / "noval", 8, 2, image_size=16)
    with pytest.raises(DataError, match="without a val/ split"):
        split_pair(tmp_path / "noval", tmp_path / "noval", eval_transform(32))


# ------------------------------------------------------------------------------------------------ models


def test_load_eval_model(tiny_ckpt):
    m = load_eval_model(tiny_ckpt)
    r = load_eval_model(tiny_ckpt, random_init=True, seed=3)
    r2 = load_eval_model(tiny_ckpt, random_init=True, seed=3)
    assert m.arch == r.arch == "swin_micro" and m.crop_size == r.crop_size == 32 and m.backend == "torch"
    assert not m.backbone.training and not any(p.requires_grad for p in m.backbone.parameters())
    w = "layers.0.blocks.0.attn.qkv.weight"
    sd, rsd = m.backbone.state_dict(), r.backbone.state_dict()
    assert not torch.equal(sd[w], rsd[w]) and torch.equal(rsd[w], r2.backbone.state_dict()[w])
    fresh = load_eval_model(random_init=True, arch="swin_micro", window_size=4, crop_size=48)
    assert fresh.crop_size == 48 and fresh.source.startswith("random init")


def test_load_eval_model_errors(tmp_path, tiny_ckpt):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_eval_model(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="not deit_small"):
        load_eval_model(tiny_ckpt, arch="deit_small")
    other = create_other_arch_ckpt(tmp_path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_eval_model(other)
    with pytest.raises(ConfigError, match="--arch"):
        load_eval_model(random_init=True)
    with pytest.raises(ConfigError, match="--checkpoint"):
        load_eval_model()


def test_load_eval_model_refuses_unusable_checkpoints(tmp_path, tiny_ckpt):
    """A checkpoint without config / with an unknown arch used to raise KeyError / ValueError tracebacks, and
    NaN weights evaluated at chance without a word."""
    broken = helpers.broken_checkpoints(tmp_path, tiny_ckpt)
    for name, path in broken.items():
        with pytest.raises(CheckpointError, match=helpers.BROKEN_MESSAGES[name]):
            load_eval_model(path)
    # the random-init baseline of a diverged run only needs its config; the student may still be finite
    assert load_eval_model(broken["nan_teacher"], random_init=True).arch == "swin_micro"
    assert load_eval_model(broken["nan_teacher"], which="student").arch == "swin_micro"


@pytest.mark.parametrize("kwargs,message", [
    ({"window_size": 0}, "window size must be an integer >= 1, got 0"),
    ({"crop_size": 0}, "crop size must be an integer >= 1, got 0"),
    ({"crop_size": 2}, r"a 2-px crop is smaller than one patch of swin_micro \(4 px\)"),
    ({"arch": "deit_small", "patch_size": 0}, "patch size must be an integer >= 1, got 0"),
    ({"arch": "deit_small", "crop_size": 8}, "smaller than one patch of deit_small"),
])
def test_random_init_refuses_unbuildable_models(kwargs, message):
    kwargs = {"arch": "swin_micro", "window_size": 4, "crop_size": 32} | kwargs
    with pytest.raises(ConfigError, match=message):
        load_eval_model(random_init=True, **kwargs)


def create_other_arch_ckpt(tmp_path: Path) -> Path:
    """A checkpoint whose config says swin_micro but whose weights are a ViT's."""
    from esvit.models import create_backbone

    vit = create_backbone("deit_small", img_size=32, embed_dim=32, depth=1, num_heads=1, patch_size=8)
    return save_checkpoint(tmp_path / "other.pth", backbone=vit)


# -------------------------------------------------------------------------------------------------- CLI


def test_cli_eval_knn_end_to_end(tmp_path, tiny_ckpt, tiny_data, capsys):
    out = tmp_path / "knn.json"
    rc = main(["eval-knn", "--checkpoint", str(tiny_ckpt), "--train-data", str(tiny_data), "--val-data",
               str(tiny_data), "--k", "5", "20", "--json", str(out), "--num-workers", "0", "--batch-size", "16",
               "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "k-NN (teacher of" in text and "top-1" in text
    res = json.loads(out.read_text())
    assert [r["k"] for r in res["results"]] == [5, 20]
    assert all(0.0 <= r["top1"] <= r["top5"] <= 100.0 for r in res["results"])
    assert res["num_train"] == 36 and res["num_val"] == 12 and res["num_classes"] == 4 and res["feature_dim"] == 128
    assert res["results"][1]["neighbours"] == 20


def test_cli_eval_knn_random_init_and_no_checkpoint(tmp_path, tiny_ckpt, tiny_data, capsys):
    for extra in (["--checkpoint", str(tiny_ckpt), "--random-init"],
                  ["--random-init", "--arch", "swin_micro", "--window-size", "4", "--crop-size", "32"]):
        out = tmp_path / "r.json"
        assert main(["eval-knn", *extra, "--train-data", str(tiny_data / "train"), "--val-data",
                     str(tiny_data / "val"), "--k", "3", "--json", str(out), "--num-workers", "0",
                     "--no-progress"]) == 0
        res = json.loads(out.read_text())
        assert res["random_init"] and res["source"].startswith("random init") and res["crop_size"] == 32


def test_cli_eval_linear_end_to_end(tmp_path, tiny_ckpt, tiny_data, capsys):
    out = tmp_path / "lin.json"
    rc = main(["eval-linear", "--checkpoint", str(tiny_ckpt), "--train-data", str(tiny_data), "--val-data",
               str(tiny_data), "--epochs", "3", "--lr", "0.1", "1", "--json", str(out), "--num-workers", "0",
               "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    # swin_micro, last 4 blocks: 2 of stage 2 (64-d) + 2 of stage 3 (128-d)
    assert res["feature_dim"] == 2 * 64 + 2 * 128 and res["epochs"] == 3 and len(res["per_lr"]) == 2
    assert 0.0 <= res["top1"] <= 100.0 and "best: top-1" in capsys.readouterr().out


@pytest.mark.parametrize("case,message", [
    ("missing", "no such checkpoint"),
    ("arch", "holds a swin_micro backbone, not resnet50"),
    ("other", "do not fit a swin_micro backbone"),
    ("empty_val", "no images"),
    ("no_model", "pass --checkpoint"),
    *helpers.BROKEN_MESSAGES.items(),
])
def test_cli_eval_bad_inputs_give_clear_errors(tmp_path, tiny_ckpt, tiny_data, capsys, case, message):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    model = {"missing": ["--checkpoint", str(tmp_path / "nope.pth")],
             "arch": ["--checkpoint", str(tiny_ckpt), "--arch", "resnet50"],
             "other": ["--checkpoint", str(create_other_arch_ckpt(tmp_path))],
             "empty_val": ["--checkpoint", str(tiny_ckpt)], "no_model": [],
             **{name: ["--checkpoint", str(path)] for name, path in
                helpers.broken_checkpoints(tmp_path, tiny_ckpt).items()}}[case]
    val = tmp_path / "empty" if case == "empty_val" else tiny_data
    for cmd in ("eval-knn", "eval-linear"):
        rc = main([cmd, *model, "--train-data", str(tiny_data), "--val-data", str(val), "--num-workers", "0",
                   "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and re.search(f"esvit {cmd}: error: .*{message}", err) and err.count("\n") == 1, err


@pytest.mark.parametrize("cmd,extra,message", [
    ("eval-knn", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("eval-knn", ["--num-workers", "-1"], "--num-workers >= 0"),
    ("eval-knn", ["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
    ("eval-knn", ["--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
    ("eval-knn", ["--json", "{tmp}"], "--json .* is a directory"),
    ("eval-knn", ["--json", "{file}/knn.json"], "cannot write --json .*: .*afile is a file, not a directory"),
    ("eval-knn", ["--save-features", "{file}/f.pt"], "cannot write --save-features .*afile is a file"),
    ("eval-linear", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("eval-linear", ["--num-workers", "-1"], "--num-workers >= 0"),
    ("eval-linear", ["--lr", "0.1", "inf"], "every --lr must be a finite number > 0, got 0.1 inf"),
    ("eval-linear", ["--lr", "nan"], "every --lr must be a finite number > 0"),
    ("eval-linear", ["--n-last-blocks", "0"], "--n-last-blocks must be >= 1"),
    ("eval-linear", ["--json", "{file}/x/lin.json"], "cannot write --json .*afile is a file"),
])
def test_cli_eval_argument_errors_come_before_any_work(tmp_path, tiny_ckpt, tiny_data, capsys, monkeypatch, cmd,
                                                       extra, message):
    """Tracebacks before (ValueError from the DataLoader), chance accuracy from a NaN temperature / inf lr, or
    an error only after the features were computed (--json, --save-features)."""
    import esvit.eval.runner as runner

    def no_work(*args, **kwargs):
        raise AssertionError("the backbone was built before the arguments were checked")

    monkeypatch.setattr(runner, "model_from_args", no_work)
    (tmp_path / "afile").write_text("x")
    extra = [e.format(tmp=tmp_path, file=tmp_path / "afile") for e in extra]
    rc = main([cmd, "--checkpoint", str(tiny_ckpt), "--train-data", str(tiny_data), "--val-data", str(tiny_data),
               "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(f"esvit {cmd}: error: .*{message}", err) and err.count("\n") == 1, err


def test_cli_eval_linear_diverged_rate_is_reported(tmp_path, tiny_ckpt, tiny_data, capsys):
    args = ["eval-linear", "--checkpoint", str(tiny_ckpt), "--train-data", str(tiny_data), "--val-data",
            str(tiny_data), "--epochs", "2", "--num-workers", "0", "--no-progress"]
    out = tmp_path / "new" / "dir" / "lin.json"  # missing directories are created
    assert main([*args, "--lr", "0.1", "3e38", "--json", str(out)]) == 0
    assert re.search(r"3e\+38 +diverged in epoch \d \(non-finite weights; not ranked\)", capsys.readouterr().out)
    res = json.loads(out.read_text())
    assert res["lr"] == 0.1 and [r["diverged_epoch"] is None for r in res["per_lr"]] == [True, False]
    assert main([*args, "--lr", "3e38"]) == 2
    err = capsys.readouterr().err
    assert "esvit eval-linear: error: the linear probe diverged" in err and err.count("\n") == 1


def test_device_must_be_a_device(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval-knn", "--train-data", "a", "--val-data", "b", "--device", "gpu"])
    assert exc.value.code == 2 and "argument --device: must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_torchrun_two_processes_shard_features_like_one(tmp_path, tiny_ckpt, tiny_data):
    """Two gloo processes each embed half of the images; the gathered result equals one process's."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = ["eval-knn", "--checkpoint", str(tiny_ckpt), "--train-data", str(tiny_data), "--val-data", str(tiny_data),
            "--k", "1", "5", "20", "--num-workers", "0", "--batch-size", "5", "--no-progress", "--device", "cpu"]
    one = tmp_path / "one.json"
    assert main([*args, "--json", str(one), "--save-features", str(tmp_path / "one.pt")]) == 0
    two = tmp_path / "two.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "esvit", *args, "--json", str(two), "--save-features", str(tmp_path / "two.pt")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert r1["results"] == r2["results"]
    f1, f2 = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for key in ("train", "val"):
        assert torch.allclose(f1[key], f2[key], atol=1e-5) and torch.equal(f1[f"{key}_labels"], f2[f"{key}_labels"])
    assert proc.stdout.count("k-NN (teacher") == 1  # only rank 0 prints
