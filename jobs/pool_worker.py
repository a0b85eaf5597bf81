"""One worker actor as the driver's pool (``jobs.pool``) sees it: its state (in flight,
ready, shapes met, compile seconds), where it runs, and one line for its death."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from jobs.text import error_line


def death_line(exc: BaseException | None) -> str:
    """One line for a worker process that died (Ray's message is many): Ray's exit detail
    (e.g. killed by the memory monitor) when it gives one, else its first line."""
    text = str(exc or "").strip()
    for line in text.splitlines():
        if "exit detail" in line.lower():
            return f"{type(exc).__name__}: {line.strip()}"
    return error_line(exc)  # type: ignore[arg-type]  (None: "NoneType")


@dataclass(eq=False)
class PoolWorker:
    """One worker actor as the driver sees it."""

    actor: Any
    label: str  # worker-<slot>: a replacement takes its predecessor's
    slot: int = 0
    started_at: float = field(default_factory=time.monotonic)
    inflight: dict = field(default_factory=dict)  # ref -> monotonic time it was submitted, in order
    alive: bool = True
    ready: bool = False  # its info() came back without a start-up error: it may get batches
    last_done: float = 0.0  # when its last batch came back (or it became ready)
    ready_at: float = 0.0  # when its info() came back clean
    batches_done: int = 0
    info: dict = field(default_factory=dict)
    elastic: bool = False  # started on a GPU that joined (workers.count=auto)
    keys: set = field(default_factory=set)  # batching keys (shapes) it was sent
    startup_error: str | None = None  # why it never became ready
    compile_seconds: float = 0.0  # torch.compile's part of its committed rows (compile=off: 0)

    def oldest(self) -> tuple[Any, float] | None:
        """Its oldest batch in flight and when that batch could start running (submitted, and
        the worker's previous batch back: batches run one after another on a worker)."""
        for ref, submitted in self.inflight.items():
            return ref, max(submitted, self.last_done)
        return None

    def node(self) -> str | None:
        """Where it is (or was): the node it reported, else the node Ray placed its actor on
        (a worker that never answered), else None (never placed: no node had room)."""
        if self.info.get("node"):
            ip = self.info.get("node_ip")
            return f"{self.info['node']} ({ip})" if ip else str(self.info["node"])
        try:
            import ray

            state = ray._private.state.actors(self.actor._actor_id.hex())
            address = state.get("Address") or {}
            # a process of its own (a pid): placed, maybe still starting; else it waits for room
            if state.get("Pid") and address.get("IPAddress") and address.get("NodeID"):
                return f"{address['IPAddress']} (node {address['NodeID'][:8]})"
        except Exception:
            pass
        return None

    def where(self) -> str:
        """``on <node>``, or ``(never placed on a node)``."""
        node = self.node()
        return f"on {node}" if node else "(never placed on a node)"
