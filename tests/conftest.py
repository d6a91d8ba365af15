"""Shared fixtures: the Superfacility API mock (``sfapi``, ``rsa_key``) and the Globus mock
(``mocked_responses`` and the ``stemstream.get_task`` response set) live in their own modules."""

pytest_plugins = ["sfapi_mock", "globus_mock"]
