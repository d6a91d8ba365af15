"""``CountingParams``: the one description of how a scan is counted, used everywhere a scan is counted.

A session's form (``SessionParams.counting``), the NodeGroups' command line (``stemstream nodegroup``), the
fallback counter (:func:`stemstream.counting.files.count_raw_files`), ``stemstream count`` and the catalog all
carry this model; each field has one name (its CLI flag is the name with dashes), one default (the site's
``STEMSTREAM_<NAME>`` setting) and one range check (the type shared with :class:`stemstream.config.Settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from stemstream.config import (
    BackgroundNSigma,
    EngineName,
    ThresholdSamples,
    ThresholdWindow,
    XrayNSigma,
    get_settings,
    validated,
)
from stemstream.errors import CountingError

__all__ = ["FLAGS", "CountingParams", "counting_params"]

# The command-line flag of each field (stemstream count / session / experiment / nodegroup).
FLAGS = {
    "background_n_sigma": "--background-n-sigma",
    "xray_n_sigma": "--xray-n-sigma",
    "threshold_samples": "--threshold-samples",
    "threshold_window": "--threshold-window",
    "engine": "--engine",
    "dark": "--dark",
    "gain": "--gain",
}
_HINTS = {"background_n_sigma": "usually 4 or 4.5", "engine": "stempy, cpu, gpu or auto"}


def _setting(name: str) -> Any:
    return lambda: getattr(get_settings(), name)


class CountingParams(BaseModel):
    """Thresholds, engine and references of a count; a field left out takes the site's setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    background_n_sigma: BackgroundNSigma = Field(default_factory=_setting("background_n_sigma"))
    xray_n_sigma: XrayNSigma = Field(default_factory=_setting("xray_n_sigma"))
    threshold_samples: ThresholdSamples = Field(default_factory=_setting("threshold_samples"))
    # The sample is drawn (seeded) from the first threshold_window frames: counting.thresholds.sample_candidates.
    threshold_window: ThresholdWindow = Field(default_factory=_setting("threshold_window"))
    engine: EngineName = Field(default_factory=_setting("engine"), description="stempy, cpu, gpu or auto")
    dark: Path | None = Field(
        default_factory=_setting("dark"), description="dark reference (.npy), on the counting host"
    )
    gain: Path | None = Field(
        default_factory=_setting("gain"), description="gain reference (.npy), on the counting host"
    )

    def load_dark(self) -> np.ndarray | None:
        """The dark reference, read from :attr:`dark` (None without one)."""
        return _load(self.dark, "dark")

    def load_gain(self) -> np.ndarray | None:
        """The gain reference, read from :attr:`gain` (None without one)."""
        return _load(self.gain, "gain")

    def argv(self) -> list[str]:
        """The flags that give a command exactly these parameters (see :data:`FLAGS`)."""
        args: list[str] = []
        for name, flag in FLAGS.items():
            value = getattr(self, name)
            if value is not None:
                args += [flag, str(value)]
        return args


def counting_params(**values: Any) -> CountingParams:
    """Validated :class:`CountingParams`; a bad value raises a one-line ConfigError saying what is allowed."""
    return validated(CountingParams, values, "counting parameter", _HINTS)


def _load(path: Path | None, what: str) -> np.ndarray | None:
    if path is None:
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise CountingError(f"cannot read the {what} reference {path} ({why}); give a .npy of one frame") from None
    return np.asarray(array)
