"""A seeded simulator of the NCEM 4D Camera: frames, sectors, sector loss and exact ground truth.

A frame is ``background + electron strikes + x-ray spikes``:

* background: a fixed per-pixel dark offset (seed only, so dark references carry over between scans)
  plus read noise, taken from a pool of ``pool_size`` pre-generated noise frames (the expensive part,
  generated lazily, once per pool entry);
* electron strikes: ``Poisson(electrons_per_frame)`` per frame, each a centre pixel plus smaller charge in
  its 8 neighbours, the centre a strict local maximum; strikes are at least 3 pixels apart (Chebyshev) so
  that their footprints never touch and every centre is a resolvable event; a share of them, set by a
  simulated crystal at the probe position (:meth:`FourDCameraSim.bright_field_share`), falls in the
  bright-field disk around the frame centre, so a virtual bright-field image shows a lattice;
* x-ray spikes: ``Poisson(xray_rate)`` very bright single pixels per frame, not part of the ground truth.

Sector loss is a transport matter: :meth:`FourDCameraSim.frame` is the same whether or not a sector is lost,
:meth:`FourDCameraSim.is_lost` says which sectors never reached their receiving server.

The signal levels are chosen for stempy's default counting (background ``mean + 4 sigma`` of a Gaussian fit,
x-ray ``mean + 10 sigma`` of the raw sample): the read noise is a Gaussian truncated at
``NOISE_CLIP_SIGMA`` sigma and the dark pattern is bounded, so that background never reaches the
background threshold (an untruncated Gaussian puts ~5 false events in every 576 x 576 frame at 4 sigma,
as many as a quarter of the real ones), and an electron's centre lands between the two thresholds with or
without dark subtraction.
"""

from __future__ import annotations

import logging

import numpy as np

from stemstream.errors import ConfigError
from stemstream.wire.protocol import FRAME_SHAPE, N_SECTORS, SECTOR_SHAPE

logger = logging.getLogger(__name__)

# Read noise is a Gaussian truncated at this many sigma (resampled, not clipped: no pile-up at the edge).
NOISE_CLIP_SIGMA = 3.5
# The per-pixel dark pattern is uniform in dark_level +- DARK_SPREAD_SIGMA * read_noise (integers).
DARK_SPREAD_SIGMA = 1 / 3
# Charge of a strike's neighbours as fractions of its centre: edge neighbours, then corners.
_EDGE_FRACTION = (0.10, 0.25)
_CORNER_FRACTION = (0.02, 0.08)
_CENTRE_JITTER = 0.04  # centre charge is electron_signal * U(1 - j, 1 + j)
_MIN_SEPARATION = 3  # Chebyshev distance between strike centres
_XRAY_COUNTS = (4000, 16000)
_BLOCK = 256  # frames whose strikes come from one random stream
BF_DISK_RADIUS = 55.0  # pixels: the unscattered beam's disk around the frame centre
_LATTICE = 8.0  # probe positions between the simulated sample's atomic columns

_W = FRAME_SHAPE[1]
# Flat offsets of a strike's footprint: centre, 4 edge neighbours, 4 corners.
_EDGE_OFFSETS = np.array([-_W, -1, 1, _W], dtype=np.int64)
_CORNER_OFFSETS = np.array([-_W - 1, -_W + 1, _W - 1, _W + 1], dtype=np.int64)

# Stream tags keep the random streams of one (seed, scan) independent of each other.
_TAG_DARK, _TAG_POOL, _TAG_STRIKES, _TAG_LOSS, _TAG_DARK_FRAMES = 0xDA, 0xB0, 0x57, 0x10, 0xDF


class FourDCameraSim:
    """Deterministic (for ``seed``, ``scan_number``, frame index) 4D Camera frames and sectors.

    ``electron_signal`` is the mean charge (counts) deposited in a strike's centre pixel. The default,
    ``7.2 * read_noise``, puts the centre above stempy's background threshold (``4 sigma``) and below its
    x-ray threshold (``10 sigma`` of the raw sample), with or without dark subtraction.

    Not thread-safe (it caches the current frame and strike block): use one instance per thread.
    """

    frame_shape = FRAME_SHAPE
    n_sectors = N_SECTORS
    sector_shape = SECTOR_SHAPE

    def __init__(
        self,
        scan_shape: tuple[int, int] = (32, 32),
        *,
        scan_number: int = 1,
        seed: int = 0,
        loss_rate: float = 0.001,
        electrons_per_frame: float = 20.0,
        dark_level: float = 100.0,
        read_noise: float = 3.0,
        electron_signal: float | None = None,
        xray_rate: float = 0.001,
        pool_size: int = 64,
    ) -> None:
        if len(scan_shape) != 2 or not all(isinstance(n, int | np.integer) and n > 0 for n in scan_shape):
            raise ConfigError(f"FourDCameraSim: scan_shape must be two positive integers, got {scan_shape!r}")
        if not 0 <= loss_rate < 1:
            raise ConfigError(f"FourDCameraSim: loss_rate must be in [0, 1), got {loss_rate}")
        if not 0 <= electrons_per_frame <= 500:
            raise ConfigError(f"FourDCameraSim: electrons_per_frame={electrons_per_frame} is not in 0..500")
        if not 0 < read_noise <= 100 or not 0 <= dark_level <= 20000:
            raise ConfigError("FourDCameraSim: read_noise must be in (0, 100] and dark_level in 0..20000")
        if electron_signal is None:
            electron_signal = 7.2 * read_noise
        if not 0 < electron_signal <= 20000:
            raise ConfigError(f"FourDCameraSim: electron_signal must be in (0, 20000], got {electron_signal}")
        if xray_rate < 0 or pool_size < 1 or scan_number < 0 or seed < 0:
            raise ConfigError("FourDCameraSim: xray_rate, scan_number and seed must be >= 0, pool_size >= 1")
        self.scan_shape = (int(scan_shape[0]), int(scan_shape[1]))
        self.scan_number = int(scan_number)
        self.seed = int(seed)
        self.n_frames = self.scan_shape[0] * self.scan_shape[1]
        self.loss_rate = float(loss_rate)
        self.electrons_per_frame = float(electrons_per_frame)
        self.dark_level = float(dark_level)
        self.read_noise = float(read_noise)
        self.electron_signal = float(electron_signal)
        self.xray_rate = float(xray_rate)
        self.pool_size = int(pool_size)

        spread = round(DARK_SPREAD_SIGMA * self.read_noise)
        dark_rng = np.random.default_rng([self.seed, _TAG_DARK])
        dark = round(self.dark_level) + dark_rng.integers(-spread, spread + 1, size=FRAME_SHAPE)
        self._dark = dark.astype(np.float32)
        self._pool: list[np.ndarray | None] = [None] * self.pool_size
        self._lost: np.ndarray | None = None
        self._block_index = -1
        self._block: _StrikeBlock | None = None
        self._frame_index: int | None = None
        self._frame: np.ndarray | None = None

    # --- public API -------------------------------------------------------------------------------------

    def frame(self, i: int) -> np.ndarray:
        """The full (576, 576) uint16 frame ``i``; a new array each call (callers may keep or change it)."""
        return self._cached_frame(i).copy()

    def sector(self, i: int, m: int) -> np.ndarray:
        """Rows ``m*144 .. m*144+143`` of frame ``i``: a read-only, C-contiguous uint16 (144, 576) view."""
        if not 0 <= m < N_SECTORS:
            raise IndexError(f"sector {m} outside 0..{N_SECTORS - 1}")
        rows = SECTOR_SHAPE[0]
        # A view of the cached frame: contiguous (whole rows), and the cache never writes into a frame it
        # handed out, so the view stays valid after the next frame is made.
        return self._cached_frame(i)[m * rows : (m + 1) * rows]

    def is_lost(self, i: int, m: int) -> bool:
        """Whether sector ``m`` of frame ``i`` never reached its receiving server (seeded)."""
        self._check_frame(i)
        if not 0 <= m < N_SECTORS:
            raise IndexError(f"sector {m} outside 0..{N_SECTORS - 1}")
        return bool(self._loss_table()[i, m])

    def lost_sectors(self) -> set[tuple[int, int]]:
        """Every ``(frame, sector)`` lost in the scan."""
        frames, sectors = np.nonzero(self._loss_table())
        return {(int(f), int(m)) for f, m in zip(frames, sectors, strict=True)}

    def ground_truth(self, i: int) -> np.ndarray:
        """Flat uint32 pixel indices (``row * 576 + col``) of the strike centres of frame ``i``, ascending."""
        self._check_frame(i)
        block = self._strike_block(i // _BLOCK)
        lo, hi = block.span(i % _BLOCK)
        return np.sort(block.centres[lo:hi]).astype(np.uint32)

    def bright_field_share(self, frames: np.ndarray) -> np.ndarray:
        """The share of electrons in the bright-field disk at these frames' probe positions: a lattice of
        atomic columns channels them (0.9 on a column, 0.1 between), so that a virtual bright-field
        image of the scan shows the lattice."""
        y, x = np.divmod(np.asarray(frames) % self.n_frames, self.scan_shape[1])
        dy = (y + _LATTICE / 2) % _LATTICE - _LATTICE / 2  # to the nearest column
        dx = (x + _LATTICE / 2) % _LATTICE - _LATTICE / 2
        return 0.1 + 0.8 * np.exp(-(dy**2 + dx**2) / (2 * (_LATTICE / 5) ** 2))

    def dark_reference(self) -> np.ndarray:
        """The per-pixel dark offset the simulator adds, (576, 576) float32 (a copy)."""
        return self._dark.copy()

    def dark_frames(self, n: int) -> np.ndarray:
        """``n`` frames of dark offset plus read noise and no electrons, (n, 576, 576) uint16."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = np.random.default_rng([self.seed, self.scan_number, _TAG_DARK_FRAMES])
        out = np.empty((n, *FRAME_SHAPE), dtype=np.uint16)
        for k in range(n):
            out[k] = self._background(rng)
        return out

    def __repr__(self) -> str:
        return (
            f"FourDCameraSim(scan_shape={self.scan_shape}, scan_number={self.scan_number}, seed={self.seed}, "
            f"loss_rate={self.loss_rate}, electrons_per_frame={self.electrons_per_frame})"
        )

    # --- internals --------------------------------------------------------------------------------------

    def _check_frame(self, i: int) -> None:
        if not 0 <= i < self.n_frames:
            raise IndexError(f"frame {i} outside a {self.scan_shape[0]}x{self.scan_shape[1]} scan")

    def _loss_table(self) -> np.ndarray:
        if self._lost is None:
            rng = np.random.default_rng([self.seed, self.scan_number, _TAG_LOSS])
            self._lost = rng.random((self.n_frames, N_SECTORS), dtype=np.float32) < self.loss_rate
        return self._lost

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        noise = rng.standard_normal(FRAME_SHAPE, dtype=np.float32)
        # Resample the tails (a few hundred pixels) rather than clip them.
        while True:
            out = np.abs(noise) > NOISE_CLIP_SIGMA
            n_out = int(np.count_nonzero(out))
            if not n_out:
                break
            noise[out] = rng.standard_normal(n_out, dtype=np.float32)
        noise *= self.read_noise
        noise += self._dark
        np.rint(noise, out=noise)
        np.clip(noise, 0, 65535, out=noise)
        return noise.astype(np.uint16)

    def _pool_entry(self, k: int) -> np.ndarray:
        entry = self._pool[k]
        if entry is None:
            entry = self._background(np.random.default_rng([self.seed, self.scan_number, _TAG_POOL, k]))
            entry.flags.writeable = False
            self._pool[k] = entry
            logger.debug("scan %d: noise pool entry %d of %d made", self.scan_number, k, self.pool_size)
        return entry

    def _strike_block(self, b: int) -> _StrikeBlock:
        if b != self._block_index:
            n = min(_BLOCK, self.n_frames - b * _BLOCK)
            self._block = _StrikeBlock.generate(self, b, n)
            self._block_index = b
        assert self._block is not None
        return self._block

    def _cached_frame(self, i: int) -> np.ndarray:
        if i != self._frame_index:
            self._check_frame(i)
            self._frame = self._make_frame(i)
            self._frame_index = i
        assert self._frame is not None
        return self._frame

    def _make_frame(self, i: int) -> np.ndarray:
        block = self._strike_block(i // _BLOCK)
        j = i % _BLOCK
        frame = self._pool_entry(int(block.pool_index[j])).copy()
        flat = frame.reshape(-1)
        lo, hi = block.span(j)
        if hi > lo:
            # Footprints are disjoint (strikes >= 3 apart), so fancy-index += never meets a repeated index.
            pixels = block.pixels[lo:hi].reshape(-1)
            flat[pixels] = np.minimum(flat[pixels] + block.charges[lo:hi].reshape(-1), 65535)
        xlo, xhi = block.xray_span(j)
        for pos, counts in zip(block.xray_pos[xlo:xhi], block.xray_counts[xlo:xhi], strict=True):
            flat[pos] = min(int(flat[pos]) + int(counts), 65535)
        frame.flags.writeable = False  # sector() hands out views of it
        return frame


class _StrikeBlock:
    """Strikes and x-rays of ``_BLOCK`` consecutive frames, drawn from one random stream."""

    __slots__ = (
        "centres",
        "charges",
        "offsets",
        "pixels",
        "pool_index",
        "xray_counts",
        "xray_offsets",
        "xray_pos",
    )

    def __init__(self, **arrays: np.ndarray) -> None:
        for name, value in arrays.items():
            setattr(self, name, value)

    def span(self, j: int) -> tuple[int, int]:
        return int(self.offsets[j]), int(self.offsets[j + 1])

    def xray_span(self, j: int) -> tuple[int, int]:
        return int(self.xray_offsets[j]), int(self.xray_offsets[j + 1])

    @classmethod
    def generate(cls, sim: FourDCameraSim, b: int, n: int) -> _StrikeBlock:
        rng = np.random.default_rng([sim.seed, sim.scan_number, _TAG_STRIKES, b])
        h, w = FRAME_SHAPE
        pool_index = rng.integers(0, sim.pool_size, size=n)
        counts = rng.poisson(sim.electrons_per_frame, size=n)
        total = int(counts.sum())
        frame_of = np.repeat(np.arange(n), counts)
        # Centres stay one pixel off the border so that the whole 3x3 footprint is in the frame. A share of
        # them, set by the sample at the probe position, falls in the bright-field disk; the rest anywhere.
        rows = rng.integers(1, h - 1, size=total)
        cols = rng.integers(1, w - 1, size=total)
        in_disk = rng.random(total) < sim.bright_field_share(b * _BLOCK + frame_of)
        radius = BF_DISK_RADIUS * np.sqrt(rng.random(total))
        angle = rng.uniform(0, 2 * np.pi, size=total)
        rows = np.where(in_disk, np.rint((h - 1) / 2 + radius * np.sin(angle)).astype(np.int64), rows)
        cols = np.where(in_disk, np.rint((w - 1) / 2 + radius * np.cos(angle)).astype(np.int64), cols)
        keep = _separated(frame_of, counts, rows, cols)
        kept_counts = np.bincount(frame_of[keep], minlength=n)
        rows, cols = rows[keep], cols[keep]
        centres = rows * w + cols
        m = centres.size
        centre_q = sim.electron_signal * rng.uniform(1 - _CENTRE_JITTER, 1 + _CENTRE_JITTER, size=m)
        edge_q = centre_q[:, None] * rng.uniform(*_EDGE_FRACTION, size=(m, 4))
        corner_q = centre_q[:, None] * rng.uniform(*_CORNER_FRACTION, size=(m, 4))
        charges = np.rint(np.concatenate([centre_q[:, None], edge_q, corner_q], axis=1)).astype(np.int64)
        pixels = np.concatenate(
            [centres[:, None], centres[:, None] + _EDGE_OFFSETS, centres[:, None] + _CORNER_OFFSETS], axis=1
        )
        n_xray = rng.poisson(sim.xray_rate, size=n)
        xray_pos = rng.integers(0, h * w, size=int(n_xray.sum()))
        xray_counts = rng.integers(*_XRAY_COUNTS, size=xray_pos.size)
        return cls(
            centres=centres,
            charges=charges,
            pixels=pixels,
            offsets=np.r_[0, np.cumsum(kept_counts)],
            pool_index=pool_index,
            xray_pos=xray_pos,
            xray_counts=xray_counts,
            xray_offsets=np.r_[0, np.cumsum(n_xray)],
        )


def _separated(frame_of: np.ndarray, counts: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Mask of strikes at least ``_MIN_SEPARATION`` from every earlier strike of their frame."""
    keep = np.ones(rows.size, dtype=bool)
    if rows.size == 0:
        return keep
    n, kmax = counts.size, int(counts.max())
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    slot = np.arange(rows.size) - starts[frame_of]
    # Pad to (frames, kmax) and compare every pair of a frame at once, a chunk of frames at a time.
    r = np.full((n, kmax), -100, dtype=np.int32)
    c = np.full((n, kmax), -100, dtype=np.int32)
    r[frame_of, slot] = rows
    c[frame_of, slot] = cols
    earlier = np.tri(kmax, k=-1, dtype=bool)  # [i, j] is true where j < i
    clash = np.empty((n, kmax), dtype=bool)
    step = max(1, 2_000_000 // (kmax * kmax))
    for lo in range(0, n, step):
        rr, cc = r[lo : lo + step], c[lo : lo + step]
        dist = np.maximum(np.abs(rr[:, :, None] - rr[:, None, :]), np.abs(cc[:, :, None] - cc[:, None, :]))
        clash[lo : lo + step] = ((dist < _MIN_SEPARATION) & earlier).any(axis=2)
    keep &= ~clash[frame_of, slot]
    return keep
