"""`esvit demo` end to end at toy size: data, pretraining, evaluation of both backbones, pictures, report."""

from __future__ import annotations

import json

import yaml
from PIL import Image

from esvit.cli import main
from tests import esvit_eval_helpers as helpers

one_thread = helpers.one_thread  # fixture

TOY = ["model.window_size=4", "data.global_crop_size=32", "data.local_crop_size=16", "data.local_crops_number=2",
       "data.embedded_images=40", "data.embedded_classes=4", "data.embedded_image_size=48", "data.num_workers=0",
       "head.out_dim=128", "head.hidden_dim=32", "head.bottleneck_dim=16", "optim.batch_size=8", "optim.epochs=1"]


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--output", str(out), "--device", "cpu", "--backend", "torch", "--probe-epochs", "2",
            "--num-workers", "0", "--no-progress", *TOY]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "EsViT demo report" in text and "k-NN top-1, k=20" in text and "correspondence accuracy" in text
    assert "view only" in text and "L_R (pretrained = view + region loss" in text and "esvit ablate" in text
    report = json.loads((out / "report.json").read_text())
    assert report["arch"] == "swin_micro_conv" and report["crop_size"] == 32 and report["backend"] == "torch"
    assert report["epochs"] == 1 and report["wall_time_s"] >= report["pretrain_time_s"] > 0
    assert list(report["results"]) == ["pretrained", "view_only", "random_init"]
    for name in report["results"]:
        res = report["results"][name]
        assert [e["k"] for e in res["knn"]] == [10, 20, 100, 200]
        assert res["num_train"] == 32 and res["num_val"] == 8 and res["correspondence_images"] == 8
        assert 0.0 <= res["correspondence"] <= 1.0 and 0.0 <= res["linear"]["top1"] <= 100.0
    assert report["results"]["random_init"]["source"].startswith("random init")
    assert len(report["pictures"]) == 3
    for pic in report["pictures"]:
        with Image.open(pic) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert (out / "pretrain" / "checkpoint.pth").exists() and (out / "data" / "val").is_dir()
    view = yaml.safe_load((out / "pretrain_view" / "config.yaml").read_text())["loss"]  # the quick L_R ablation
    assert (view["view_weight"], view["region_weight"]) == (1.0, 0.0)
    # a second run reuses the data and the finished pretraining (the first ran both side by side on a multi-core
    # CPU, this one runs them one after the other in this process)
    assert main([*args, "--jobs", "1"]) == 0
    assert capsys.readouterr().out.count("already holds all 1 epochs") == 2
    assert main([*args, "--no-ablation"]) == 0
    assert "view_only" not in json.loads((out / "report.json").read_text())["results"]


def test_knn_verdict_needs_a_significant_difference():
    from esvit.eval.demo import knn_verdict

    assert "beats random init" in knn_verdict(60.0, 30.0, 400)
    assert "no significant difference" in knn_verdict(12.8, 10.8, 400)  # 2 points at chance level: noise
    assert "random init beats" in knn_verdict(10.0, 30.0, 400)
    assert "no significant difference" in knn_verdict(60.0, 30.0, 4)  # too few images to tell
