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


def test_labels_of_metadata_in_another_form_are_none():
    from training.evaluate import demo_shape

    one = {"attributes": {"shapes": [{"colour": "red", "shape": "circle"}]}}
    assert (demo_colour(one), demo_shape(one)) == ("red", "circle")
    for meta in (
        {"attributes": None},
        {"attributes": []},
        {"attributes": {"shapes": None}},
        {"attributes": {"shapes": ["circle"]}},
        {"attributes": {"shapes": [{"shape": "circle"}]}},  # no colour
        {"attributes": {"shapes": [{"colour": 3}]}},
        [],
        None,
        {},
    ):
        assert demo_colour(meta) is None, meta


def test_bad_held_out_samples_are_counted_and_skipped(tmp_path):
    import io
    import tarfile

    from PIL import Image

    root = tmp_path / "eval"
    write_demo_shards(str(root), 10, seed=1, size=32, per_shard=10)
    bomb = io.BytesIO()
    Image.new("1", (16000, 12000)).save(bomb, "PNG")  # 192 Mpixel: PIL refuses it as a decompression bomb
    good = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(good, "PNG")
    extra = {
        "bomb": {"png": bomb.getvalue(), "txt": b"a red circle"},
        "cut": {"png": good.getvalue()[:60], "txt": b"a red circle"},  # truncated image
        "junk": {"png": b"not an image", "txt": b"a red circle"},
        "nullattrs": {"png": good.getvalue(), "txt": b"a red circle", "json": b'{"attributes": null}'},
        "badjson": {"png": good.getvalue(), "txt": b"a red circle", "json": b"{"},
        "notext": {"png": good.getvalue()},
    }
    with tarfile.open(root / "000001.tar", "w") as tar:
        for key, fields in extra.items():
            for ext, payload in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    data = load_eval_set(f"{root}/{{000000..000001}}.tar", make_eval_image("micro"))
    assert len(data.captions) == 11  # the 10 demo samples and the one whose attributes are null
    assert data.errors["decode_error"] == 4 and data.errors["missing_field"] == 1, data.errors
    task = ZeroShotTask("c", ("red",), ("{}",), demo_colour)  # colours other than red are left out, not a KeyError
    metrics = evaluate_clip(create_clip("micro"), get_tokenizer("micro"), data, [task], "cpu")
    assert metrics["retrieval_pairs"] == 11 and metrics["zeroshot_c_n"] <= 10


def test_the_held_out_set_is_read_with_the_storage_options(tmp_path, s3_bucket, monkeypatch):
    import fsspec

    prefix, so = s3_bucket
    write_demo_shards(str(tmp_path / "eval"), 6, seed=1, size=32, per_shard=4)  # two shards and their manifest
    fsspec.filesystem("s3", **so).put(str(tmp_path / "eval") + "/", f"{prefix}/eval/", recursive=True)
    # S3 without the storage options would be AWS's endpoint: a closed loopback port instead, so a call that dropped
    # them fails here and sends nothing off the machine
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    want = load_eval_set(str(tmp_path / "eval"), make_eval_image("micro"))
    got = load_eval_set(f"{prefix}/eval", make_eval_image("micro"), storage_options=so)  # listed from the manifest
    assert got.captions == want.captions and len(got.captions) == 6 and torch.equal(got.images, want.images)
    assert got.metas == want.metas and not got.errors
