"""Prefect tasks: each a small typed function around one library call (``stemstream.sessions``, ``catalog``,
``archive``, ``counting``); never the data plane, the store or its keys (an import-linter contract). Retries
only on I/O."""
