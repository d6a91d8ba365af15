"""The package's exception hierarchy: catch ``StemstreamError`` to catch everything we raise."""


class StemstreamError(Exception):
    """Base class of every error stemstream raises on purpose."""


class WaitTimeout(StemstreamError, TimeoutError):
    """Something awaited did not happen in time; the message says what and where to look. Also a
    ``TimeoutError``, so callers that wait with a deadline catch it as one."""


class ConfigError(StemstreamError):
    """A setting is missing or invalid; the message names the variable and what is allowed."""


class SecurityError(StemstreamError):
    """CURVE keys are missing, unreadable, too widely readable or malformed; the message says which file and
    what to do (``stemstream keys ...``). Never carries key material."""


class ProtocolError(StemstreamError):
    """A wire message could not be decoded or failed validation; the message says why."""


class StoreError(StemstreamError):
    """The Clone store could not be reached or answered something unexpected."""


class StoreUnavailable(StoreError):
    """No store server answered within the timeout."""


class RawFileError(StemstreamError):
    """A 4D Camera raw file is malformed or cannot be written."""


class FallbackError(StemstreamError):
    """The disk fallback could not write a scan (directory missing, unwritable or full)."""


class CountingError(StemstreamError):
    """Electron counting failed (thresholds could not be computed, engine unavailable, ...)."""


class AllocationError(StemstreamError):
    """Compute nodes could not be allocated or released."""


class ArchiveError(StemstreamError):
    """Archiving a scan failed."""


class CatalogError(StemstreamError):
    """The scan catalog could not be read or written (unknown scan, bad database URL, ...)."""


class AnalysisError(StemstreamError):
    """An analysis could not be found, built from its parameters, or run; the message names it."""
