"""Every metric stemstream exports: its name, kind, labels and meaning (the one home of the names).

The dashboard (``infra/grafana/stemstream.json``) and the alert rules (``infra/prometheus/alerts.yml``) may
only query names listed here (a test checks it), and each collector builds its families from these entries.
Counters carry Prometheus' ``_total`` suffix in their names here, as a query writes them.

Labels: ``role`` is the component (``producer``, ``aggregator``, ``nodegroup``, ``counting``, ``store``,
``session``), ``uid`` its registry UID (a store server's ``primary``/``backup``; a counting service's NodeGroup
UIDs joined with ``+``). None of them clashes with a target label that ``stemstream metrics targets`` writes
(``service``, ``host``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


@dataclass(frozen=True)
class Spec:
    """One metric: ``name`` as queried (counters end in ``_total``), ``kind``, help text, labels."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    labels: tuple[str, ...] = ("role", "uid")

    def family(self) -> Metric:
        """An empty family to add samples to (``add_metric(label_values, value)``)."""
        if self.kind == "counter":
            return CounterMetricFamily(self.name.removesuffix("_total"), self.help, labels=self.labels)
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)


_C, _G = "counter", "gauge"
_RU = ("role", "uid")
_RANK, _OUTCOME, _COMPLETE = (*_RU, "rank"), (*_RU, "outcome"), (*_RU, "complete")

SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        # ---- the data plane: producers, aggregator, NodeGroups
        Spec("stemstream_messages_received_total", _C, "Data messages (sectors) taken in", _RU),
        Spec("stemstream_bytes_received_total", _C, "Payload bytes (sector pixels) taken in", _RU),
        Spec("stemstream_messages_sent_total", _C, "Data messages (sectors) sent on: streamed or routed", _RU),
        Spec("stemstream_bytes_sent_total", _C, "Payload bytes (sector pixels) sent on", _RU),
        Spec("stemstream_messages_rejected_total", _C, "Bad or late messages rejected, by kind", (*_RU, "kind")),
        Spec("stemstream_sectors_lost_upstream_total", _C, "Sectors the detector never delivered", _RU),
        Spec("stemstream_send_blocked_total", _C, "Data sends that waited at the peer's high-water mark", _RU),
        Spec("stemstream_send_blocked_seconds_total", _C, "Seconds sends waited at the peer's high-water mark", _RU),
        Spec("stemstream_queue_depth", _G, "Messages or frames waiting inside the process, by queue", (*_RU, "queue")),
        Spec("stemstream_scans_open", _G, "Scans this process is handling now", _RU),
        Spec("stemstream_scans_handled_total", _C, "Scans this process finished, by outcome here", _OUTCOME),
        Spec("stemstream_pacing_timeouts_total", _C, "Waits for a slower sibling thread or sector that ran out", _RU),
        Spec("stemstream_nodegroups_lost_total", _C, "NodeGroup records that went without stopping (died)", _RU),
        Spec("stemstream_frames_assembled_total", _C, "Frames handed to the consumer, complete or not", _COMPLETE),
        Spec("stemstream_assembling_peak_frames", _G, "Most frames in assembly at once", _RU),
        # ---- a producer's hold (plane.retention)
        Spec("stemstream_hold_bytes", _G, "Bytes of streamed sectors held until their scan is acknowledged", _RU),
        Spec("stemstream_hold_limit_bytes", _G, "The hold's bound (STEMSTREAM_HOLD_BYTES)", _RU),
        Spec("stemstream_held_scans", _G, "Scans with sectors held in RAM", _RU),
        Spec("stemstream_sectors_on_disk_total", _C, "Sectors written to raw files (disk route, replay, spill)", _RU),
        Spec("stemstream_sectors_unprotected_total", _C, "Sectors streamed with no room to hold them", _RU),
        Spec("stemstream_disk_errors_total", _C, "Raw-file writes that failed (retried)", _RU),
        # ---- counting (nodes.service)
        Spec("stemstream_frames_counted_total", _C, "Frames electron-counted", _RANK),
        Spec("stemstream_frames_count_failed_total", _C, "Frames whose counting failed", _RANK),
        Spec("stemstream_counting_backlog_frames", _G, "Frames received and not counted yet", _RANK),
        Spec("stemstream_counting_lag_seconds", _G, "Wait of the oldest frame not counted yet (0: none)", _RANK),
        Spec("stemstream_counted_files_total", _C, "Counted files written (rank 0), by status", (*_RU, "status")),
        # ---- scans as the store shows them (the leader producer, a session)
        Spec("stemstream_scans", _G, "Scans in the store by outcome (open: not final yet)", _OUTCOME),
        Spec("stemstream_scan_open_oldest_seconds", _G, "Age of the oldest scan that is not final (0: none)", _RU),
        Spec("stemstream_registry_members", _G, "Live registry records by role", (*_RU, "member")),
        Spec("stemstream_session_nodegroups_expected", _G, "NodeGroups the running session asked for", _RU),
        # ---- the Clone store server
        Spec("stemstream_store_sequence", _G, "The store's update sequence number", _RU),
        Spec("stemstream_store_keys", _G, "Keys held", _RU),
        Spec("stemstream_store_pending_updates", _G, "Updates a passive server holds for a takeover", _RU),
        Spec("stemstream_store_active", _G, "1 when this server serves clients (Binary Star active or alone)", _RU),
        Spec("stemstream_store_peer_configured", _G, "1 when this server has a Binary Star peer", _RU),
        Spec("stemstream_store_peer_alive", _G, "1 when the peer was heard within two heartbeats", _RU),
        Spec("stemstream_store_failovers_total", _C, "Takeovers from the peer (passive to active)", _RU),
        Spec(
            "stemstream_store_events_total", _C, "Store server counters by kind (updates, rejects, ...)", (*_RU, "kind")
        ),
    )
}


def spec(name: str) -> Spec:
    return SPECS[name]


# Which metrics each kind of process exports (checked against a real scrape by the tests).
BY_ROLE: dict[str, tuple[str, ...]] = {
    "producer": (
        "stemstream_messages_sent_total",
        "stemstream_bytes_sent_total",
        "stemstream_sectors_lost_upstream_total",
        "stemstream_send_blocked_total",
        "stemstream_send_blocked_seconds_total",
        "stemstream_scans_handled_total",
        "stemstream_pacing_timeouts_total",
        "stemstream_hold_bytes",
        "stemstream_hold_limit_bytes",
        "stemstream_held_scans",
        "stemstream_sectors_on_disk_total",
        "stemstream_sectors_unprotected_total",
        "stemstream_disk_errors_total",
    ),
    "leader": (  # the sector-0 producer, which plans and closes every scan, adds these
        "stemstream_scans",
        "stemstream_scan_open_oldest_seconds",
        "stemstream_registry_members",
    ),
    "aggregator": (
        "stemstream_messages_received_total",
        "stemstream_bytes_received_total",
        "stemstream_messages_sent_total",
        "stemstream_bytes_sent_total",
        "stemstream_messages_rejected_total",
        "stemstream_send_blocked_total",
        "stemstream_send_blocked_seconds_total",
        "stemstream_queue_depth",
        "stemstream_scans_open",
        "stemstream_nodegroups_lost_total",
    ),
    "nodegroup": (
        "stemstream_messages_received_total",
        "stemstream_bytes_received_total",
        "stemstream_messages_rejected_total",
        "stemstream_sectors_lost_upstream_total",
        "stemstream_frames_assembled_total",
        "stemstream_assembling_peak_frames",
        "stemstream_queue_depth",
        "stemstream_scans_open",
        "stemstream_scans_handled_total",
        "stemstream_pacing_timeouts_total",
    ),
    "counting": (
        "stemstream_frames_counted_total",
        "stemstream_frames_count_failed_total",
        "stemstream_counting_backlog_frames",
        "stemstream_counting_lag_seconds",
        "stemstream_scans_open",
        "stemstream_counted_files_total",
    ),
    "store": (
        "stemstream_store_sequence",
        "stemstream_store_keys",
        "stemstream_store_pending_updates",
        "stemstream_store_active",
        "stemstream_store_peer_configured",
        "stemstream_store_peer_alive",
        "stemstream_store_failovers_total",
        "stemstream_store_events_total",
    ),
    "session": (
        "stemstream_scans",
        "stemstream_scan_open_oldest_seconds",
        "stemstream_registry_members",
        "stemstream_session_nodegroups_expected",
    ),
}
