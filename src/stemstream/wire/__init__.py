"""What crosses the wire and what lands on disk: the msgpack protocol messages and the 4D Camera raw format.

No sockets here (``stemstream.transport``), only encoding, decoding and validation.
"""
