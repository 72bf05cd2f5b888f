"""Serve quadflow's deployments from one process: `python deployments/serve.py`.

Three deployments, each with the settings of a YAML config (env QUADFLOW_CONFIG, default
deployments/nightly.yaml) as its default parameters, so the UI's "Custom run" form starts there:

- `curate-partition/partition`: one date partition; no schedule (the backfill's target);
- `nightly/nightly`: the newest partition, on the cron QUADFLOW_NIGHTLY_CRON (default 0 2 * * *,
  in QUADFLOW_TIMEZONE, default UTC);
- `backfill/backfill`: a date range, one curate-partition run per partition.

Relative paths in the config are resolved against the directory serve.py is started from, and
the deployments carry the absolute paths. Flow runs execute as subprocesses of this process;
QUADFLOW_SERVE_LIMIT caps how many run at once (default: no cap; a backfill holds one slot while
its partition runs need others, so a cap must exceed backfill's max_parallel).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python deployments/serve.py` from a checkout that is not installed
    sys.path.insert(0, str(REPO))

from prefect import serve  # noqa: E402

from quadflow.flows.partitions import PARTITION_DEPLOYMENT, backfill, curate_partition, nightly  # noqa: E402
from quadflow.settings import ConfigError, Settings, build_settings  # noqa: E402

DEFAULT_CONFIG = REPO / "deployments" / "nightly.yaml"
DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
TAGS = ["quadflow"]


def _absolute(path: str, base: Path) -> str:
    if "://" in path or os.path.isabs(os.path.expanduser(path)):
        return path
    return str((base / path).absolute())


def load_settings(config: str | Path, base: Path | None = None) -> Settings:
    """Settings from the YAML config with every relative path made absolute against `base` (cwd)."""
    base = base or Path.cwd()
    s = build_settings(config)
    data = s.model_dump(mode="json")
    data["store"] = _absolute(data["store"], base)
    data["ingest"]["inputs"] = [_absolute(p, base) for p in data["ingest"]["inputs"]]
    data["ingest"]["targets"] = [_absolute(p, base) for p in data["ingest"]["targets"]]
    data["export"]["output"] = _absolute(data["export"]["output"], base)
    return Settings.model_validate(data)


def build_deployments(settings: Settings, cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE) -> list[Any]:
    """The three RunnerDeployments, with `settings` as the default `settings` parameter."""
    params = {"settings": settings.model_dump(mode="json")}
    return [
        curate_partition.to_deployment(
            name=PARTITION_DEPLOYMENT, parameters=params, tags=TAGS,
            description="Curate one date partition (pick its date in `partition`); skipped when already done "
            "with these settings unless `force`.",
        ),
        nightly.to_deployment(
            name="nightly", parameters=params, tags=TAGS, schedules=[_cron(cron, timezone)],
            description="Curate the newest date partition of the roots in settings.ingest.inputs.",
        ),
        backfill.to_deployment(
            name="backfill", parameters={**params, "deployment": PARTITION_DEPLOYMENT}, tags=TAGS,
            description="Curate every partition in [start, end] (one curate-partition run each, at most "
            "max_parallel at once); done partitions are skipped unless `force`.",
        ),
    ]


def _cron(cron: str, timezone: str):
    from prefect.schedules import Cron

    return Cron(cron, timezone=timezone)


def main() -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    config = os.environ.get("QUADFLOW_CONFIG") or str(DEFAULT_CONFIG)
    cron = os.environ.get("QUADFLOW_NIGHTLY_CRON") or DEFAULT_CRON
    timezone = os.environ.get("QUADFLOW_TIMEZONE") or DEFAULT_TIMEZONE
    limit = os.environ.get("QUADFLOW_SERVE_LIMIT")
    try:
        settings = load_settings(config)
        deployments = build_deployments(settings, cron, timezone)
        cap = int(limit) if limit else None
    except ConfigError as e:
        print(f"serve: error in {config}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a bad cron, timezone or limit
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    serve(*deployments, limit=cap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
