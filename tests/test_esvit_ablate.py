"""`esvit ablate` at toy size: the JSON schema, the PNG, the table, resuming (finished runs skipped) and the
refusal to mix runs of another configuration; the statistics helpers on hand-made numbers."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from PIL import Image

from esvit.cli import main
from esvit.config import load_config, validate
from esvit.eval.demo import REPO_CONFIGS
from tests import esvit_eval_helpers as helpers
from tests.test_esvit_demo import TOY

one_thread = helpers.one_thread  # fixture


def test_ablate_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["ablate", "--output", str(out), "--seeds", "2", "--device", "cpu", "--backend", "torch",
            "--probe-epochs", "2", "--corr-images", "4", "--num-workers", "0", "--no-progress", *TOY]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.count("pretraining") == 4 and text.count("random init") == 2
    assert "view+region - view" in text and "+-" in text
    result = json.loads((out / "ablation.json").read_text())
    assert [v["name"] for v in result["variants"]] == ["view", "view+region", "random"]
    for v in result["variants"]:
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        for r in v["runs"]:
            for key in ("knn_top1", "linear_top1", "correspondence"):
                assert isinstance(r[key], float) and 0.0 <= r[key] <= 100.0
            assert r["num_val"] == 8 and r["correspondence_images"] == 4
    assert result["loss_weights"]["view"] == {"view_weight": 1.0, "region_weight": 0.0}
    assert result["correspondence_chance"] == pytest.approx(100 / 4)  # 32 px -> a 2 x 2 final grid
    with Image.open(out / "ablation.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    # every variant is what it says: view-only at weight 1 without a region head, seeds differ
    cfg = {(v, s): yaml.safe_load((out / "runs" / v / f"seed{s}" / "config.yaml").read_text())
           for v in ("view", "view+region") for s in (0, 1)}
    preset = validate(load_config(REPO_CONFIGS / "demo_cpu.yaml"))["loss"]
    assert (cfg["view", 0]["loss"]["view_weight"], cfg["view", 0]["loss"]["region_weight"]) == (1.0, 0.0)
    assert cfg["view+region", 0]["loss"]["region_weight"] == preset["region_weight"] > 0
    assert result["loss_weights"]["view+region"]["view_weight"] == preset["view_weight"]
    assert [cfg["view", s]["train"]["seed"] for s in (0, 1)] == [0, 1]

    # a rerun skips every finished run and reports the same numbers
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.count("skipped") == 6 and "pretraining " not in text
    assert json.loads((out / "ablation.json").read_text())["variants"] == result["variants"]
    # a run without its result is redone (its finished pretraining reused), the others skipped
    (out / "runs" / "view" / "seed1" / "result.json").unlink()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.count("skipped") == 5 and "already holds all 1 epochs" in text
    # runs of another configuration are refused, not mixed in
    assert main([*args, "optim.lr=1e-3"]) != 0
    assert "another configuration" in capsys.readouterr().err


def test_ablate_checks_its_arguments(tmp_path, capsys):
    for extra, message in ((["--seeds", "0"], "--seeds must be >= 1"),
                           (["--variants", "view,bogus"], "unknown variant 'bogus'"),
                           (["--variants", "view+region", "loss.region_weight=0"], "needs a preset with")):
        assert main(["ablate", "--output", str(tmp_path / "x"), "--no-progress", *extra]) != 0
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any work


def test_summary_and_paired_differences():
    from esvit.eval.ablate import format_table, paired, summarise

    def runs(*vals):
        return [{"seed": s, "knn_top1": k, "linear_top1": k + 1, "correspondence": c} for s, (k, c) in enumerate(vals)]

    variants = [{"name": "view", "runs": runs((50.0, 20.0), (54.0, 22.0), (52.0, 21.0))},
                {"name": "view+region", "runs": runs((51.0, 30.0), (53.0, 33.0), (52.0, 24.0))},
                {"name": "random", "runs": runs((30.0, 10.0), (31.0, 11.0), (29.0, 12.0))}]
    stats = summarise(variants)
    assert stats["view"]["knn_top1"] == pytest.approx((52.0, 2.0))  # sample std (n - 1)
    assert stats["random"]["correspondence"] == pytest.approx((11.0, 1.0))
    d = paired(variants, "view+region", "view")
    assert d["seeds"] == [0, 1, 2] and d["knn_top1"] == [1.0, -1.0, 0.0] and d["correspondence"] == [10.0, 11.0, 3.0]
    assert paired(variants, "view+region", "missing") is None
    table = format_table({"variants": variants, "num_val": 300, "correspondence_chance": 6.25})
    assert "+10.0 +11.0 +3.0" in table and "52.0 +- 2.0" in table and math.isfinite(stats["view"]["linear_top1"][1])


def test_ablate_jobs_runs_pretrainings_side_by_side(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", "--output", str(out), "--seeds", "1", "--jobs", "2", "--device", "cpu", "--backend",
                 "torch", "--probe-epochs", "2", "--corr-images", "4", "--num-workers", "0", "--no-progress",
                 *TOY]) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert [(v["name"], [r["seed"] for r in v["runs"]]) for v in result["variants"]] == \
        [("view", [0]), ("view+region", [0]), ("random", [0])]
    for v in ("view", "view+region"):  # each child's output is kept with its run
        assert "epoch 1/1" in (out / "runs" / v / "seed0" / "pretrain.out").read_text()
        assert (out / "runs" / v / "seed0" / "checkpoint.pth").exists()
    assert main(["ablate", "--output", str(tmp_path / "y"), "--jobs", "0"]) != 0
    assert "--jobs >= 1" in capsys.readouterr().err
