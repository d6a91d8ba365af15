"""Check the live preview the way a person would: a headless-browser screenshot of the Prefect UI while a
scan streams.

    python scripts/screenshot_preview.py [--out docs/images] [--scan-shape 48 48]

Starts a local site (Prefect server, store, simulated producers), a streaming session, then one scan; while
it is being counted, Chromium (Debian's ``chromium``, headless) photographs the session run's Artifacts tab
and the live virtual bright-field artifact. Prints the PNG paths, and the progress the artifact showed.
Exit code 0 only if both pictures were taken while the scan was still streaming.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1400,1200", "--virtual-time-budget=8000",
]  # fmt: skip


def _api(url: str, path: str, body: dict | None = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{url}/api{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _artifact(url: str, key: str) -> dict | None:
    found = _api(url, "/artifacts/latest/filter", {"artifacts": {"key": {"any_": [key]}}, "limit": 1})
    return found[0] if found else None


def _screenshot(chromium: str, page: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        argv = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", page]
        subprocess.run(argv, capture_output=True, timeout=120, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--scan-shape", type=int, nargs=2, default=[96, 96])
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if not args.chromium:
        print("no chromium here: apt-get install chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from stemstream.localsite import LocalSite

    with tempfile.TemporaryDirectory(prefix="stemstream-preview-") as tmp, LocalSite(Path(tmp)) as site:
        from stemstream.flows import streaming_session
        from stemstream.sessions import SESSION_STOP_KEY
        from stemstream.streaming.producer import request_scan
        from stemstream.streaming.store import Registry, StoreClient

        uid = "preview-screenshot"
        kw = {"minutes": 10, "nodegroups_per_node": 2, "output_dir": f"{tmp}/counted", "archive_dir": f"{tmp}/a"}
        session = threading.Thread(
            target=streaming_session,
            kwargs={"store": site.store, "catalog_url": f"sqlite:///{tmp}/c.sqlite", "uid": uid, **kw},
            daemon=True,
        )
        session.start()
        taken: list[tuple[Path, int, int]] = []
        with StoreClient(site.store, timeout=10) as client:
            Registry(client).wait_for_members("nodegroup", 2, status="ready", timeout=180)
            time.sleep(2)
            request_scan(client, 1, tuple(args.scan_shape), seed=1)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                progress = _artifact(site.prefect_url, "scan-1-progress")
                live = _artifact(site.prefect_url, "scan-1-live")
                if live and progress and 40 <= float(progress["data"]) < 80:
                    # The newest version of the live picture; its own text says how far the scan was.
                    version = _api(site.prefect_url, f"/artifacts/{live['latest_id']}")
                    found = re.search(r"(\d+) of (\d+) frames", str(version["data"]))
                    counted, total = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
                    card = args.out / "live-preview-artifact.png"
                    _screenshot(args.chromium, f"{site.prefect_url}/artifacts/artifact/{live['latest_id']}", card)
                    taken.append((card, counted, total))
                    page = args.out / "live-preview-run.png"
                    _screenshot(args.chromium, f"{site.prefect_url}/runs/flow-run/{live['flow_run_id']}", page)
                    break
                if progress and float(progress["data"]) >= 80:
                    break
                time.sleep(0.3)
            client.set(SESSION_STOP_KEY.format(uid=uid), True)
        session.join(120)
    for path, counted, total in taken:
        print(f"{path}: the picture of scan 1 with {counted} of {total} frames counted (still streaming)")
    if not taken or not 0 < taken[0][1] < taken[0][2]:
        print("the scan was counted before a screenshot could be taken; try a larger --scan-shape", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
