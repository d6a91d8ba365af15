"""The Clone store (zguide chapter 5): a replicated key-value store and, on top, the service registry.

Every process is configured with the store's address only; everything else (NodeGroups, producers,
sessions, scans) is found in the store. See docs/store.md for the wire protocol and key paths.
"""

from stemstream.store.client import StoreClient
from stemstream.store.kvmsg import KVMsg
from stemstream.store.registry import ROLES, Record, Registration, Registry
from stemstream.store.server import StoreServer

__all__ = ["ROLES", "KVMsg", "Record", "Registration", "Registry", "StoreClient", "StoreServer"]
