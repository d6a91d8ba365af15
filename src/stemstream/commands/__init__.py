"""Sub-commands of the ``stemstream`` CLI, one module each."""
