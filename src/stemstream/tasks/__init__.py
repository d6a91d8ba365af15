"""Prefect tasks: each a small typed function around one library call (``stemstream.plane``,
``allocation``, ``archive``, ``catalog``, ``counting``). Retries only on I/O."""
