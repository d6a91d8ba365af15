"""ZeroMQ plumbing shared by every service: the one socket-options helper, CURVE keys and the authenticator,
and the actor helpers (worker threads, bounded sends, a record publisher)."""
