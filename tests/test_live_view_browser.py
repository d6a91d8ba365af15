"""The live view in a real browser (headless Chromium, tests/browser.py) while a scan streams: the page shows
progress, the summed pattern with the detectors drawn on it and the virtual images building up, pushed by
server-sent events; a bright-field radius changed in the page's form applies at once (the image changes
accordingly, the circle on the pattern too) and is recorded in the scan's file; a thumbnail of an earlier
scan shows that scan's results. Screenshots go to ``$STEMSTREAM_SCREENSHOTS`` (docs/images when
regenerating them), else the test's temporary directory. What the page's updates cost rank 0 (the view's
thread: rendering, JSON, HTTP) is measured with one client connected and must stay under 5 % of a core.

Needs Debian's ``chromium`` (``.ci/run`` installs it; skipped where it is missing).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from browser import Browser, chromium
from plane_helpers import ProcessTree, free_port_block, start_store, store_client
from stemstream.scans import keys

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(chromium() is None, reason="no chromium here (apt-get install -y chromium)"),
]


def _state(view: str, scan: int | None = None) -> dict:
    url = view + "api/state" + (f"?scan={scan}" if scan is not None else "")
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _counted(client, number: int, timeout: float = 300) -> dict:
    key = keys.counted(number)
    return client.wait_for(lambda items: key in items, prefix=key, timeout=timeout)[key]


def test_the_live_view_in_a_browser_while_a_scan_streams(tmp_path: Path):
    from stemstream.analyses.files import read_results
    from stemstream.plane.requests import request_scan
    from stemstream.store import Registry

    shots = Path(os.environ.get("STEMSTREAM_SCREENSHOTS") or tmp_path / "shots")
    port = free_port_block(40)
    env = {"STEMSTREAM_PORT_RANGE": f"{port}-{port + 39}"}
    with ProcessTree(tmp_path / "logs", env=env) as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        tree.start(
            "nodegroups", "nodegroup", "--store", address, "--consumer", "count", "--count", 2, "--uid", "ng",
            "--output-dir", tmp_path / "counted", "--engine", "cpu",
        )  # fmt: skip
        with store_client(address) as client:
            registry = Registry(client)
            registry.wait_for_members("aggregator", 1, status="ready", timeout=60)
            groups = registry.wait_for_members("nodegroup", 2, status="ready", timeout=120)
            view = groups[0].extra["view"]
            # In the port range (whose first ports the processes' metrics servers may have taken).
            assert view.startswith("http://127.0.0.1:") and int(view.split(":")[2].split("/")[0]) in range(
                port, port + 40
            )
            assert view == groups[1].extra["view"]
            for m in range(4):
                tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m, "--threads", 2)
            registry.wait_for_members("producer", 4, status="ready", timeout=60)

            # An earlier scan of the session: a thumbnail in the strip.
            request_scan(client, 1, (32, 32), seed=3)
            assert _counted(client, 1)["status"] == "counted"
            # Without the token: nothing.
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(view.rsplit("/", 2)[0] + "/not-the-token/api/state", timeout=10)

            with Browser(width=1400, height=1060) as b:
                b.open(view)
                b.wait("window.stemstream && window.stemstream.last && window.stemstream.last.strip.length >= 1")
                request_scan(client, 2, (96, 96), seed=4)
                # The page follows the new scan as it streams: progress, pattern, images.
                b.wait(
                    "(() => { const s = window.stemstream.last, v = window.stemstream.view;"
                    " return s.shown === 2 && s.progress && s.progress.status === 'streaming'"
                    " && s.progress.counted > 0.12 * s.progress.frames && v && v.scan === 2"
                    " && v.images['virtual.bf'] && v.images['sum.pattern'] })()",
                    timeout=120,
                    what="the streaming scan on the page",
                )
                cost0 = _state(view)["cost"]
                t0 = time.time()
                # Circles drawn on the pattern: one per detector (an annulus has two), and the centre.
                circles = b.js("[...document.querySelectorAll('#overlay circle')].map(c => +c.getAttribute('r'))")
                assert sorted(circles) == [60, 70, 250]
                time.sleep(0.6)
                b.screenshot(shots / "live-view.png")
                before = b.js(
                    "(() => { const v = window.stemstream.view; return {bf: v.totals['virtual.bf'],"
                    " counted: v.counted, src: document.getElementById('img-virtual-bf').src, updates:"
                    " window.stemstream.updates} })()"
                )
                assert before["bf"] > 0 and before["counted"] > 0
                updates0, at0 = before["updates"], time.monotonic()

                # A smaller bright field, typed into the form and applied.
                b.js(
                    "(() => { const row = [...document.querySelectorAll('#dets tr')]"
                    ".find(r => r.querySelector('.dname').value === 'bf');"
                    " const outer = row.querySelector('.douter'); outer.value = '25';"
                    " outer.dispatchEvent(new Event('input')); document.getElementById('apply').click(); })()"
                )
                b.wait("document.getElementById('msg').textContent === 'applied'", timeout=10)
                after = b.wait(
                    "(() => { const v = window.stemstream.view; if (!v || v.scan !== 2"
                    " || v.detectors.bf[1] !== 25 || v.pending.length) return null; return {bf: v.totals['virtual.bf'],"
                    " counted: v.counted, status: v.status,"
                    " src: document.getElementById('img-virtual-bf').src,"
                    " circles: [...document.querySelectorAll('#overlay circle')].map(c => +c.getAttribute('r'))} })()",
                    timeout=30,
                    what="the new bright field on the page",
                )
                assert after["status"] == "streaming", "the scan ended before the change showed: make it longer"
                assert sorted(after["circles"]) == [25, 70, 250]
                assert after["src"] != before["src"]
                # Radius 25 instead of 60 in a disk of radius 55: about a fifth of the electrons per frame.
                per_frame_before = before["bf"] / before["counted"]
                per_frame_after = after["bf"] / after["counted"]
                assert 0.1 * per_frame_before < per_frame_after < 0.35 * per_frame_before, (before, after)
                time.sleep(0.6)
                b.screenshot(shots / "live-view-changed.png")
                # Pushed at least once a second.
                updates = b.js("window.stemstream.updates") - updates0
                assert updates >= (time.monotonic() - at0) - 1, updates
                cost1 = _state(view)["cost"]
                load = (cost1["cpu_s"] - cost0["cpu_s"]) / (time.time() - t0)
                print(f"the view's thread: {100 * load:.2f} % of a core with {cost1['clients']} client(s)")
                assert cost1["clients"] >= 1 and load < 0.05

                record = _counted(client, 2)
                stored, history = read_results(record["path"])
                assert stored["virtual"].params["detectors"]["bf"] == [0.0, 25.0]
                assert [h["source"] for h in history] == ["page"]

                # The strip: a click on scan 1's thumbnail shows scan 1.
                b.wait("document.querySelectorAll('#strip .thumb img').length >= 2", timeout=30)
                b.js("document.querySelector('#strip .thumb[data-scan=\"1\"]').click()")
                b.wait(
                    "window.stemstream.view && window.stemstream.view.scan === 1"
                    " && document.getElementById('title').textContent === 'Scan 1'",
                    timeout=20,
                )
                assert b.js("window.stemstream.view.status") == "counted"
                time.sleep(0.6)
                b.screenshot(shots / "live-view-strip.png")
        tree.check_alive()
    for name in ("live-view.png", "live-view-changed.png", "live-view-strip.png"):
        assert (shots / name).stat().st_size > 20_000
