"""The built-in analyses: summed diffraction pattern, virtual detectors, centre of mass with DPC, radial profile.

Conventions (docs/analyses.md): a detector pixel is (row, column), its flat index ``row * frame_cols + col``;
a centre is ``[row, column]`` in pixels; scan images are (scan rows, scan cols). Where stempy has the same
analysis (``stempy.image.calculate_sum_sparse``, ``virtual_darkfield``, ``com_sparse``,
``radial_sum_sparse``) the result equals stempy's: the same formulas on the same values, element by element.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stemstream.analyses.base import AnalysisBase, EventBatch, Partial, ScanGeometry
from stemstream.errors import AnalysisError

CENTRE_BIN = 4  # the summed pattern is binned 4 x 4 before its bright disk is located
CENTRE_DECIMALS = 1  # a found centre is rounded to 0.1 px (recorded, and compared, as such)
CENTRE_LIVE_STEP = 0.5  # while a scan streams, a found centre moves the detectors when it moved this far
DEFAULT_DETECTORS = {"bf": [0.0, 60.0], "adf": [70.0, 250.0]}
MAX_DETECTORS = 8
_DETECTOR_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def frame_centre(frame_shape: tuple[int, int]) -> tuple[float, float]:
    """The geometric centre of a frame, (row, col)."""
    return ((frame_shape[0] - 1) / 2, (frame_shape[1] - 1) / 2)


def find_centre(pattern: np.ndarray) -> tuple[float, float]:
    """The centre (row, col) of the bright-field disk of a summed diffraction pattern.

    The pattern is summed in ``CENTRE_BIN`` x ``CENTRE_BIN`` blocks, and each block with its 8 neighbours
    (a 3 x 3 box over the blocks, zero beyond the edge) to tame counting noise; the centre is the
    weighted centroid of the smoothed blocks at or above half-way between the lowest and the highest
    (weights: the smoothed counts; positions: block centres in pixels), rounded to ``CENTRE_DECIMALS``.
    A flat (or empty) pattern gives the frame centre.
    """
    pattern = np.asarray(pattern)
    rows, cols = pattern.shape
    b = CENTRE_BIN if min(rows, cols) >= CENTRE_BIN else 1
    r, c = rows // b, cols // b
    binned = pattern[: r * b, : c * b].astype(np.float64).reshape(r, b, c, b).sum(axis=(1, 3))
    padded = np.pad(binned, 1)
    smooth = sum(padded[i : i + r, j : j + c] for i in range(3) for j in range(3))
    lo, hi = float(smooth.min()), float(smooth.max())
    if not hi > lo:
        return frame_centre((rows, cols))
    weights = np.where(smooth >= (lo + hi) / 2, smooth, 0.0)
    total = weights.sum()
    ys = np.arange(r) * b + (b - 1) / 2
    xs = np.arange(c) * b + (b - 1) / 2
    cy = float(weights.sum(axis=1) @ ys / total)
    cx = float(weights.sum(axis=0) @ xs / total)
    return round(cy, CENTRE_DECIMALS), round(cx, CENTRE_DECIMALS)


def distance_map(frame_shape: tuple[int, int], centre: Sequence[float]) -> np.ndarray:
    """Distance of every pixel from ``centre`` (row, col), flat float64, computed as stempy computes it for
    an event: ``sqrt((row - c_row) ** 2 + (col - c_col) ** 2)``."""
    rows, cols = np.divmod(np.arange(frame_shape[0] * frame_shape[1], dtype=np.int64), frame_shape[1])
    return np.sqrt((rows - float(centre[0])) ** 2 + (cols - float(centre[1])) ** 2)


def _centre_param(value: Any, what: str) -> list[float] | None:
    if value is None:
        return None
    try:
        cy, cx = (float(v) for v in value)
    except (TypeError, ValueError):
        raise AnalysisError(f"{what}: centre must be [row, col] in pixels or null, got {value!r}") from None
    if not (math.isfinite(cy) and math.isfinite(cx)) or abs(cy) > 1e5 or abs(cx) > 1e5:
        raise AnalysisError(f"{what}: centre {value!r} is not a finite pixel position")
    return [cy, cx]


class _AutoCentre(AnalysisBase):
    """A centre given, or found from the summed pattern (``center: null``): ``refine`` finds it."""

    needs = ("sum",)

    def centre(self, frame_shape: tuple[int, int]) -> tuple[float, float]:
        c = self._params["center"]
        return (c[0], c[1]) if c is not None else frame_centre(frame_shape)

    def refine(self, partials: Mapping[str, Partial], scan: ScanGeometry, final: bool = False) -> dict | None:
        """New parameters with the centre found from the merged summed pattern, or None: when the centre is
        given, when it did not change, or (``final`` False, while streaming) moved less than
        ``CENTRE_LIVE_STEP`` pixels."""
        if not self._params["center_auto"] or "sum" not in partials:
            return None
        found = find_centre(partials["sum"]["sum"].reshape(scan.frame_shape))
        now = self._params["center"]
        if now is not None:
            moved = math.hypot(found[0] - now[0], found[1] - now[1])
            if moved == 0 or (not final and moved < CENTRE_LIVE_STEP):
                return None
        return {**self._params, "center": [found[0], found[1]]}


class SummedPattern(AnalysisBase):
    """The summed diffraction pattern: events per detector pixel over the scan (``pattern``, uint64, the
    frame's shape), as ``stempy.image.calculate_sum_sparse``."""

    name = "sum"

    def __init__(self) -> None:
        self._keep()

    def start(self, scan: ScanGeometry) -> Partial:
        return {"sum": np.zeros(scan.n_pixels, np.uint64)}

    def process(self, partial: Partial, batch: EventBatch) -> None:
        if batch.events.size > partial["sum"].size // 8:
            partial["sum"] += np.bincount(batch.events, minlength=partial["sum"].size).astype(np.uint64)
        elif batch.events.size:
            np.add.at(partial["sum"], batch.events, 1)

    def results(self, partial: Partial, scan: ScanGeometry) -> dict[str, np.ndarray]:
        return {"pattern": partial["sum"].reshape(scan.frame_shape)}


class VirtualDetectors(_AutoCentre):
    """Virtual detectors: per probe position, the events at distance ``inner <= r < outer`` from the centre.

    ``detectors`` maps a name to ``[inner, outer]`` in pixels (default a bright field of radius 60 and an
    annular dark field 70 .. 250); a bright field is ``[0, r]``. ``center`` is ``[row, col]``, or null to
    find it from the summed pattern. Results: one uint32 image per detector, and ``center``. A bright field
    equals ``stempy.image.virtual_darkfield(sparse, col, row, r)`` (stempy also counts ``r < radius``).
    """

    name = "virtual"

    def __init__(
        self,
        detectors: Mapping[str, Sequence[float]] | None = None,
        center: Sequence[float] | None = None,
        center_auto: bool | None = None,
    ) -> None:
        chosen = DEFAULT_DETECTORS if detectors is None else detectors
        if not isinstance(chosen, Mapping) or not 1 <= len(chosen) <= MAX_DETECTORS:
            raise AnalysisError(f"virtual: detectors must map 1..{MAX_DETECTORS} names to [inner, outer]")
        clean: dict[str, list[float]] = {}
        for name, radii in chosen.items():
            if not isinstance(name, str) or not _DETECTOR_NAME.match(name):
                raise AnalysisError(f"virtual: detector name {name!r}: lower-case letters, digits, _ (<= 32)")
            try:
                inner, outer = (float(r) for r in radii)
            except (TypeError, ValueError):
                raise AnalysisError(f"virtual: detector {name}: give [inner, outer] radii, got {radii!r}") from None
            if not (0 <= inner < outer <= 10_000):
                raise AnalysisError(f"virtual: detector {name}: need 0 <= inner < outer <= 10000, got {radii!r}")
            clean[name] = [inner, outer]
        centre = _centre_param(center, "virtual")
        self._keep(detectors=clean, center=centre, center_auto=centre is None if center_auto is None else center_auto)
        self._masks: tuple[tuple[int, int], tuple[float, float], dict[str, np.ndarray]] | None = None

    def masks(self, frame_shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """Flat boolean mask of each detector (computed once per frame shape and centre)."""
        centre = self.centre(frame_shape)
        if self._masks is None or self._masks[:2] != (frame_shape, centre):
            r = distance_map(frame_shape, centre)
            masks = {n: (r >= inner) & (r < outer) for n, (inner, outer) in self._params["detectors"].items()}
            self._masks = (frame_shape, centre, masks)
        return self._masks[2]

    def start(self, scan: ScanGeometry) -> Partial:
        return {f"image.{n}": np.zeros(scan.n_frames, np.uint32) for n in self._params["detectors"]}

    def process(self, partial: Partial, batch: EventBatch) -> None:
        if not batch.events.size:
            return
        for name, mask in self.masks(batch.frame_shape).items():
            inside = mask[batch.events]
            partial[f"image.{name}"][batch.frames] += np.bincount(batch.index[inside], minlength=len(batch)).astype(
                np.uint32
            )

    def results(self, partial: Partial, scan: ScanGeometry) -> dict[str, np.ndarray]:
        out = {n: partial[f"image.{n}"].reshape(scan.scan_shape) for n in self._params["detectors"]}
        out["center"] = np.asarray(self.centre(scan.frame_shape), np.float64)
        return out


class CentreOfMass(AnalysisBase):
    """Centre of mass of each frame's events and differential phase contrast (DPC) from it.

    ``com``: (2, scan rows, scan cols) float32 in stempy's order, ``com[0]`` the mean column and ``com[1]``
    the mean row of the frame's events (stempy calls them y and x: its x is the row), as
    ``stempy.image.com_sparse``: frames without events are NaN, replaced by the mean of the others when
    ``replace_nans`` (stempy's default). DPC: the shift of each frame's centre of mass (float64) from
    ``reference`` ([row, col]; default the centre of mass of the whole scan), rotated by ``rotation_deg``
    (scan rotation), as ``dpc_magnitude`` (pixels) and ``dpc_angle`` (radians, ``arctan2(d_row, d_col)``),
    float32, NaN for frames without events.
    """

    name = "com"

    def __init__(
        self, replace_nans: bool = True, rotation_deg: float = 0.0, reference: Sequence[float] | None = None
    ) -> None:
        if not isinstance(replace_nans, bool):
            raise AnalysisError(f"com: replace_nans must be true or false, got {replace_nans!r}")
        try:
            rotation = float(rotation_deg)
        except (TypeError, ValueError):
            raise AnalysisError(f"com: rotation_deg must be a number, got {rotation_deg!r}") from None
        if not -360 <= rotation <= 360:
            raise AnalysisError(f"com: rotation_deg {rotation} is not in -360 .. 360")
        self._keep(replace_nans=replace_nans, rotation_deg=rotation, reference=_centre_param(reference, "com"))

    def start(self, scan: ScanGeometry) -> Partial:
        return {k: np.zeros(scan.n_frames, np.int64) for k in ("n", "sum_row", "sum_col")}

    def process(self, partial: Partial, batch: EventBatch) -> None:
        if not batch.events.size:
            return
        partial["n"][batch.frames] += batch.lengths
        # Sums of integers below 2**53: exact in float64, so exact after the cast back.
        partial["sum_row"][batch.frames] += batch.per_frame(batch.rows).astype(np.int64)
        partial["sum_col"][batch.frames] += batch.per_frame(batch.cols).astype(np.int64)

    def results(self, partial: Partial, scan: ScanGeometry) -> dict[str, np.ndarray]:
        n, sum_row, sum_col = partial["n"], partial["sum_row"], partial["sum_col"]
        valid = n > 0
        com = np.full((2, scan.n_frames), np.nan, np.float32)
        com[0, valid] = sum_col[valid] / n[valid]
        com[1, valid] = sum_row[valid] / n[valid]
        com = com.reshape((2, *scan.scan_shape))
        if self._params["replace_nans"]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # every frame empty: the mean is NaN too
                mean = np.nanmean(com, axis=(1, 2))
            np.nan_to_num(com[0], nan=mean[0], copy=False)
            np.nan_to_num(com[1], nan=mean[1], copy=False)
        with np.errstate(invalid="ignore", divide="ignore"):
            cy = np.where(valid, sum_row / np.maximum(n, 1), np.nan)
            cx = np.where(valid, sum_col / np.maximum(n, 1), np.nan)
            total = int(n.sum())
            reference = self._params["reference"]
            if reference is None:
                reference = [sum_row.sum() / total, sum_col.sum() / total] if total else [math.nan, math.nan]
            dy, dx = cy - reference[0], cx - reference[1]
            theta = math.radians(self._params["rotation_deg"])
            ux = dx * math.cos(theta) - dy * math.sin(theta)
            uy = dx * math.sin(theta) + dy * math.cos(theta)
            magnitude = np.hypot(ux, uy)
            angle = np.arctan2(uy, ux)
        return {
            "com": com,
            "dpc_magnitude": magnitude.astype(np.float32).reshape(scan.scan_shape),
            "dpc_angle": angle.astype(np.float32).reshape(scan.scan_shape),
            "reference": np.asarray(reference, np.float64),
        }


class RadialProfile(_AutoCentre):
    """Events by distance from the centre, in unit bins ``[k, k + 1)`` (the last bin closed), as
    ``stempy.image.radial_sum_sparse``: ``bins`` defaults to half the larger frame side (stempy's), events
    further out are not counted. ``profile``: (bins,) int64 over the scan; with ``per_position``,
    ``per_position``: (scan rows, scan cols, bins) uint32, stempy's result. ``center`` as for the virtual
    detectors (null: found from the summed pattern)."""

    name = "radial"

    def __init__(
        self,
        center: Sequence[float] | None = None,
        center_auto: bool | None = None,
        bins: int | None = None,
        per_position: bool = False,
    ) -> None:
        if bins is not None and (not isinstance(bins, int) or not 1 <= bins <= 4096):
            raise AnalysisError(f"radial: bins must be an integer 1 .. 4096 or null, got {bins!r}")
        if not isinstance(per_position, bool):
            raise AnalysisError(f"radial: per_position must be true or false, got {per_position!r}")
        centre = _centre_param(center, "radial")
        auto = centre is None if center_auto is None else center_auto
        self._keep(center=centre, center_auto=auto, bins=bins, per_position=per_position)
        self._map: tuple[tuple[int, int], tuple[float, float], np.ndarray] | None = None

    def n_bins(self, frame_shape: tuple[int, int]) -> int:
        return self._params["bins"] or int(max(frame_shape) / 2)

    def bin_map(self, frame_shape: tuple[int, int]) -> np.ndarray:
        """Flat int64 bin of every pixel, -1 beyond the last bin (once per frame shape and centre)."""
        centre = self.centre(frame_shape)
        if self._map is None or self._map[:2] != (frame_shape, centre):
            bins = self.n_bins(frame_shape)
            r = distance_map(frame_shape, centre)
            k = np.floor(r).astype(np.int64)
            k[r == bins] = bins - 1  # numpy.histogram's last bin is closed
            k[r > bins] = -1
            self._map = (frame_shape, centre, k)
        return self._map[2]

    def start(self, scan: ScanGeometry) -> Partial:
        bins = self.n_bins(scan.frame_shape)
        partial = {"profile": np.zeros(bins, np.int64)}
        if self._params["per_position"]:
            partial["per_position"] = np.zeros(scan.n_frames * bins, np.uint32)
        return partial

    def process(self, partial: Partial, batch: EventBatch) -> None:
        if not batch.events.size:
            return
        k = self.bin_map(batch.frame_shape)[batch.events]
        keep = k >= 0
        bins = partial["profile"].size
        partial["profile"] += np.bincount(k[keep], minlength=bins)
        if "per_position" in partial:
            np.add.at(partial["per_position"], batch.frames[batch.index[keep]] * bins + k[keep], 1)

    def results(self, partial: Partial, scan: ScanGeometry) -> dict[str, np.ndarray]:
        out = {"profile": partial["profile"], "center": np.asarray(self.centre(scan.frame_shape), np.float64)}
        if "per_position" in partial:
            out["per_position"] = partial["per_position"].reshape((*scan.scan_shape, partial["profile"].size))
        return out


BUILTINS: dict[str, type] = {
    "sum": SummedPattern,
    "virtual": VirtualDetectors,
    "com": CentreOfMass,
    "radial": RadialProfile,
}
