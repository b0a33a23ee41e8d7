"""Evaluation: recall and zero-shot on cases known by construction, and on a tiny model trained here."""

import pytest
import torch
from safetensors.torch import load_file

from training.evaluate import (
    ZeroShotTask,
    demo_colour,
    evaluate_clip,
    load_eval_set,
    retrieval_recall,
    zero_shot_accuracy,
)
from training.models import create_clip, get_tokenizer
from training.synthetic import write_demo_shards
from training.train_clip import ClipTrainConfig, make_eval_image, train

torch.set_num_threads(1)


def test_identical_features_give_perfect_recall_and_permutations_do_not():
    feats = torch.nn.functional.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    r = retrieval_recall(feats, feats)
    assert all(v == 1.0 for v in r.values())
    shifted = retrieval_recall(feats, feats.roll(1, dims=0), ks=(1,))
    assert shifted["image_to_text_R@1"] == 0.0 and shifted["text_to_image_R@1"] == 0.0


def test_recall_at_k_counts_rank_exactly():
    img = torch.eye(3)
    # image 0's partner text is its 2nd best match, image 1's is 3rd best, image 2's is best
    sim_txt = torch.tensor([[0.5, 0.9, 0.1], [0.3, 0.2, 0.25], [0.0, 0.0, 1.0]])  # rows: images, cols: texts
    r = retrieval_recall(img, sim_txt.T)  # image i . text j = sim_txt[i, j]
    assert r["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert r["image_to_text_R@5"] == 1.0
    # texts: text 0's best image is 0 (0.5 > 0.3), text 1's partner image 1 scores 0.2 < 0.9, text 2's is best
    assert r["text_to_image_R@1"] == pytest.approx(2 / 3)


def test_zero_shot_accuracy_by_construction():
    classes = torch.eye(4)
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    assert zero_shot_accuracy(classes[labels], classes, labels) == 1.0
    assert zero_shot_accuracy(classes[labels], classes, (labels + 1) % 4) == 0.0


def test_zero_shot_and_retrieval_on_a_tiny_trained_model(tmp_path):
    write_demo_shards(str(tmp_path / "train"), 2000, seed=0, size=32, per_shard=500)
    write_demo_shards(str(tmp_path / "eval"), 300, seed=1, size=32, per_shard=300, p_two=0.0)
    cfg = ClipTrainConfig(
        data=str(tmp_path / "train"),
        out=str(tmp_path / "run"),
        model="micro",
        steps=150,
        batch_size=64,
        lr=5e-3,
        warmup_steps=10,
        workers=0,
        threads=1,
        progress=False,
        save_every=0,
        eval_data=str(tmp_path / "eval"),
    )
    final = train(cfg)["eval"][-1]
    assert final["zeroshot_colour"] > 0.5  # chance 0.1
    assert final["image_to_text_R@5"] > 5 * 5 / 300 and final["text_to_image_R@5"] > 5 * 5 / 300
    # the same numbers from a model built fresh and loaded from the export
    model = create_clip("micro")
    model.load_state_dict(load_file(str(tmp_path / "run" / "open_clip_model.safetensors")))
    data = load_eval_set(str(tmp_path / "eval"), make_eval_image("micro"))
    task = ZeroShotTask(
        "colour",
        ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "white", "black"),
        ("a {} shape",),
        demo_colour,
    )
    again = evaluate_clip(model, get_tokenizer("micro"), data, [task], "cpu")
    assert again["image_to_text_R@5"] == final["image_to_text_R@5"]
    assert again["zeroshot_colour"] > 0.3
    untrained = evaluate_clip(create_clip("micro"), get_tokenizer("micro"), data, [task], "cpu")
    assert untrained["image_to_text_R@5"] < final["image_to_text_R@5"]
