"""Settings model, YAML + flag merging, and the CLI's handling of bad settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quadflow.cli import main
from quadflow.settings import ConfigError, Settings, build_settings
from tests.conftest import REPO, SAMPLE_POOL, SAMPLE_TARGET


def test_flags_override_yaml(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("ingest:\n  inputs: [a.jsonl]\nselect:\n  budget_tokens: 500\n  selector: random\nseed: 3\n")
    s = build_settings(cfg, {"select": {"budget_tokens": 900, "selector": None}, "seed": None})
    assert s.select.budget_tokens == 900
    assert s.select.selector == "random"
    assert s.seed == 3


def test_bad_value_names_setting_and_value():
    with pytest.raises(ConfigError) as e:
        build_settings(overrides={"ingest": {"inputs": ["x"]}, "select": {"budget_tokens": -5}})
    assert "select.budget_tokens" in str(e.value) and "-5" in str(e.value)


def test_unknown_setting_is_rejected(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("ingest:\n  inputs: [a.jsonl]\nselect:\n  budjet_tokens: 5\n")
    with pytest.raises(ConfigError, match="select.budjet_tokens"):
        build_settings(cfg)


def test_dsir_scorer_without_target_is_a_config_error():
    with pytest.raises(ConfigError, match="need a target set"):
        build_settings(overrides={"ingest": {"inputs": ["x"]}, "score": {"scorers": ["dsir"]}})


def test_auto_scorers_depend_on_target():
    s = build_settings(overrides={"ingest": {"inputs": ["x"]}})
    assert s.score.resolved(has_targets=False) == ["heuristic"]
    assert s.score.resolved(has_targets=True) == ["dsir", "classifier"]


def test_settings_round_trip_through_json():
    s = build_settings(overrides={"ingest": {"inputs": ["x"], "targets": ["t"]}, "select": {"budget_tokens": 7}})
    assert Settings.model_validate_json(s.model_dump_json()) == s


def test_cli_bad_setting_exits_2_with_message(capsys):
    code = main(["run", "--input", str(SAMPLE_POOL), "--budget-tokens", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "select.budget_tokens" in err and "0" in err


def test_cli_missing_input_exits_2_naming_path(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    code = main(["run", "--input", str(missing), "--store", str(tmp_path / "s.duckdb")])
    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_show_settings_merges_config_and_flags(tmp_path, capsys):
    code = main(["run", "--config", str(REPO / "examples" / "demo.yaml"), "--budget-tokens", "1234",
                 "--scorer", "heuristic", "--show-settings"])
    assert code == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["select"]["budget_tokens"] == 1234
    assert shown["score"]["scorers"] == ["heuristic"]
    assert shown["ingest"]["targets"] == ["examples/data/target.jsonl.zst"]


def test_console_script_usage_error_exits_2():
    proc = subprocess.run([sys.executable, "-m", "quadflow.cli", "run", "--selector", "best"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice: 'best'" in proc.stderr


def test_cli_run_waits_for_a_held_store_lock_and_names_the_holder(tmp_path, capsys):
    from quadflow import locking

    store = tmp_path / "s.duckdb"
    with locking.store_lock(f"{store}.lock", owner="the nightly run"):
        code = main(["run", "--input", str(SAMPLE_POOL), "--target", str(SAMPLE_TARGET),
                     "--store", str(store), "--output", str(tmp_path / "out"), "--lock-timeout", "0.5"])
    assert code == 1
    err = capsys.readouterr().err
    assert "store lock" in err and "the nightly run" in err
    # while it waits it says so (outside a flow run the logger had no handler: a waiting run printed nothing)
    assert f"quadflow: waiting for store lock {store}.lock held by the nightly run" in err


def test_probe_scorer_must_be_one_of_the_scorers():
    with pytest.raises(ConfigError, match="select.probe_scorer = 'classifier' is not among"):
        build_settings(overrides={"ingest": {"inputs": ["x"], "targets": ["t"]},
                                  "score": {"scorers": ["heuristic", "dsir"]},
                                  "select": {"probe_scorer": "classifier"}})
    s = build_settings(overrides={"ingest": {"inputs": ["x"], "targets": ["t"]},
                                  "score": {"scorers": ["heuristic", "dsir"]}, "select": {"probe_scorer": "dsir"}})
    assert s.select.probe_scorer == "dsir"


def test_cli_probe_scorer_flag_reaches_the_settings(capsys):
    code = main(["run", "--input", "x", "--target", "t", "--scorer", "heuristic", "--scorer", "dsir",
                 "--probe-scorer", "dsir", "--show-settings"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["select"]["probe_scorer"] == "dsir"


@pytest.mark.parametrize("override, setting", [
    ({"select": {"budget_tokens": True}}, "select.budget_tokens = True"),  # YAML `true` is not 1 token
    ({"cluster": {"k": False}}, "cluster.k = False"),
    ({"objectstore": {"max_attempts": True}}, "objectstore.max_attempts = True"),
    ({"select": {"tau": True}}, "select.tau = True"),
    ({"score": {"weights": {"dsir": True}}}, "dsir = True is a boolean"),
    ({"score": {"weights": {"heuristic": float("nan")}}}, "score.weights.heuristic = nan"),
    ({"select": {"tau": float("nan")}}, "select.tau = nan"),
    ({"select": {"alpha": float("inf")}}, "select.alpha = inf"),
    ({"seed": -1}, "seed = -1"),
    ({"seed": 2**32}, f"seed = {2**32}"),
    ({"store": ""}, "store = ''"),
    ({"store": "work/"}, "store = 'work/'"),
])
def test_numbers_are_numbers_and_in_range(override, setting):
    with pytest.raises(ConfigError) as e:
        build_settings(overrides={"ingest": {"inputs": ["x"], "targets": ["t"]}, **override})
    assert setting in str(e.value)


def test_booleans_stay_booleans_and_the_seed_range_is_numpys():
    s = build_settings(overrides={"ingest": {"inputs": ["x"], "incremental": False}, "seed": 2**32 - 1,
                                  "objectstore": {"verify_etag": False}})
    assert s.ingest.incremental is False and s.objectstore.verify_etag is False and s.seed == 2**32 - 1
@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_cli_lock_timeout_must_be_a_finite_number_of_seconds(value, tmp_path, capsys):
    code = main(["run", "--input", str(SAMPLE_POOL), "--store", str(tmp_path / "s.duckdb"),
                 "--output", str(tmp_path / "out"), "--lock-timeout", value])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--lock-timeout = {value}" in err and "Traceback" not in err


def test_cli_store_that_is_a_directory_exits_2_naming_it(tmp_path, capsys):
    code = main(["run", "--input", str(SAMPLE_POOL), "--store", str(tmp_path), "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert f"store = '{tmp_path}'" in err and "is a directory" in err and "Traceback" not in err


def test_runner_names_choose_where_shard_tasks_run(monkeypatch):
    from prefect_dask import DaskTaskRunner
    from prefect_ray import RayTaskRunner

    from quadflow.settings import RunSettings
    from quadflow.shards import task_runner

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = task_runner(RunSettings(runner="ray", workers=3))
    assert isinstance(local, RayTaskRunner) and local.address is None and local.init_kwargs["num_cpus"] == 3
    client = task_runner(RunSettings(runner="ray://head.example:10001"))
    assert isinstance(client, RayTaskRunner) and client.address == "ray://head.example:10001"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # on a cluster node, or inside a Ray job
    joined = task_runner(RunSettings(runner="ray", workers=3))
    assert joined.address == "10.0.0.5:6379" and "num_cpus" not in joined.init_kwargs  # the cluster's CPUs
    assert task_runner(RunSettings(runner="dask://sched:8786")).address == "tcp://sched:8786"
    assert isinstance(task_runner(RunSettings(runner="dask", workers=2)), DaskTaskRunner)
    with pytest.raises(ConfigError) as e:
        build_settings(overrides={"ingest": {"inputs": ["x"]}, "run": {"runner": "spark"}})
    assert "run.runner" in str(e.value) and "spark" in str(e.value)


@pytest.mark.parametrize("configured, expected_wait", [(None, 120), ("300", 300)])
def test_a_temporary_server_that_does_not_come_up_exits_1_saying_what_to_do(configured, expected_wait, tmp_path,
                                                                             monkeypatch, capsys):
    """Without PREFECT_API_URL the run starts Prefect's temporary server. It waits at least 120 s for it
    (Prefect's own 20 s was too short for a first start on a busy 2-core machine) or longer if the user
    set more; if it still does not answer, the run exits 1 with how to avoid it, not a traceback."""
    from prefect.server.api import server as prefect_server
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    waits = []

    def start(self, timeout=None):
        waits.append(timeout)
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.setattr(prefect_server.SubprocessASGIServer, "start", start)
    updates = {PREFECT_API_URL: None}
    if configured:
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = configured
    with temporary_settings(updates=updates):
        code = main(["run", "--input", str(SAMPLE_POOL), "--target", str(SAMPLE_TARGET),
                     "--store", str(tmp_path / "s.duckdb"), "--output", str(tmp_path / "out")])
    assert code == 1
    assert waits == [expected_wait]
    err = capsys.readouterr().err
    assert f"temporary server did not answer within {expected_wait} s" in err
    assert "PREFECT_API_URL" in err and "Traceback" not in err
