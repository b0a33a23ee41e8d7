"""Storage helpers: credentials stay out of what is written beside the data."""

import json

from pipeline import manifest, storage

SECRET_OPTIONS = {
    "endpoint_url": "http://127.0.0.1:9000",
    "key": "AKIAEXAMPLE",
    "secret": "TOPSECRET",
    "token": "SESSIONTOKEN",
    "client_kwargs": {"region_name": "eu-west-1", "aws_secret_access_key": "TOPSECRET2", "aws_access_key_id": "A"},
    "account_key": "AZUREKEY",
    "anon": False,
}


def test_storage_credentials_are_redacted_everywhere_they_nest():
    doc = {"name": "r", "storage_options": SECRET_OPTIONS, "runs": [{"storage_options": json.dumps(SECRET_OPTIONS)}]}
    out = storage.redact_secrets(doc)
    text = json.dumps(out)
    for secret in ("AKIAEXAMPLE", "TOPSECRET", "SESSIONTOKEN", "AZUREKEY", '"A"'):
        assert secret not in text, secret
    kept = out["storage_options"]
    assert kept["endpoint_url"] == "http://127.0.0.1:9000" and kept["anon"] is False
    assert kept["client_kwargs"]["region_name"] == "eu-west-1"
    assert json.loads(out["runs"][0]["storage_options"])["key"] == storage.REDACTED
    assert doc["storage_options"]["key"] == "AKIAEXAMPLE"  # the caller's options are untouched


def test_manifests_and_trainer_configs_do_not_carry_credentials(tmp_path):
    m = manifest.build_manifest(
        str(tmp_path), "scrape", {"storage_options": SECRET_OPTIONS}, recipe={"storage_options": SECRET_OPTIONS}
    )
    assert "TOPSECRET" not in json.dumps(m) and m["recipe"]["storage_options"]["endpoint_url"].startswith("http")
    from training.train_clip import ClipTrainConfig
    from training.train_vae import VaeTrainConfig

    clip = ClipTrainConfig(data="s3://b/d", out=str(tmp_path / "c"), storage_options=json.dumps(SECRET_OPTIONS))
    vae = VaeTrainConfig(data="s3://b/d", out=str(tmp_path / "v"), storage_options=SECRET_OPTIONS)
    for cfg in (clip, vae):
        assert "TOPSECRET" not in cfg.to_json() and "127.0.0.1:9000" in cfg.to_json()
