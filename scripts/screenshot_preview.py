"""Check the live preview the way a person would: a headless-browser screenshot of the Prefect UI while a
scan streams.

    python scripts/screenshot_preview.py [--out docs/images] [--scan-shape 48 48]

Starts a local site (Prefect server, store, simulated producers), a streaming session, then one scan; while
it is being counted, Chromium (Debian's ``chromium``, headless) photographs the session run's Artifacts tab
and the live virtual bright-field artifact, once the artifact's own text ("N of M frames") says the scan is
between ``--after`` and ``--until`` counted (45 % .. 70 %: the picture shows it about half built). Prints the PNG
paths, and the progress the artifact showed. Exit code 0 only if both pictures were taken in that window.
"""

from __future__ import annotations

import argparse
import base64
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

from stemstream.scans import keys

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


def _screenshot_tab(chromium: str, page: str, tab: str, out: Path, timeout: float = 90.0) -> None:
    """Open ``page``, click its ``tab`` (the Prefect UI picks a run page's tab only once the run has loaded,
    so ``?tab=`` in the address is not enough), wait for it to render, save a PNG. Over the DevTools
    protocol (websockets, which Prefect brings)."""
    from websockets.sync.client import connect

    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--virtual-time-budget")]
        argv = [chromium, *flags, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            port_file = Path(profile) / "DevToolsActivePort"
            while not port_file.exists() or not port_file.read_text().strip():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("chromium did not open its DevTools port")
                time.sleep(0.2)
            port = port_file.read_text().split()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                target = next(t for t in json.loads(r.read()) if t.get("type") == "page")
            with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
                ids = iter(range(1, 1_000_000))

                def call(method: str, **params: object) -> dict:
                    n = next(ids)
                    ws.send(json.dumps({"id": n, "method": method, "params": params}))
                    while True:
                        msg = json.loads(ws.recv(timeout=max(1.0, deadline - time.monotonic())))
                        if msg.get("id") == n:
                            if "error" in msg:
                                raise RuntimeError(f"{method}: {msg['error']}")
                            return msg.get("result", {})

                def js(expression: str) -> object:
                    return call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

                call("Emulation.setDeviceMetricsOverride", width=1400, height=1200, deviceScaleFactor=1, mobile=False)
                call("Page.navigate", url=page)
                click = (
                    "(() => { const b = [...document.querySelectorAll('button, [role=tab], .p-tab')]"
                    f".find(e => e.textContent.trim() === {json.dumps(tab)} && e.offsetParent !== null);"
                    " if (b) { b.click(); return true } return false })()"
                )
                while not js(click):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no {tab!r} tab on {page}")
                    time.sleep(0.5)
                time.sleep(3)  # the tab's content: cards, images
                while js("[...document.images].some(i => !i.complete)") and time.monotonic() < deadline:
                    time.sleep(0.5)
                png = call("Page.captureScreenshot", format="png")["data"]
                out.write_bytes(base64.b64decode(png))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--scan-shape", type=int, nargs=2, default=[96, 96])
    parser.add_argument("--after", type=float, default=0.45, help="earliest fraction counted to photograph")
    parser.add_argument("--until", type=float, default=0.7, help="latest fraction counted to photograph")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if not args.chromium:
        print("no chromium here: apt-get install chromium", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from stemstream.config import environment, store_overrides
    from stemstream.sim.site import LocalSite

    with (
        tempfile.TemporaryDirectory(prefix="stemstream-preview-") as tmp,
        LocalSite(Path(tmp)) as site,
        environment(**store_overrides(site.store), store_backup_host=None, catalog_url=f"sqlite:///{tmp}/c.sqlite"),
    ):
        from stemstream.flows import streaming_session
        from stemstream.plane.requests import request_scan
        from stemstream.sessions import session_params
        from stemstream.store import Registry, StoreClient

        uid = "preview-screenshot"
        params = session_params(
            minutes=10, nodegroups_per_node=2, output_dir=f"{tmp}/counted", archive_dir=f"{tmp}/a", uid=uid
        )
        session = threading.Thread(target=streaming_session, args=(params,), daemon=True)
        session.start()
        taken: list[tuple[Path, int, int]] = []
        seen = (0, 0)
        with StoreClient.from_settings(timeout=10) as client:
            try:
                Registry(client).wait_for_members("nodegroup", 2, status="ready", timeout=180)
                time.sleep(2)
                request_scan(client, 1, tuple(args.scan_shape), seed=1)
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and not taken:
                    live = _artifact(site.prefect_url, "scan-1-live")
                    if live:
                        # The newest version of the live picture; its own text says how far the scan was.
                        version = _api(site.prefect_url, f"/artifacts/{live['latest_id']}")
                        found = re.search(r"(\d+) of (\d+) frames", str(version["data"]))
                        seen = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
                        counted, total = seen
                        if total and counted / total > args.until:
                            break  # too late: the picture would not show the scan being built
                        if total and counted / total >= args.after:
                            card = args.out / "live-preview-artifact.png"
                            _screenshot(args.chromium, f"{site.prefect_url}/artifacts/artifact/{version['id']}", card)
                            taken.append((card, counted, total))
                            page = args.out / "live-preview-run.png"
                            run = f"{site.prefect_url}/runs/flow-run/{live['flow_run_id']}?tab=Artifacts"
                            _screenshot_tab(args.chromium, run, "Artifacts", page)
                            continue
                    time.sleep(0.3)
            finally:  # also on errors: the session releases its NodeGroups (else they outlive this script)
                client.set(keys.session_stop(uid), True)
                session.join(120)
    for path, counted, total in taken:
        print(f"{path}: the picture of scan 1 with {counted} of {total} frames counted (still streaming)")
    if not taken or not 0 < taken[0][1] < taken[0][2]:
        print(
            f"no picture in the window (last seen: {seen[0]} of {seen[1]} frames counted); "
            "a scan too fast or a machine too busy: try a larger --scan-shape",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
