"""The latent stage's output folder: the models, settings and source a rerun must match, and the empty embedding
kept whole."""

import json
import os
import shutil

import numpy as np
import pytest

from pipeline.latents import (
    ENCODE_CONFIG,
    EncodeConfig,
    latent_config,
    latent_info,
    latent_shards,
    read_empty_embedding,
)
from tests.pipeline.test_latents import write_source


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_source(tmp_path_factory.mktemp("src"))


def test_config_round_trip_and_validation():
    cfg = EncodeConfig(resolution=64, latent_mode="mean_logvar", flip=True, workers=2)
    assert EncodeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in ({"latent_mode": "sample"}, {"dtype": "int8"}, {"resolution": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            EncodeConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        EncodeConfig.from_dict({"resolutoin": 3})


def test_models_are_matched_by_checksum_not_by_path(tmp_path):
    from pipeline.latents import prepare_latents

    vae = {"ref": "/a/vae", "sha256": "1" * 64, "scaling_factor": 0.2, "latent_channels": 4, "downsample": 8}
    text = {"model": "local-dir:/a/clip", "pretrained": "/a/clip/w.safetensors", "sha256": "2" * 64, "width": 8}
    cfg = EncodeConfig(resolution=64)
    empty = np.zeros((4, 8), np.float32)
    prepare_latents(str(tmp_path), latent_config(cfg, vae, text, "bfloat16"), empty)
    moved = latent_config(cfg, {**vae, "ref": "/b/vae"}, {**text, "model": "local-dir:/b/clip"}, "bfloat16")
    prepare_latents(str(tmp_path), moved, empty)  # the same weights under another path
    assert latent_info(str(tmp_path))["vae"]["ref"] == "/b/vae"
    for changed, what in [
        (latent_config(cfg, {**vae, "sha256": "3" * 64}, text, "bfloat16"), "vae"),
        (latent_config(cfg, vae, {**text, "sha256": "4" * 64}, "bfloat16"), "text_encoder"),
        (latent_config(cfg, vae, text, "float32"), "compute_dtype"),
        (latent_config(EncodeConfig(resolution=64, flip=True), vae, text, "bfloat16"), "flip"),
    ]:
        with pytest.raises(ValueError, match=what):
            prepare_latents(str(tmp_path), changed, empty)


def test_another_or_rewritten_source_is_refused(source, tmp_path):
    from pipeline.latents import prepare_latents, source_record

    vae = {"ref": "/a/vae", "sha256": "1" * 64, "scaling_factor": 0.2, "latent_channels": 4, "downsample": 8}
    text = {"model": "m", "sha256": "2" * 64, "width": 8}
    config, empty = latent_config(EncodeConfig(resolution=64), vae, text, "float32"), np.zeros((4, 8), np.float32)
    src = str(tmp_path / "src")
    shutil.copytree(source, src)  # a copy: the test rewrites a shard's stamp
    plan = latent_shards(src)
    dst = str(tmp_path / "lat")
    prepare_latents(dst, config, empty, source=source_record(plan))
    prepare_latents(dst, config, empty, source=source_record(plan))  # the same source resumes
    first = next(iter(plan.values()))
    os.utime(first, (1, 1))  # the shard rewritten since (a re-curation in place)
    with pytest.raises(ValueError, match=r"other settings \(source\)"):
        prepare_latents(dst, config, empty, source=source_record(plan))
    with pytest.raises(ValueError, match="not a multiple of the VAE's 8x downsampling"):
        latent_config(EncodeConfig(resolution=60), vae, text, "float32")


def test_an_output_that_holds_another_dataset_is_refused(source, tmp_path):
    from pipeline.latents import prepare_latents

    vae = {"ref": "/a/vae", "sha256": "1" * 64, "scaling_factor": 0.2, "latent_channels": 4, "downsample": 8}
    config = latent_config(EncodeConfig(resolution=64), vae, {"model": "m", "sha256": "2" * 64, "width": 8}, "float32")
    before = open(os.path.join(source, "manifest.json")).read()
    with pytest.raises(ValueError, match="holds a dataset this stage did not write"):  # --out = the source
        prepare_latents(source, config, np.zeros((4, 8), np.float32))
    assert open(os.path.join(source, "manifest.json")).read() == before
    assert not os.path.exists(os.path.join(source, ENCODE_CONFIG))


def test_the_empty_embedding_is_written_whole_and_only_when_it_changes(tmp_path, monkeypatch):
    from pipeline import storage
    from pipeline.latents import EMPTY_EMBEDDING, prepare_latents

    vae = {"ref": "/a/vae", "sha256": "1" * 64, "scaling_factor": 0.2, "latent_channels": 4, "downsample": 8}
    config = latent_config(EncodeConfig(resolution=64), vae, {"model": "m", "sha256": "2" * 64, "width": 8}, "float32")
    dst, empty = str(tmp_path / "lat"), np.full((4, 8), 0.5, np.float32)
    path = os.path.join(dst, EMPTY_EMBEDDING)
    prepare_latents(dst, config, empty)
    before = os.stat(path)
    prepare_latents(dst, config, empty)  # a rerun: nothing to rewrite, so a kill now cannot cut it
    assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    write = storage.write_bytes

    def killed(url, data, storage_options=None):  # truncates the file it writes, then dies
        if EMPTY_EMBEDDING in url:
            open(url, "wb").close()
            raise KeyboardInterrupt("killed")
        write(url, data, storage_options)

    with monkeypatch.context() as m:
        m.setattr(storage, "write_bytes", killed)
        with pytest.raises(KeyboardInterrupt):
            prepare_latents(dst, config, empty * 2)
    assert np.array_equal(read_empty_embedding(dst), empty.astype(np.float16))  # the old one, whole
    open(path, "wb").close()  # what an older version killed mid-write left
    with pytest.raises(ValueError) as err:
        read_empty_embedding(dst)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value) and "rerun encode" in str(err.value)
    prepare_latents(dst, config, empty)
    assert np.array_equal(read_empty_embedding(dst), empty.astype(np.float16))
