"""Simulators for tests, demos and benchmarks; runtime code never imports this package."""

from stemstream.sim.camera import FRAME_SHAPE, N_SECTORS, SECTOR_SHAPE, FourDCameraSim

__all__ = ["FRAME_SHAPE", "N_SECTORS", "SECTOR_SHAPE", "FourDCameraSim"]
