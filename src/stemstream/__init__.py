"""stemstream: stream 4D-STEM detector data into HPC memory, count it there, archive and catalogue it."""

import logging

__version__ = "0.1.0"

# The library attaches no handlers; entry points configure logging (see stemstream.log).
logging.getLogger(__name__).addHandler(logging.NullHandler())
