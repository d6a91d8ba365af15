"""Binary Star (zguide chapter 4): the state machine that picks which of two store servers is active.

Pure logic, no sockets: the server feeds it the peer's state messages and client snapshot requests
("votes") and acts on the state it ends up in. Each server publishes its state to the peer every
heartbeat; a peer silent for two heartbeats is considered dead, but a passive server only takes over
when a client asks it for a snapshot (so a network split between the two servers alone never makes two
actives).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import IntEnum

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# The peer is dead after this many missed heartbeats (the zguide's value).
PEER_DEAD_HEARTBEATS = 2


class State(IntEnum):
    PRIMARY = 1  # primary, waiting for the peer
    BACKUP = 2  # backup, waiting for the peer
    ACTIVE = 3  # serving clients
    PASSIVE = 4  # following the active peer, not serving clients


class Event(IntEnum):
    PEER_PRIMARY = 1
    PEER_BACKUP = 2
    PEER_ACTIVE = 3
    PEER_PASSIVE = 4
    CLIENT_REQUEST = 5


class BinaryStar:
    """The Binary Star FSM; ``handle(event)`` says whether a client request may be served now."""

    def __init__(self, primary: bool, heartbeat_s: float, clock: Clock = time.monotonic) -> None:
        self.primary = primary
        self.state = State.PRIMARY if primary else State.BACKUP
        self.heartbeat_s = heartbeat_s
        self._clock = clock
        self.peer_expiry = clock() + PEER_DEAD_HEARTBEATS * heartbeat_s

    @property
    def peer_alive(self) -> bool:
        return self._clock() < self.peer_expiry

    def peer_state(self, state: int) -> None:
        """The peer said it is in ``state`` (1..4); raises ValueError for anything else."""
        event = Event(state)
        if event is Event.CLIENT_REQUEST:
            raise ValueError("5 is not a peer state")
        self.peer_expiry = self._clock() + PEER_DEAD_HEARTBEATS * self.heartbeat_s
        self.handle(event)

    def handle(self, event: Event) -> bool:
        """Apply ``event``; True if a client request may be served (only meaningful for CLIENT_REQUEST)."""
        state = self.state
        if state is State.PRIMARY:
            if event is Event.PEER_BACKUP:
                self._to(State.ACTIVE, "connected to backup (passive), ready as active")
            elif event is Event.PEER_ACTIVE:
                self._to(State.PASSIVE, "connected to backup (active), ready as passive")
            elif event is Event.CLIENT_REQUEST:
                # Serve only once the peer has had time to show up: it may be active after a failover.
                if self.peer_alive:
                    return False
                self._to(State.ACTIVE, "request from a client and no backup heard, ready as active")
        elif state is State.BACKUP:
            if event is Event.PEER_ACTIVE:
                self._to(State.PASSIVE, "connected to primary (active), ready as passive")
            elif event is Event.CLIENT_REQUEST:
                return False  # a backup never serves before it has seen the primary
        elif state is State.ACTIVE:
            if event is Event.PEER_ACTIVE:
                # Split brain (the servers lost each other, clients voted for both). The zguide aborts;
                # we let the backup step down and resync, which ends the same way without a restart.
                logger.error("Binary Star: both servers are active (split brain)")
                if not self.primary:
                    self._to(State.PASSIVE, "stepping down to passive; the primary stays active")
        elif state is State.PASSIVE:
            if event in (Event.PEER_PRIMARY, Event.PEER_BACKUP):
                self._to(State.ACTIVE, "peer is restarting, ready as active")
            elif event is Event.PEER_PASSIVE:
                logger.error("Binary Star: both servers are passive")
                if self.primary:
                    self._to(State.ACTIVE, "primary takes over")
            elif event is Event.CLIENT_REQUEST:
                if self.peer_alive:
                    return False
                self._to(State.ACTIVE, "peer silent and a client asked: failover, ready as active")
        return self.state is State.ACTIVE

    def _to(self, state: State, why: str) -> None:
        logger.info("Binary Star: %s -> %s: %s", self.state.name, state.name, why)
        self.state = state
