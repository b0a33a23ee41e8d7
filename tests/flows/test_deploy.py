"""Scheduled recipe runs: a cron deployment on a real Prefect server, and one triggered run of it served."""

import importlib
import os
import signal
import subprocess
import sys
import time

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.deploy import (
    apply_recipe_deployment,
    cron_schedule,
    deployment_name,
    read_deployment,
    trigger,
    wait_for_flow_run,
)
from tests.flows.conftest import stop
from tests.flows.test_scrape_flow import ROOT

RECIPE = """\
name: nightly
output: {out}
sources:
  - kind: demo_site
    images: 20
"""

# Stands in for flows.run.recipe_flow: same signature, reads the recipe, leaves a mark.
SMALL_FLOW = """\
from pathlib import Path

from prefect import flow

from pipeline.recipe import load_recipe


@flow(name="recipe-smoke")
def recipe_smoke(recipe_path: str, out: str | None = None) -> str:
    recipe = load_recipe(recipe_path)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "ran.txt").write_text(recipe.name)
    return recipe.name
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A recipe file and the small flow module, importable here and in subprocesses."""
    (tmp_path / "smoke_flows.py").write_text(SMALL_FLOW)
    recipe = tmp_path / "nightly.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "recipe-out"))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path, str(recipe), importlib.import_module("smoke_flows").recipe_smoke


@pytest.fixture
def api(prefect_server):
    """This process's Prefect client pointed at the test server."""
    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        yield prefect_server


def test_deployment_is_registered_with_its_cron_schedule(project, api):
    tmp_path, recipe, small_flow = project
    out = str(tmp_path / "runs")
    deployment_id = apply_recipe_deployment(recipe, "0 3 * * *", flow=small_flow, out=out)
    name = deployment_name(recipe, flow=small_flow)
    assert name == "recipe-smoke/nightly"

    d = read_deployment(name)
    assert d["id"] == deployment_id
    assert d["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC", "active": True}]
    assert d["parameters"] == {"recipe_path": recipe, "out": out}
    assert "nightly" in d["tags"]


def test_bad_schedules_and_recipes_fail_before_registering(project, tmp_path):
    _, recipe, small_flow = project
    with pytest.raises(ValueError, match=r"bad schedule '61 3 \* \* \*' \(UTC\): "):
        cron_schedule("61 3 * * *")
    with pytest.raises(ValueError, match="Invalid timezone"):
        cron_schedule("0 3 * * *", timezone="Mars/Olympus_Mons")
    from pipeline.recipe import RecipeError

    with pytest.raises(RecipeError, match="recipe not found"):
        apply_recipe_deployment(str(tmp_path / "missing.yaml"), "0 3 * * *", flow=small_flow)


def test_altforge_deploy_serves_the_recipe_flow_and_a_triggered_run_scrapes_a_new_version(tmp_path, api):
    out = tmp_path / "nightly-out"
    recipe = tmp_path / "nightly.yaml"
    recipe.write_text(
        RECIPE.format(out=out)
        + "scrape: {image_size: 32, processes: 1, shard_size: 20, allow_private_network: true}\n"
    )
    log = tmp_path / "serve.log"
    env = {**api.client_env(str(tmp_path / "serve-home")), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    with open(log, "w") as f:
        serving = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "deploy", str(recipe), "--cron", "0 3 * * *"],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while "being served" not in log.read_text():  # printed once the deployment is registered
            assert serving.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not start in 90 s:\n" + log.read_text()[-3000:]
            time.sleep(0.3)
        d = read_deployment("recipe/nightly")
        assert d["paused"] is False
        assert d["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC", "active": True}]
        assert d["parameters"] == {"recipe_path": str(recipe), "out": None, "incremental": True}

        flow_run_id = trigger("recipe/nightly")
        assert wait_for_flow_run(flow_run_id, timeout=180) == "COMPLETED", log.read_text()[-3000:]
        from pipeline import versions

        rows = versions.list_versions(str(out / "scraped"))
        assert [r["version"] for r in rows] == [1] and rows[0]["samples"] > 0  # scheduled scrapes are incremental
        assert (out / "versions" / "v0001" / "run_report.md").is_file()
        serving.send_signal(signal.SIGTERM)  # how `altforge deploy` is stopped (serve ignores SIGINT in scripts)
        code = serving.wait(timeout=30)
    finally:
        stop(serving)
    assert code == 0


def test_schedule_into_an_output_holding_a_plain_scrape_is_refused(project, tmp_path):
    _, recipe, _ = project
    from flows.deploy import recipe_deployment

    plain = tmp_path / "demo-output" / "scraped"
    plain.mkdir(parents=True)
    (plain / "manifest.json").write_text("{}")  # what altforge run leaves: a dataset, not versions
    with pytest.raises(ValueError, match="holds a plain scrape .* deploy with --out NEW_DIR"):
        recipe_deployment(recipe, "0 3 * * *", out=str(tmp_path / "demo-output"))


def test_schedules_that_fire_wrongly_or_never_or_in_no_time_zone_are_refused():
    with pytest.raises(ValueError, match=r"'0 3 \* \* \* \*' \(UTC\): a cron expression has 5 fields .* got 6"):
        cron_schedule("0 3 * * * *")  # croniter's 6th field is seconds: every second from 03:00:00 to 03:00:59
    with pytest.raises(ValueError, match=r"'0 2 30 2 \*' \(UTC\): it matches no date, so it would never run"):
        cron_schedule("0 2 30 2 *")  # 30 February: the server would log CroniterBadDateError forever
    for blank in ("", "  "):  # Prefect reads a blank time zone as UTC
        with pytest.raises(ValueError, match="the time zone is blank"):
            cron_schedule("0 3 * * *", timezone=blank)
    assert cron_schedule("@daily").cron == "@daily"
    assert cron_schedule("0 0 29 2 *", timezone="Europe/Berlin").cron == "0 0 29 2 *"  # a leap day does come


def test_deploy_checks_the_recipe_as_altforge_run_does(project, tmp_path):
    _, recipe, small_flow = project
    from flows.deploy import recipe_deployment

    bad = tmp_path / "bad.yaml"
    train = "train:\n  - {kind: vae, config: tiny, steps: 5, %s}\n"
    for extra, expected in [
        (train % "options: {no_such_setting: 1}", r"train\[0\]\.options: the vae trainer has no setting"),
        (train % f"data: {tmp_path / 'missing'}", "train vae data .*missing"),
    ]:
        bad.write_text(RECIPE.format(out=tmp_path / "o") + extra)
        with pytest.raises(ValueError, match=expected) as e:
            recipe_deployment(str(bad), "0 3 * * *", flow=small_flow)
        assert "\n" not in str(e.value)
    for out in ("", "  ", " runs"):
        with pytest.raises(ValueError, match="blank or padded"):
            recipe_deployment(recipe, "0 3 * * *", out=out, flow=small_flow)
    for name in ("", " nightly"):
        with pytest.raises(ValueError, match=f"deployment name {name!r}: blank or padded"):
            recipe_deployment(recipe, "0 3 * * *", name=name, flow=small_flow)
    assert recipe_deployment(recipe, "0 3 * * *", flow=small_flow).name == "nightly"


def test_schedule_into_an_unfinished_plain_scrape_is_refused(project, tmp_path):
    _, recipe, _ = project
    from flows.deploy import recipe_deployment
    from pipeline import versions

    plain = tmp_path / "killed" / "scraped"  # what a killed altforge run leaves: a plan and some shards
    (plain / "_inputs").mkdir(parents=True)
    (plain / "_inputs" / "plan.json").write_text("{}")
    (plain / "000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="holds a plain scrape .* deploy with --out NEW_DIR"):
        recipe_deployment(recipe, "0 3 * * *", out=str(tmp_path / "killed"))
    with pytest.raises(ValueError, match="holds an unfinished plain scrape"):
        versions.next_version(str(plain))
    assert not (plain / "v0001").exists()


def test_altforge_run_incremental_writes_a_version_as_the_deployment_does(tmp_path):
    out = tmp_path / "by-hand"
    recipe = tmp_path / "nightly.yaml"
    recipe.write_text(
        RECIPE.format(out=out)
        + "scrape: {image_size: 32, processes: 1, shard_size: 20, allow_private_network: true}\n"
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)  # Prefect's temporary server, as `altforge run` uses it
    cmd = [sys.executable, "-m", "flows.cli", "run", str(recipe), "--incremental"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from pipeline import versions

    rows = versions.list_versions(str(out / "scraped"))
    assert [r["version"] for r in rows] == [1] and rows[0]["samples"] > 0
    assert (out / "versions" / "v0001" / "run_report.md").is_file()

    (tmp_path / "plain" / "scraped" / "_inputs").mkdir(parents=True)  # a killed plain run's part
    cmd += ["--out", str(tmp_path / "plain")]
    refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'plain' / 'scraped'} holds an unfinished plain scrape (_inputs, no manifest.json); "
        "finish it without --incremental, or give a new directory for versions"
    ], refused.stderr
