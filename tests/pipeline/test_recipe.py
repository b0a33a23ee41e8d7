"""Recipes: the shipped ones validate; bad ones fail with one line naming the file and the field."""

import os
import subprocess
import sys

import pytest
import yaml

from pipeline.recipe import RecipeError, load_recipe, parse_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFESTS = os.path.join(ROOT, "manifests")

MINIMAL = "name: t\noutput: out\nsources:\n  - kind: url_list\n    path: urls.parquet\n"


def test_shipped_recipes_validate():
    demo = load_recipe(os.path.join(MANIFESTS, "demo.yaml"))
    assert demo.sources[0].kind == "demo_site" and demo.scrape.allow_private_network
    assert [t.kind for t in demo.train] == ["clip", "vae", "ldm"]
    web = load_recipe(os.path.join(MANIFESTS, "web-scale.example.yaml"))
    assert web.output.startswith("s3://")
    assert {s.kind for s in web.sources} == {"url_list", "warc"}
    assert web.curate.clip.model == "ViT-B-32" and web.curate.clip.pretrained == "laion2b_s34b_b79k"
    assert web.encode.vae == "stabilityai/sd-vae-ft-mse"
    assert web.runtime.task_runner == "dask" and web.runtime.dask_address.startswith("tcp://")
    assert not web.scrape.allow_private_network


def test_the_readme_recipe_is_a_valid_recipe():
    """README's annotated recipe, with its three ``...`` placeholders filled in, parses as it reads."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("```yaml\nname: demo") + len("```yaml\n")
    block = text[start : text.index("```", start)]
    block = block.replace(", ...}", "}").replace("[...]", "[a cat]").replace("pretrained: ...", "pretrained: x")
    recipe = parse_recipe(yaml.safe_load(block), "README.md")  # a YAML error in README fails here
    assert [s.kind for s in recipe.sources] == ["demo_site", "site", "url_list", "warc", "hf_dataset"]
    assert recipe.sources[2].path == "lists/part-{00..09}.parquet" and recipe.train[2].options == {"min_snr_gamma": 5}


def test_defaults_and_round_trip():
    r = parse_recipe({"name": "t", "output": "o", "sources": [{"kind": "site", "urls": ["https://example.com/"]}]})
    assert r.scrape.image_size == 256 and r.scrape.resize_mode == "keep_ratio" and not r.scrape.allow_private_network
    assert parse_recipe(r.model_dump()) == r


@pytest.mark.parametrize(
    "text, expected",
    [
        (MINIMAL + "scrape:\n  image_size: big\n", "scrape.image_size: Input should be a valid integer"),
        (MINIMAL + "scrape:\n  imagesize: 64\n", "scrape.imagesize: unknown field"),
        (MINIMAL + "scrape:\n  resize_mode: stretch\n", "scrape.resize_mode: Input should be"),
        (MINIMAL.replace("url_list", "ftp_dump"), "sources[0]: Input tag 'ftp_dump' found using 'kind'"),
        ("name: t\noutput: out\nsources: []\n", "sources: List should have at least 1 item"),
        ("name: t\nsources:\n  - {kind: warc, paths: [a.warc]}\n", "output: Field required"),
        (
            MINIMAL + "curate:\n  clip: {model: ViT-B-32}\n  min_score: 0.3\n  keep_fraction: 0.3\n",
            "curate: give min_score or keep_fraction, not both",
        ),
        (MINIMAL + "runtime: {task_runner: dask}\n", "runtime: task_runner 'dask' needs dask_address"),
        (
            MINIMAL + "runtime: {dask_address: 'tcp://127.0.0.1:8786'}\n",
            "runtime: dask_address is only used with task_runner: dask, not 'local'",
        ),
        (MINIMAL + "train:\n  - {kind: ldm, config: tiny}\n", "train[0].steps: Field required"),
        (
            MINIMAL + "encode: {vae: v, text_encoder: {model: m}, device: gpu}\n",
            "encode.device: String should match pattern",
        ),
        (MINIMAL + "curate:\n  clip: {model: m}\n  device: cuda0\n", "curate.device: String should match"),
        (
            MINIMAL + "generate: {prompts: [a red circle], guidance_interval: [900, 100]}\n",
            "generate: guidance_interval must be [lo, hi] with 0 <= lo <= hi < 1000, got [900, 100]",
        ),
        (MINIMAL + "generate: {prompts: [x], guidance_interval: [1, 2, 3]}\n", "generate.guidance_interval: Tuple"),
        (MINIMAL + "generate: {prompts: [x], guidance_interval: [200, 1000]}\n", "0 <= lo <= hi < 1000"),
        (MINIMAL + "generate: {prompts: [x], steps: 2000}\n", "generate.steps: Input should be less than or equal"),
        (MINIMAL + "generate: {prompts: [x], guidance: 0}\n", "generate.guidance: Input should be greater than 0"),
        (
            MINIMAL + "generate: {prompts: [x], seed: -1}\n",
            "generate.seed: Input should be greater than or equal to 0",
        ),
        (
            MINIMAL + "generate: {prompts: [x], seed: 18446744073709551616}\n",
            "generate.seed: Input should be less than",
        ),
        (  # the grid's last image (seed + 2 * 2 - 1) would need a seed past 2**64-1
            MINIMAL + "generate: {prompts: [x, y], n: 2, seed: 18446744073709551613}\n",
            "generate: seed 18446744073709551613 with 4 images needs seeds up to 18446744073709551616, past 2**64-1",
        ),
        (MINIMAL + "scrape: {max_aspect_ratio: .inf}\n", "scrape.max_aspect_ratio: Input should be a finite number"),
        (MINIMAL.replace("output: out", "output: ''"), "output: String should have at least 1 character"),
        (MINIMAL.replace("output: out", "output: '   '"), "output: '   ': blank or padded"),
        (MINIMAL.replace("output: out", "output: 'out '"), "'out ': blank or padded with whitespace"),
        (MINIMAL + "models: ' runs'\n", "models: ' runs': blank or padded"),
        (  # each of these failed only after the whole scrape
            MINIMAL + "curate:\n  clip: {model: micro-rn, pretrained: 'train:clip'}\n",
            "curate.clip.pretrained: 'train:clip' needs a clip run trained before that stage",
        ),
        (
            MINIMAL + "curate:\n  clip: {model: micro-rn, pretrained: 'train:clip'}\n"
            "train:\n  - {kind: clip, config: micro-rn, steps: 5, data: curated}\n",
            "needs a clip run trained before that stage (a train entry of kind clip on 'scraped' data)",
        ),
        (
            MINIMAL + "train:\n  - {kind: ldm, config: tiny, steps: 5}\n",
            "reads 'latents' data, but the recipe has no encode",
        ),
        (MINIMAL + "generate: {prompts: [a red circle]}\n", "generate: needs an ldm training run"),
        (
            MINIMAL + "train:\n  - {kind: vae, config: tiny, steps: 5, options: {'latent noise': 0.3}}\n",
            "train[0]: options: 'latent noise' is not a trainer setting name",
        ),
        ("name: t\n  output: [\n", "YAML syntax error"),
        ("- just\n- a list\n", "a recipe must be a YAML mapping"),
    ],
)
def test_bad_recipes_fail_with_one_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    assert expected in msg


def test_missing_recipe(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_floats_in_exponent_notation_are_numbers_not_strings(tmp_path):
    path = tmp_path / "r.yaml"  # PyYAML alone (YAML 1.1) reads 1e-4 and -1e-05 as strings: they need a dot there
    path.write_text(MINIMAL + "train:\n  - {kind: vae, config: tiny, steps: 5, lr: 2e-3,\n"
                    "     options: {latent_noise: 1e-3, kl_weight: -1e-05, note: '1e-4', tag: 1e5x}}\n")  # fmt: skip
    run = load_recipe(str(path)).train[0]
    assert run.lr == 0.002 and run.options["latent_noise"] == 0.001 and run.options["kl_weight"] == -1e-05
    assert run.options["note"] == "1e-4" and run.options["tag"] == "1e5x"  # quoted or not a number: text


def test_a_key_written_twice_is_refused_with_its_line(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``train:`` list silently dropped the first."""
    path = tmp_path / "dup.yaml"
    path.write_text(
        MINIMAL + "train:\n  - {kind: clip, config: tiny, steps: 5}\ntrain:\n  - {kind: vae, config: tiny, steps: 5}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(str(path))
    assert str(e.value) == f"{path}:8:1: duplicate key 'train'"
    path.write_text(MINIMAL + "scrape: {image_size: 32, processes: 1, image_size: 64}\n")  # nested, flow style
    with pytest.raises(RecipeError, match=r"dup\.yaml:6:40: duplicate key 'image_size'$"):
        load_recipe(str(path))
    path.write_text(MINIMAL + "train:\n  - &t {kind: clip, config: tiny, steps: 5}\n  - {<<: *t, steps: 7}\n")
    assert [r.steps for r in load_recipe(str(path)).train] == [5, 7]  # a merge key's values may be overridden


def test_cli_reports_bad_recipe_in_one_line_without_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + "scrape:\n  processes: -3\n")
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert f"{path}: scrape.processes: Input should be greater than 0" in lines[0]
    ok = subprocess.run(
        [sys.executable, "-m", "flows.cli", "validate", os.path.join(MANIFESTS, "demo.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0 and "ok" in ok.stdout


def test_multi_node_runs_need_a_rendezvous_and_unset_batch_and_lr_stay_unset():
    base = {"name": "t", "output": "o", "sources": [{"kind": "demo_site"}]}
    with pytest.raises(RecipeError, match=r"train\[0\]: nnodes 2 needs rdzv_endpoint") as err:
        parse_recipe({**base, "train": [{"kind": "clip", "config": "micro", "steps": 1, "nnodes": 2}]})
    assert "\n" not in str(err.value)
    run = parse_recipe({**base, "train": [{"kind": "vae", "config": "tiny", "steps": 1}]}).train[0]
    assert run.batch_size is None and run.lr is None  # the trainer's defaults, as for `altforge train vae`
