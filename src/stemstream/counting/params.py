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
from pydantic import BaseModel, ConfigDict, Field, field_validator

from stemstream.config import (
    BackgroundNSigma,
    EngineName,
    RowDark,
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
    "row_dark": "--row-dark",
    "dark": "--dark",
    "gain": "--gain",
}
_HINTS = {
    "background_n_sigma": "usually 4 or 4.5",
    "engine": "stempy, cpu, gpu or auto",
    "row_dark": "none, mean or median",
}


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
    row_dark: RowDark = Field(
        default_factory=_setting("row_dark"),
        description="row-dark correction as stempy's electron_count offers it: none, mean or median",
    )
    dark: Path | None = Field(
        default_factory=_setting("dark"),
        validate_default=True,
        description='dark reference (.npy) under STEMSTREAM_DARK_DIR, or "latest": the newest `stemstream dark`',
    )
    gain: Path | None = Field(
        default_factory=_setting("gain"), description="gain reference (.npy), on the counting host"
    )

    @field_validator("dark")
    @classmethod
    def _dark_under_the_dark_dir(cls, value: Path | None) -> Path | None:
        # The one check of a dark's path: resolved once here ("latest" too), so every NodeGroup of a session
        # and the file's record name the same file; a path out of the dark directory is refused.
        if value is None:
            return None
        from stemstream.counting.darks import resolve_dark

        try:
            return resolve_dark(value, get_settings().dark_dir)
        except CountingError as exc:
            raise ValueError(str(exc)) from None

    def dark_record(self) -> dict[str, str]:
        """What a counted file records of the dark: ``dark`` (its path) and ``dark_sha256``; {} without one."""
        if self.dark is None:
            return {}
        from stemstream.counting.darks import file_sha256

        return {"dark": str(self.dark), "dark_sha256": file_sha256(self.dark)}

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
