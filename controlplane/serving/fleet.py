"""Building the data planes' Engines from the configuration, at start-up and when one joins later.

At start-up the control plane waits (up to --dataplane-connect-timeout-s) for the first
data plane to answer; its facts give the tokenizer and the request limits. Every other
plane that answers then joins at once; the rest, and planes that appear later (a DNS
name that resolves to a new address, `nanoplane admin join`), join through `Joiner`,
which retries every --dataplane-discovery-interval-s. All planes must serve the same
model (name, architecture, vocabulary, block size, EOS ids); they may differ in KV
blocks, batch slots and devices, but each must hold at least the KV blocks and model
length requests are validated against, which is the smallest of the planes at start-up.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import structlog

from controlplane.config import ControlPlaneConfig
from controlplane.core.scheduler import Scheduler, SchedulerConfig
from controlplane.core.speculative import Speculator
from controlplane.link.dataplane_client import AUTO_TOKEN_RETRY_S, DataPlaneClient
from controlplane.link.transport import DataPlaneRefused, DataPlaneUnavailable
from controlplane.link.discovery import Discovery
from controlplane.link.reconnect import DataPlaneReconnector, incompatibilities
from controlplane.ops.security import dataplane_channel_credentials, dataplane_channel_options
from controlplane.serving.engine import Engine
from controlplane.serving.tokenizer import Tokenizer
from controlplane.structured.grammar_state import BitmaskFiller
from proto.nanoplane.v1 import dataplane_pb2

log = structlog.get_logger("controlplane.serving.fleet")

DESCRIBE_TIMEOUT_S = 2.0


def discovery_of(config: ControlPlaneConfig) -> Discovery:
    # with --dataplane-dns, the default --dataplane (a local plane) is not meant
    static = "" if config.dataplane_dns and config.dataplane == ControlPlaneConfig.dataplane else config.dataplane
    return Discovery(static, config.dataplane_dns)


def new_client(config: ControlPlaneConfig, target: str) -> DataPlaneClient:
    return DataPlaneClient(target, dataplane_channel_credentials(config), dataplane_channel_options(config),
                           config.transport, config.dataplane_max_message_bytes, config.dataplane_token_file,
                           config.dataplane_liveness_timeout_s)


def describe(config: ControlPlaneConfig, target: str, errors: dict[str, str] | None = None) -> DataPlaneClient | None:
    """A client of target whose Describe answered, or None (closed; why in errors[target]); DataPlaneRefused
    when it refused this control plane's credential."""
    client = new_client(config, target)
    try:
        client.describe_once(DESCRIBE_TIMEOUT_S)
        return client
    except DataPlaneRefused:
        client.close()
        raise
    except DataPlaneUnavailable as e:
        log.debug("data plane does not answer", dataplane=target, error=str(e))
        if errors is not None:
            errors[target] = str(e)
        client.close()
        return None


def wait_for_first(config: ControlPlaneConfig, discovery: Discovery) -> DataPlaneClient:
    started = time.monotonic()
    deadline = started + config.dataplane_connect_timeout_s
    errors: dict[str, str] = {}
    while True:
        targets = discovery.targets()
        for target in targets:
            try:
                if (client := describe(config, target, errors)) is not None:
                    return client
            except DataPlaneRefused:
                # a wrong credential stays wrong; an auto token read a moment ago may be the file of a data
                # plane that has since restarted, so that one gets a short while
                if config.dataplane_token_file != "auto" or time.monotonic() - started > AUTO_TOKEN_RETRY_S:
                    raise
        if time.monotonic() > deadline:
            within = f"within {config.dataplane_connect_timeout_s:g} s (--dataplane-connect-timeout-s)"
            if len(targets) == 1:
                raise DataPlaneUnavailable(f"data plane at {targets[0]} did not answer {within}: "
                                           f"{errors.get(targets[0], 'no answer')}")
            where = "; ".join(f"{t}: {errors.get(t, 'no answer')}" for t in targets) \
                or f"nothing ({config.dataplane_dns} does not resolve)"
            raise DataPlaneUnavailable(f"no data plane answered {within}; tried {where}")
        time.sleep(0.2)


def promise_of(infos: list[dataplane_pb2.DataPlaneInfo]) -> dataplane_pb2.DataPlaneInfo:
    """What requests are validated against: the first plane's model, the smallest KV pool and model length."""
    promised = dataplane_pb2.DataPlaneInfo()
    promised.CopyFrom(infos[0])
    promised.num_kv_blocks = min(i.num_kv_blocks for i in infos)
    promised.max_model_len = min(i.max_model_len for i in infos)
    return promised


def build_engine(config: ControlPlaneConfig, client: DataPlaneClient, tokenizer: Tokenizer) -> Engine:
    """An Engine for a data plane that answered Describe; opens its step stream."""
    info = client.info
    client.connect()  # --transport shm that cannot be is an error here
    eos = sorted(set(info.eos_token_ids) | set(tokenizer.eos_token_ids))
    scheduler = Scheduler(SchedulerConfig(
        num_blocks=info.num_kv_blocks, block_size=info.block_size, max_num_seqs=info.max_num_seqs,
        max_num_batched_tokens=info.max_num_batched_tokens, max_model_len=info.max_model_len,
        eos_token_ids=tuple(eos), enable_prefix_caching=config.enable_prefix_caching))
    scheduler.bitmask_filler = BitmaskFiller(config.structured_output_threads)
    scheduler.speculator = Speculator(config.speculative_config())
    reconnector = DataPlaneReconnector(client, info, config.dataplane_reconnect_timeout_s)
    aging = config.priority_aging_requests if config.scheduling_policy == "priority" else 0
    log.info("connected to data plane", dataplane=client.target, transport=client.transport_name,
             transport_reason=client.transport_reason, num_kv_blocks=info.num_kv_blocks,
             block_size=info.block_size, max_num_seqs=info.max_num_seqs, device=info.device)
    return Engine(scheduler, tokenizer, client, reconnector, config.overlap, aging)


def incompatible(promised: dataplane_pb2.DataPlaneInfo, client: DataPlaneClient) -> str:
    """Why the data plane of client cannot serve these requests; '' if it can."""
    return "; ".join(incompatibilities(promised, client.info))


class Joiner:
    """Adds the data planes that answer and are not members yet, every interval_s, on its own thread."""

    def __init__(self, config: ControlPlaneConfig, discovery: Discovery, tokenizer: Tokenizer,
                 promised: dataplane_pb2.DataPlaneInfo, has: Callable[[str], bool], join: Callable[[Engine], None]):
        self.config, self.discovery, self.tokenizer, self.promised = config, discovery, tokenizer, promised
        self._has, self._join = has, join
        self._refused: dict[str, str] = {}  # target → why, logged once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dataplane-joiner", daemon=True)

    def start(self) -> "Joiner":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def join(self, target: str) -> Engine:
        """Connects target and adds it; raises DataPlaneUnavailable or ValueError saying why not."""
        client = new_client(self.config, target)
        try:
            client.describe_once(DESCRIBE_TIMEOUT_S)
            if problem := incompatible(self.promised, client):
                raise ValueError(f"data plane {target} cannot serve these requests: {problem}")
            engine = build_engine(self.config, client, self.tokenizer)
            self._join(engine)  # ValueError when it joined meanwhile
        except Exception:
            client.close()
            raise
        return engine

    def _run(self) -> None:
        while not self._stop.wait(self.config.dataplane_discovery_interval_s):
            for target in self.discovery.targets():
                if self._has(target):
                    continue
                try:
                    self.join(target)
                    self._refused.pop(target, None)
                except (DataPlaneUnavailable, ValueError) as e:
                    if self._refused.get(target) != str(e) and isinstance(e, ValueError):
                        log.error("refusing a data plane", dataplane=target, reason=str(e))
                    self._refused[target] = str(e)
