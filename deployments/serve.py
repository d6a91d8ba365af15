"""Every stemstream flow as a Prefect deployment, served from this process.

    prefect server start                      # the Prefect server and UI (embedded SQLite), or use one
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python deployments/serve.py               # serves the deployments below until Ctrl-C

Then from the UI (Deployments -> Run) or the CLI:

    prefect deployment run 'streaming-session/local' --params '{"session": {"minutes": 30}}'
    prefect deployment run 'streaming-session/perlmutter' \
        --params '{"session": {"machine": "perlmutter", "n_nodes": 2, "counting": {"background_n_sigma": 4.5}}}'
    prefect deployment run 'multi-scan-experiment/stability-series'
    prefect deployment run 'count-fallback-scan/on-demand' -p scan_number=42
    prefect flow-run logs <run id>            # or watch the run page in the UI

(``--params`` replaces the deployment's parameters: give the whole session, or use the UI's form.)

Site values come from the settings (``stemstream.config.Settings``: the environment of the process that runs
the flows), never from this file: STEMSTREAM_STORE_HOST/PORT (and STORE_BACKUP_HOST/PORT), STEMSTREAM_OUTPUT_DIR,
STEMSTREAM_CATALOG_URL, STEMSTREAM_ARCHIVE_DIR, STEMSTREAM_ACCOUNT (NERSC project), STEMSTREAM_SITES (each
machine's backend, QOS, aggregator, archive and allocator options: not on the session form), the counting defaults
(STEMSTREAM_BACKGROUND_N_SIGMA, ...), STEMSTREAM_SFAPI_CLIENT_ID/SECRET (Superfacility API),
STEMSTREAM_GLOBUS_CLIENT_ID/SECRET (Globus), and STEMSTREAM_EXPERIMENT_CRON (the stability series' schedule,
default: every day at 08:00, paused).
"""

from __future__ import annotations

from typing import Any

from prefect import serve
from prefect.schedules import Cron

from stemstream.config import get_settings
from stemstream.counting import CountingParams
from stemstream.flows import count_fallback_scan, multi_scan_experiment, process_scan, streaming_session

TAGS = ["stemstream"]


def deployments() -> list[Any]:
    """The deployments, built but not yet registered (``serve`` registers them)."""
    # Only what the microscopist's form holds (SessionParams); a machine's infrastructure (backend, QOS,
    # aggregator, archive, directories) is the site's, STEMSTREAM_SITES. The counting defaults are the settings'.
    counting = CountingParams().model_dump(mode="json", exclude_none=True)
    local = {"machine": "local", "n_nodes": 1, "nodegroups_per_node": 2, "counting": counting}
    perlmutter = {"machine": "perlmutter", "n_nodes": 1, "nodegroups_per_node": 4, "counting": counting}
    cron = get_settings().experiment_cron
    return [
        streaming_session.to_deployment(
            name="local",
            parameters={"session": {**local, "minutes": 60}},
            tags=TAGS,
            description="A streaming session on this machine (NodeGroups under mpiexec).",
        ),
        streaming_session.to_deployment(
            name="perlmutter",
            parameters={"session": {**perlmutter, "minutes": 60}},
            tags=TAGS,
            description="A streaming session on Perlmutter through the Superfacility API (realtime QOS).",
        ),
        process_scan.to_deployment(name="on-demand", tags=TAGS, description="Archive and catalogue a counted scan."),
        count_fallback_scan.to_deployment(
            name="on-demand", tags=TAGS, description="Count a scan that landed on disk, then archive and catalogue it."
        ),
        multi_scan_experiment.to_deployment(
            name="stability-series",
            parameters={"n_scans": 60, "interval_s": 60.0, "scan_shape": [128, 128], "session": local},
            schedule=Cron(cron, active=False),  # switch it on in the UI when the microscope is booked
            tags=TAGS,
            description="The hour-long stability series: 60 scans a minute apart, turnaround per scan.",
        ),
    ]


if __name__ == "__main__":
    serve(*deployments())
