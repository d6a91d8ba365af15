"""The live view: one web page per counting job (a session), served by rank 0, where the scans' events are.

FastAPI on uvicorn, in a thread of rank 0's process, bound to ``STEMSTREAM_BIND_HOST`` and the first free
port of ``STEMSTREAM_PORT_RANGE``. Every route is under ``/<token>/``, a random capability published only
in rank 0's registry record (the store) and the Prefect run's link: without it, 404. Read-only but for the
detector settings (docs/security.md, "The live view").

* ``GET  /<token>/``                the page (static HTML and JavaScript, no external resources)
* ``GET  /<token>/events[?scan=n]`` server-sent events, every ``interval_s``: progress, frames/s,
  incomplete frames, the strip of the session's scans, the detector settings; and, when the scan shown
  changed, its images (palette PNGs) and the detectors to draw
* ``GET  /<token>/api/state[?scan=n]`` the same as one JSON document
* ``GET  /<token>/thumb/<n>.png``   a finished scan's thumbnail
* ``POST /<token>/api/settings``    ``{"center": null | [row, col], "detectors": {name: [inner, outer]},
  "scan": n}``: new detector settings (validated here, applied by the control thread at once)

What it costs rank 0 is the rendering, once per scan version and interval (shared by every client), and
one small JSON message per client per interval: ``LiveView.cpu_seconds`` measures the server's thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request  # route signatures are read at run time: module level
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from stemstream.analyses import png
from stemstream.analyses.board import Board
from stemstream.analyses.files import images
from stemstream.analyses.runner import Outcome
from stemstream.errors import AnalysisError, ConfigError

logger = logging.getLogger(__name__)

_WILDCARDS = ("0.0.0.0", "::", "*", "")


@dataclass(frozen=True)
class ViewConfig:
    """Where and how the live view is served."""

    host: str = "127.0.0.1"
    ports: range = field(default_factory=lambda: range(40000, 41000))
    token: str | None = None  # None: a new random one
    interval_s: float = 0.5  # a client gets an update this often (progress), images when they changed


def bind_in_range(host: str, ports: range) -> socket.socket:
    """A listening TCP socket on ``host`` at the first free port of ``ports``; ConfigError if none is."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host if host not in ("*", "") else "0.0.0.0", port))
            sock.listen(64)
            sock.setblocking(False)
            return sock
        except OSError:
            sock.close()
    raise ConfigError(
        f"no free port for the live view on {host!r} in {ports.start}-{ports.stop - 1}: "
        "widen STEMSTREAM_PORT_RANGE, or set STEMSTREAM_VIEW=false"
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Renderer:
    """Images of a scan for the page, rendered once per (scan, version) and shared by every client; while a
    scan streams, at most once per ``min_interval_s`` (its version changes with every rank's report)."""

    def __init__(self, board: Board, min_interval_s: float = 1.0) -> None:
        self.board = board
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._cache: dict[int, tuple[int, float, dict[str, Any]]] = {}
        self.renders = 0

    def render(self, number: int) -> dict[str, Any] | None:
        version = self.board.version(number)
        if version is None:
            return None
        with self._lock:
            hit = self._cache.get(number)
            if hit is not None and hit[0] == version:
                return hit[2]
            fresh = hit is not None and time.monotonic() - hit[1] < self.min_interval_s
            if fresh and hit[2].get("status") == "streaming" and number in self.board.live_numbers():
                return hit[2]
        viewed = self.board.view(number)
        if viewed is None:
            return None
        version, outcomes, facts = viewed
        payload = {"scan": number, "version": version, **facts, **_draw(outcomes)}
        with self._lock:
            self._cache[number] = (version, time.monotonic(), payload)
            for old in sorted(self._cache)[:-8]:
                del self._cache[old]
            self.renders += 1
        return payload


def _draw(outcomes: Mapping[str, Outcome]) -> dict[str, Any]:
    """What the page shows of a scan: PNGs (base64) by ``analysis.result``, the detectors and centre to draw
    on the pattern, the radial profile, per-image totals (for tests and the captions), errors."""
    pictures: dict[str, str] = {}
    totals: dict[str, float] = {}
    for name, outcome in outcomes.items():
        if outcome.error:
            continue
        for key, image in images(outcome):
            if name == "com" and key in ("com_col", "com_row"):
                continue  # the DPC pictures say it better
            if key == "pattern" and min(image.shape) >= 512:  # shown at 384 px: half the pixels do
                rows, cols = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
                image = image[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).sum(axis=(1, 3))
            cmap, log = png.style(key)
            pictures[f"{name}.{key}"] = _b64(png.image_png(image, cmap, log=log))
            finite = np.asarray(image, np.float64)
            totals[f"{name}.{key}"] = float(np.nansum(finite))
    virtual = outcomes.get("virtual")
    radial = outcomes.get("radial")
    return {
        "images": pictures,
        "totals": totals,
        "frame_shape": list(outcomes["sum"].results["pattern"].shape) if "sum" in outcomes else [576, 576],
        "center": list(map(float, virtual.results["center"])) if virtual and "center" in virtual.results else None,
        "center_auto": bool(virtual.params.get("center_auto")) if virtual else None,
        "detectors": virtual.params.get("detectors") if virtual else {},
        "profile": radial.results["profile"].tolist() if radial and "profile" in radial.results else None,
        "errors": {n: o.error for n, o in outcomes.items() if o.error},
    }


class LiveView:
    """The page's server (module docstring): ``start()``, ``url``, ``stop()``."""

    def __init__(self, board: Board, config: ViewConfig, post: Callable[[dict[str, Any]], None]) -> None:
        self.board = board
        self.config = config
        self.post = post
        self.token = config.token or secrets.token_urlsafe(16)
        self.renderer = Renderer(board)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.port = 0
        self.clients = 0
        self.pushed = 0
        self._started_at = 0.0

    @property
    def url(self) -> str:
        host = self.config.host
        if host in _WILDCARDS:
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/{self.token}/"

    def start(self, timeout: float = 10.0) -> LiveView:
        import uvicorn

        self._sock = bind_in_range(self.config.host, self.config.ports)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(), log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="live-view", daemon=True)
        self._started_at = time.time()
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise ConfigError(f"the live view did not start on port {self.port}")
            time.sleep(0.02)
        logger.info("live view at %s", self.url)
        return self

    def _run(self) -> None:
        assert self._server is not None and self._sock is not None
        # uvicorn installs signal handlers only on the main thread; this is not it.
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()

    def cpu_seconds(self) -> float:
        """CPU time of the server's thread so far (rendering, JSON, HTTP): what the page costs rank 0."""
        if self._thread is None or self._thread.ident is None:
            return 0.0
        with contextlib.suppress(OSError, AttributeError):
            return time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))
        return 0.0

    # ---- the application

    def state(
        self, scan: int | None, rendered: tuple[int, int] | None
    ) -> tuple[dict[str, Any], tuple[int, int] | None]:
        """One update: the strip, settings and the scan shown; its images only when not ``rendered``."""
        strip = self.board.strip()
        live = [s["scan"] for s in strip if s["status"] == "streaming"]
        shown = scan if scan is not None else (live[-1] if live else (strip[-1]["scan"] if strip else None))
        for s in strip:
            s["thumb"] = f"thumb/{s['scan']}.png?v={s['version']}" if self.board.thumb(s["scan"]) else None
        out: dict[str, Any] = {
            "at": time.time(),
            "strip": strip,
            "live": live,
            "shown": shown,
            "following": scan is None,
            "settings": self.board.settings(),
            "settings_version": self.board.settings_version,
        }
        out["cost"] = {
            "cpu_s": round(self.cpu_seconds(), 4),
            "since": self._started_at,
            "clients": self.clients,
            "renders": self.renderer.renders,
            "pushed": self.pushed,
        }
        progress = next((s for s in strip if s["scan"] == shown), None)
        if progress is not None:
            out["progress"] = progress
        if shown is not None:
            version = self.board.version(shown)
            if version is not None and (shown, version) != rendered:
                view = self.renderer.render(shown)
                if view is not None:
                    out["view"] = view
                    rendered = (shown, view["version"])
        return out, rendered

    def app(self) -> Any:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        token = self.token
        page = resources.files("stemstream.analyses").joinpath("static/live.html").read_text()

        def check(t: str) -> None:
            if not secrets.compare_digest(t, token):
                raise HTTPException(status_code=404)

        @app.get("/{t}/", response_class=HTMLResponse)
        def index(t: str) -> str:
            check(t)
            return page

        @app.get("/{t}/api/state")
        async def state(t: str, scan: int | None = None) -> JSONResponse:
            check(t)
            out, _ = self.state(scan, None)
            return JSONResponse(out)

        @app.get("/{t}/thumb/{n}.png")
        def thumb(t: str, n: int) -> Response:
            check(t)
            data = self.board.thumb(n)
            if data is None:
                raise HTTPException(status_code=404)
            return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

        @app.post("/{t}/api/settings")
        async def settings(t: str, request: Request) -> JSONResponse:
            check(t)
            try:
                body = json.loads(await request.body())
                if not isinstance(body, dict):
                    raise AnalysisError("give a JSON object: center, detectors, scan")
                scan = body.pop("scan", None)
                clean = Board.check_settings(body)
            except (ValueError, AnalysisError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            self.post({"kind": "_settings", "settings": clean, "scan": scan, "source": "page"})
            return JSONResponse({"ok": True, "settings": clean})

        @app.get("/{t}/events")
        async def events(t: str, request: Request, scan: int | None = None) -> StreamingResponse:
            check(t)

            async def stream() -> Any:
                rendered: tuple[int, int] | None = None
                self.clients += 1
                try:
                    while not await request.is_disconnected():
                        out, rendered = self.state(scan, rendered)  # here: all the view's work on one thread
                        self.pushed += 1
                        yield f"data: {json.dumps(out, separators=(',', ':'))}\n\n"
                        await asyncio.sleep(self.config.interval_s)
                finally:
                    self.clients -= 1

            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

        return app
