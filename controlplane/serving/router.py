"""One control plane, many data planes: the Router places requests on per-data-plane Engines and moves them.

Each data plane has its own Engine (its Scheduler, BlockManager and prefix cache, its
step stream and thread); the API servicer talks to the Router, which has the Engine's
submit/abort interface. A new request goes where `placement.Placement` says, among the
planes that take work (connected, not drained). A request then stays on its plane
unless the plane leaves:

- **failover**: an Engine whose step stream breaks hands every request it holds to
  `rehome` (on its own thread), which places each on a surviving plane; the control
  plane holds every token, so the new plane re-prefills them and greedy streams go on
  with the same tokens. With no plane left, the Engine keeps its requests and waits for
  a reconnect as a lone control plane does. The lost Engine goes on reconnecting, empty,
  and takes new work again once its plane answers.
- **drain**: `drain(address)` stops placing there; with `move` its requests are handed
  over as in a failover once its steps in flight are back, else they finish where they are.
  Its state reads "drained" once it holds nothing. `undrain` places there again.
- **join**: `add(engine)` (admin or DNS discovery, fleet.py) starts a new plane's Engine.

Ownership (request id → Engine) is kept under one lock that submit, abort and rehome all
take, so an abort never misses a request in transit between two engines.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Callable

import structlog

from controlplane.core.sequence import SamplingOptions
from controlplane.serving.engine import Engine, EngineFailure, OutputStream
from controlplane.serving.placement import Placement, PlacementView, count_cached

log = structlog.get_logger("controlplane.serving.router")


@dataclass(slots=True)
class DataPlaneState:
    """One data plane as the admin API, ModelInfo and the CLI report it."""

    address: str
    state: str  # serving | draining | drained | down
    num_running: int
    num_waiting: int
    num_requests: int
    kv_usage: float
    num_kv_blocks: int
    max_num_seqs: int
    device: str
    transport: str


class Member:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.address = engine.dataplane.target
        self.draining = False

    @property
    def accepting(self) -> bool:
        return not self.draining and self.engine.dataplane_connected

    def load(self) -> float:
        scheduler = self.engine.scheduler
        blocks = scheduler.block_manager
        slots = self.engine.num_requests / scheduler.config.max_num_seqs
        return max(slots, 1.0 - blocks.num_free_blocks / blocks.num_blocks)

    def view(self) -> PlacementView:
        index = self.engine.scheduler.block_manager.hash_to_block_id
        return PlacementView(self.address, self.load(), lambda hashes: count_cached(index, hashes))

    def state(self) -> DataPlaneState:
        engine, scheduler = self.engine, self.engine.scheduler
        blocks = scheduler.block_manager
        if not engine.dataplane_connected:
            state = "down"
        elif self.draining:
            state = "drained" if engine.num_requests == 0 else "draining"
        else:
            state = "serving"
        info = engine.dataplane.info
        return DataPlaneState(self.address, state, scheduler.num_running, scheduler.num_waiting, engine.num_requests,
                              1.0 - blocks.num_free_blocks / blocks.num_blocks, blocks.num_blocks,
                              scheduler.config.max_num_seqs, info.device if info is not None else "",
                              engine.dataplane.transport_name)


class UnknownDataPlane(KeyError):
    pass


class Router:
    def __init__(self, engines: list[Engine], placement: Placement):
        self.placement = placement
        self._lock = threading.RLock()
        self._members: list[Member] = []
        self._owner: dict[str, Engine] = {}  # request id → the engine holding it now
        self._ids = itertools.count()
        self._started = False
        self.num_moved_requests = 0  # handed from one data plane to another (failover, drain --move)
        self.num_prefix_placements = 0  # placed where a cached prefix was found
        self.on_join: Callable[[Engine], None] = lambda engine: None  # metrics for a plane that joins live
        for engine in engines:
            self._join(engine)

    # --- the Engine's interface, for the API servicer and shutdown -------------------
    def start(self) -> None:
        with self._lock:
            self._started = True
            for member in self._members:
                member.engine.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        for member in self.members:
            member.engine.stop(timeout_s)

    def close(self) -> None:
        for member in self.members:
            member.engine.dataplane.close()

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}-{time.time_ns() % 10**9:09d}"

    @property
    def members(self) -> list[Member]:
        with self._lock:
            return list(self._members)

    @property
    def engines(self) -> list[Engine]:
        return [m.engine for m in self.members]

    @property
    def num_running_requests(self) -> int:
        return sum(m.engine.num_running_requests for m in self.members)

    @property
    def num_discarded_tokens(self) -> int:
        return sum(m.engine.num_discarded_tokens for m in self.members)

    @property
    def dataplane_connected(self) -> bool:
        """Some data plane takes work."""
        return any(m.accepting for m in self.members)

    def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingOptions,
               stream: OutputStream, priority: int = 0) -> None:
        with self._lock:
            if request_id in self._owner:
                stream.put(EngineFailure(f"request id {request_id!r} is already in use", "ALREADY_EXISTS"))
                return
            target = self._place(prompt_token_ids, exclude=None)
            if target is None:
                stream.put(EngineFailure("every data plane is drained: undrain one or add one "
                                         "(nanoplane admin undrain ADDR), then retry"))
                return
            self._owner[request_id] = target
            target.submit(request_id, prompt_token_ids, sampling, stream, priority)

    def abort(self, request_id: str) -> None:
        with self._lock:
            engine = self._owner.get(request_id)
            if engine is not None:
                engine.abort(request_id)

    def abort_all(self) -> None:
        for member in self.members:
            member.engine.abort_all()

    # --- called by the Engines, on their threads --------------------------------------
    def request_ended(self, request_id: str) -> None:
        with self._lock:
            self._owner.pop(request_id, None)

    def rehome(self, engine: Engine) -> bool:
        """Moves every request of `engine` (its plane left or is drained with move) to the planes that take
        work; False, moving nothing, when there are none. Runs on engine's thread with no step in flight."""
        with self._lock:
            if not any(m.accepting and m.engine is not engine for m in self._members):
                return False
            engine._drain_inbox()  # what the API queued for it before the lock: adds move too, aborts apply
            requests = engine.take_requests()
            for request in requests:
                seq = request.seqs[0]
                target = self._place(seq.token_ids, exclude=engine)
                self._owner[request.request_id] = target
                target.adopt(request)
            self.num_moved_requests += len(requests)
        log.warning("requests moved to other data planes", dataplane=engine.dataplane.target,
                    num_requests=len(requests))
        return True

    def _place(self, token_ids: list[int], exclude: Engine | None) -> Engine | None:
        """Under the lock. Among the planes that take work; with none, an undrained one that is down (it holds the
        request until it reconnects, as a lone control plane does); None if every plane is drained."""
        members = [m for m in self._members if m.engine is not exclude]
        candidates = [m for m in members if m.accepting] or [m for m in members if not m.draining]
        if not candidates:
            return None
        by_address = {m.address: m for m in candidates}
        view, num_cached = self.placement.choose([m.view() for m in candidates], token_ids)
        self.num_prefix_placements += num_cached > 0
        log.debug("placement", dataplane=view.address, policy=self.placement.policy, load=round(view.load, 3),
                  cached_blocks=num_cached, candidates=len(candidates))
        return by_address[view.address].engine

    # --- admin ----------------------------------------------------------------------
    def member(self, address: str) -> Member:
        with self._lock:
            for member in self._members:
                if member.address == address:
                    return member
        known = ", ".join(m.address for m in self.members)
        raise UnknownDataPlane(f"no data plane {address!r} here; the data planes are: {known}")

    def drain(self, address: str, move: bool = False) -> DataPlaneState:
        member = self.member(address)
        member.draining = True
        log.info("data plane drained: no new requests go there", dataplane=address, move=move)
        if move:
            member.engine.evacuate()
        return member.state()

    def undrain(self, address: str) -> DataPlaneState:
        member = self.member(address)
        member.draining = False
        log.info("data plane undrained: it takes new requests again", dataplane=address)
        return member.state()

    def add(self, engine: Engine) -> Member:
        """A new data plane joins live (its Engine built and connected by the caller)."""
        with self._lock:
            if any(m.address == engine.dataplane.target for m in self._members):
                raise ValueError(f"data plane {engine.dataplane.target!r} is already here")
            self.on_join(engine)
            member = self._join(engine)
            if self._started:
                engine.start()
        log.info("data plane joined", dataplane=member.address)
        return member

    def has(self, address: str) -> bool:
        return any(m.address == address for m in self.members)

    def states(self) -> list[DataPlaneState]:
        return [m.state() for m in self.members]

    def _join(self, engine: Engine) -> Member:
        engine.fleet = self
        member = Member(engine)
        self._members.append(member)
        return member
