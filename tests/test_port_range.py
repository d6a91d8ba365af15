"""Every socket a service binds for others to find is on a port of STEMSTREAM_PORT_RANGE (firewall rules)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import zmq

from plane_helpers import ProcessTree, free_port_block, start_store, store_client, wait_scan_status
from stemstream.config import load_settings
from stemstream.errors import ConfigError
from stemstream.transport.sockets import bind_in_range

SHAPE = (8, 8)


def test_bind_in_range_takes_the_first_free_port_and_says_when_there_is_none():
    base = free_port_block(2)
    settings = load_settings(port_range=f"{base}-{base + 1}")
    ctx = zmq.Context()
    try:
        a, b, c = (ctx.socket(zmq.PULL) for _ in range(3))
        assert bind_in_range(a, settings=settings) == f"tcp://127.0.0.1:{base}"
        assert bind_in_range(b, settings=settings, max_msg_size=4096) == f"tcp://127.0.0.1:{base + 1}"
        assert b.getsockopt(zmq.MAXMSGSIZE) == 4096
        with pytest.raises(ConfigError, match=rf"^no free port in STEMSTREAM_PORT_RANGE={base}-{base + 1} on "):
            bind_in_range(c, settings=settings)
    finally:
        ctx.destroy(linger=0)


def _listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (its socket inodes matched in /proc/net/tcp{,6})."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.slow
def test_every_bound_port_of_a_running_plane_is_in_the_range(tmp_path: Path):
    from stemstream.plane.requests import request_scan
    from stemstream.store import Registry

    base = free_port_block(40)
    lo, hi = base, base + 39
    env = {"STEMSTREAM_PORT_RANGE": f"{lo}-{hi}", "STEMSTREAM_METRICS": "on"}
    with ProcessTree(tmp_path / "logs", env=env) as tree:
        address = start_store(tree)
        tree.start("aggregator", "aggregator", "--store", address)
        tree.start("ng-0", "nodegroup", "--store", address, "--uid", "ng-0", "--consumer", "null")
        with store_client(address) as client:
            registry = Registry(client)
            registry.wait_for_members("aggregator", 1, status="ready", timeout=60)
            registry.wait_for_members("nodegroup", 1, status="ready", timeout=60)
            for m in range(4):
                tree.start(f"producer-{m}", "producer", "--store", address, "--sector", m)
            registry.wait_for_members("producer", 4, status="ready", timeout=60)
            request_scan(client, 1, SHAPE, seed=1, loss_rate=0.0)
            assert wait_scan_status(client, 1, ("received", "incomplete"), timeout=60)["status"] == "received"
            advertised = [ep for role in ("aggregator", "nodegroup", "producer")
                          for rec in registry.members(role) for ep in rec.endpoints.values()]  # fmt: skip
            assert len(advertised) >= 8 + 5  # data_<m> and info_<m> of the aggregator, the NodeGroup's five
            for ep in advertised:
                port = re.search(r":(\d+)(?:/|$)", ep)  # tcp://host:port, http://host:port/metrics
                assert port is not None and lo <= int(port.group(1)) <= hi, ep
            for name, proc in tree.procs.items():
                if name == "store":  # its ports are STEMSTREAM_STORE_PORT .. +2 (docs/operations.md)
                    continue
                ports = _listening_ports(proc.pid)
                assert ports, f"{name} listens on nothing"
                assert all(lo <= p <= hi for p in ports), (name, sorted(ports))
