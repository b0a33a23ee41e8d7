"""The judge: >= 98% colour and shape accuracy on held-out real renders, and a save/load round trip."""

import json

import pytest
import torch

from training.judge import (
    JUDGE_CONFIG,
    TRUST_ACCURACY,
    Judge,
    JudgeConfig,
    JudgeNet,
    accuracy,
    load_judge,
    render_labelled,
    save_judge,
)

torch.set_num_threads(1)


@pytest.fixture
def judge(trusted_judge):  # tests/training/conftest.py: 10000 scenes x 2 epochs, 1000 held-out renders
    return trusted_judge


def test_judge_is_trusted_on_held_out_real_renders(judge):
    r = judge.report
    assert r["colour_accuracy"] >= TRUST_ACCURACY and r["shape_accuracy"] >= TRUST_ACCURACY
    assert judge.trusted and r["trusted"] and r["n_eval"] == 1000
    # another held-out draw, measured here rather than taken from the report
    held = render_labelled(600, 32, seed=424242)
    again = accuracy(judge, *held)
    assert again["colour_accuracy"] >= TRUST_ACCURACY and again["shape_accuracy"] >= TRUST_ACCURACY
    # the metric can fail: the same images against shuffled labels are mostly wrong
    images, colour, shape = held
    perm = torch.randperm(len(colour), generator=torch.Generator().manual_seed(0))
    wrong = accuracy(judge, images, colour[perm], shape[perm])
    assert wrong["colour_accuracy"] < 0.3 and wrong["shape_accuracy"] < 0.4


def test_judge_reads_other_resolutions(judge):
    images, colour, shape = render_labelled(300, 64, seed=99)  # resized to 32 px inside predict
    r = accuracy(judge, images, colour, shape)
    assert r["colour_accuracy"] >= 0.95 and r["shape_accuracy"] >= 0.9


def test_save_load_round_trip(judge, tmp_path):
    save_judge(judge, tmp_path / "j")
    meta = json.loads((tmp_path / "j" / JUDGE_CONFIG).read_text())
    assert meta["config"]["n_train"] == 10000 and meta["report"]["shape_accuracy"] == judge.report["shape_accuracy"]
    loaded = load_judge(tmp_path / "j")
    assert loaded.cfg == judge.cfg and loaded.trusted
    images = render_labelled(64, 32, seed=7)[0]
    assert loaded.predict(images) == judge.predict(images)
    assert loaded.report["shape_accuracy"] == judge.report["shape_accuracy"]  # measured again on the same renders
    with pytest.raises(ValueError, match="not a judge directory"):
        load_judge(tmp_path / "missing")


def test_a_loaded_judge_is_trusted_on_its_weights_not_its_stored_report(tmp_path):
    torch.manual_seed(0)
    untrained = Judge(JudgeNet(8).eval(), JudgeConfig(width=8, n_eval=300), {})
    untrained.report = {"colour_accuracy": 0.99, "shape_accuracy": 0.99}  # a stale or edited report
    save_judge(untrained, tmp_path / "j")
    loaded = load_judge(tmp_path / "j")
    assert not loaded.trusted and loaded.report["shape_accuracy"] < 0.5
    assert loaded.report["stored_accuracy"] == {"colour_accuracy": 0.99, "shape_accuracy": 0.99}


@pytest.mark.parametrize("breakage", ["no report key", "other width", "corrupt weights", "not json"])
def test_broken_judge_directories_are_one_line_errors(tmp_path, breakage):
    save_judge(Judge(JudgeNet(8).eval(), JudgeConfig(width=8, n_eval=50), {}), tmp_path / "j")
    meta_path, weights = tmp_path / "j" / JUDGE_CONFIG, tmp_path / "j" / "judge.safetensors"
    meta = json.loads(meta_path.read_text())
    if breakage == "no report key":
        del meta["colours"]
    elif breakage == "other width":
        meta["config"]["width"] = 16
    meta_path.write_text(json.dumps(meta))
    if breakage == "corrupt weights":
        weights.write_bytes(b"\x01\x02")
    elif breakage == "not json":
        meta_path.write_text("{")
    with pytest.raises(ValueError) as e:
        load_judge(tmp_path / "j")
    assert str(e.value).startswith(str(tmp_path / "j")) and "\n" not in str(e.value)
