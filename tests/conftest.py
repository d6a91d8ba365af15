"""Shared fixtures: the Superfacility API mock (``sfapi``, ``rsa_key``), the Globus mock (``mocked_responses``
and the ``stemstream.get_task`` response set) and the in-process plane's (``client``: a store server and one
client of it; ``ctx``: a ZeroMQ context) live in their own modules."""

pytest_plugins = ["sfapi_mock", "globus_mock", "plane_fixtures", "session_fixtures"]
