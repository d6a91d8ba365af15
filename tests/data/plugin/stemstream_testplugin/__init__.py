"""A user's analysis in a package of its own, registered by entry point (tests/data/plugin): events per frame
as an image, and the frames with more than ``busy`` events. It does not import stemstream: the Protocol
is structural."""

from __future__ import annotations

import numpy as np


class Occupancy:
    name = "occupancy"

    def __init__(self, busy: int = 30) -> None:
        self.busy = int(busy)

    def params(self) -> dict:
        return {"busy": self.busy}

    def start(self, scan) -> dict:
        return {"events": np.zeros(scan.n_frames, np.int64)}

    def process(self, partial: dict, batch) -> None:
        partial["events"][batch.frames] += batch.lengths

    def results(self, partial: dict, scan) -> dict:
        events = partial["events"]
        return {"events": events.reshape(scan.scan_shape), "busy_frames": np.flatnonzero(events > self.busy)}
