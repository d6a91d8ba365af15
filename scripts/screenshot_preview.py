"""Check what a session's Prefect run shows while a scan streams, the way a person would: headless-Chromium
screenshots of the Prefect UI and of the live view it links to.

    python scripts/screenshot_preview.py [--out docs/images] [--scan-shape 96 96]

Starts a local site (Prefect server, store, simulated producers), a streaming session, then one scan; while
it is being counted (its progress artifact between ``--after`` and ``--until``, 45 % .. 70 %), Chromium
(Debian's ``chromium``, headless) photographs the session run's Artifacts tab (``live-preview-run.png``: the
link to the live view and the scan's progress) and the live view through that link
(``live-view-from-run.png``). Then it checks the run's artifacts: one link artifact to the live view, one
progress artifact per scan (updated in place), no picture card per second. Prints what it saw; exit code 0
only if both pictures were taken in that window and the artifacts are those.
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
import urllib.error
import urllib.request
from pathlib import Path

from stemstream.scans import keys

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1400,1200", "--virtual-time-budget=8000",
]  # fmt: skip


def _api(url: str, path: str, body: dict | None = None, tries: int = 3) -> object:
    """A Prefect API call; a busy server (seconds to answer on a loaded machine) is asked again."""
    data = json.dumps(body).encode() if body is not None else None
    for attempt in range(tries):
        req = urllib.request.Request(f"{url}/api{path}", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except (TimeoutError, urllib.error.URLError):
            if attempt + 1 == tries:
                raise
            time.sleep(1)
    raise AssertionError("unreachable")


def _artifact(url: str, key: str) -> dict | None:
    found = _api(url, "/artifacts/latest/filter", {"artifacts": {"key": {"any_": [key]}}, "limit": 1})
    return found[0] if found else None


def _screenshot_tab(
    chromium: str, page: str, tab: str | None, out: Path, timeout: float = 90.0, ready: str | None = None
) -> str:
    """Open ``page``, click its ``tab`` if any (the Prefect UI picks a run page's tab only once the run has
    loaded, so ``?tab=`` in the address is not enough), wait for it to render (and for the JavaScript
    ``ready`` to be true), save a PNG; the page's text. Over the DevTools protocol (websockets, which Prefect
    brings)."""
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
                while tab is not None and not js(click):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"no {tab!r} tab on {page}")
                    time.sleep(0.5)
                while ready is not None and not js(ready):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{page}: not ready ({ready})")
                    time.sleep(0.3)
                time.sleep(3)  # the tab's content: cards, images
                while js("[...document.images].some(i => !i.complete)") and time.monotonic() < deadline:
                    time.sleep(0.5)
                png = call("Page.captureScreenshot", format="png")["data"]
                out.write_bytes(base64.b64decode(png))
                return str(js("document.body.innerText"))
        finally:
            proc.terminate()  # (the page's text was returned above)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _url(link: dict) -> str:
    """The address in a link artifact (stored as markdown, ``[text](url)``)."""
    found = re.search(r"\((https?://[^)]+)\)", str(link["data"]))
    return found.group(1) if found else str(link["data"])


def _run_artifacts(url: str, flow_run_id: str) -> list[dict]:
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    return list(_api(url, "/artifacts/filter", body))  # type: ignore[arg-type]


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
        taken: list[tuple[Path, float]] = []
        seen = 0.0
        texts: dict[str, str] = {}
        link: dict | None = None
        with StoreClient.from_settings(timeout=10) as client:
            try:
                Registry(client).wait_for_members("nodegroup", 2, status="ready", timeout=180)
                deadline = time.monotonic() + 60
                while link is None and time.monotonic() < deadline:  # the session links the view first
                    link = _artifact(site.prefect_url, "live-view")
                    time.sleep(0.3)
                if link is None:
                    print("no live-view link artifact in the session's run", file=sys.stderr)
                    return 1
                request_scan(client, 1, tuple(args.scan_shape), seed=1)
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and not taken:
                    progress = _artifact(site.prefect_url, "scan-1-progress")
                    if progress:
                        seen = float(progress["data"]) / 100
                        if seen > args.until:
                            break  # too late: the pictures would not show the scan being counted
                        if seen >= args.after:
                            page = args.out / "live-preview-run.png"
                            run = f"{site.prefect_url}/runs/flow-run/{progress['flow_run_id']}?tab=Artifacts"
                            texts["run"] = _screenshot_tab(args.chromium, run, "Artifacts", page)
                            taken.append((page, seen))
                            view = args.out / "live-view-from-run.png"
                            ready = "window.stemstream && window.stemstream.view && window.stemstream.view.scan === 1"
                            texts["view"] = _screenshot_tab(args.chromium, _url(link), None, view, ready=ready)
                            taken.append((view, seen))
                            continue
                    time.sleep(0.3)
                key = keys.counted(1)
                client.wait_for(lambda items: key in items, prefix=key, timeout=300)
                time.sleep(2)  # the session's last update of the scan's progress
                artifacts = _run_artifacts(site.prefect_url, link["flow_run_id"])
            finally:  # also on errors: the session releases its NodeGroups (else they outlive this script)
                client.set(keys.session_stop(uid), True)
                session.join(120)
    kinds: dict[tuple[str, str], int] = {}
    for a in artifacts:
        kinds[(a["type"], a.get("key") or "")] = kinds.get((a["type"], a.get("key") or ""), 0) + 1
    print(f"the run's artifacts: {sorted(kinds.items())}")
    for path, fraction in taken:
        print(f"{path}: scan 1 with {100 * fraction:.0f} % counted (still streaming)")
    ok = bool(taken) and 0 < taken[0][1] < 1
    if not ok:
        print(
            f"no picture in the window (last seen: {100 * seen:.0f} % counted); "
            "a scan too fast or a machine too busy: try a larger --scan-shape",
            file=sys.stderr,
        )
    # (Prefect stores a link artifact as markdown, "[text](url)".)
    expected = {("markdown", "live-view"): 1, ("progress", "scan-1-progress"): 1}
    cards = [k for t, k in kinds if t == "markdown" and k.startswith("scan-") and k.endswith("-live")]
    if any(kinds.get(k) != n for k, n in expected.items()) or cards:
        print(f"the run's artifacts are not one link and one progress artifact per scan: {kinds}", file=sys.stderr)
        ok = False
    if ok:
        final = next(a for a in artifacts if a.get("key") == "scan-1-progress")["data"]
        print(f"progress artifact of scan 1 at the end: {float(final):.1f} %")
        print(f"link artifact to the live view: {_url(link) if link else None}")
        print("the run's page shows the link:", "live-view" in texts.get("run", ""))
        print("the view through the link shows scan 1:", "Scan 1" in texts.get("view", ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
