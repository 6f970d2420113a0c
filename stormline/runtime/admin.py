"""Topic administration: the admin client, ``ensure_topics`` (once), configs, end offsets.

:func:`ensure_topics` creates whichever of the wanted topics are missing, idempotently (a
topic created meanwhile by someone else is fine), and returns the cluster metadata after
it. The topic catalog (``stormline.schemas``) and the router's internal topics both go
through it; what a topic should look like is theirs to say, except its replication, which is
the cluster's (:func:`replication`: one setting for every topic).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    ConfigResource,
    NewTopic,
    OffsetSpec,
)

from stormline.runtime.connection import client_logger, confluent_config
from stormline.runtime.retry import RetryPolicy
from stormline.settings import Settings

log = logging.getLogger("stormline.kafka")

# Metadata calls while partition leaders are being elected (a fresh topic, a restart).
LEADER_ELECTION = RetryPolicy(base_s=0.1, max_s=0.5, attempts=20)


def admin_client(
    settings: Settings, *, logger: logging.Logger | None = None, **overrides: Any
) -> AdminClient:
    """An admin client on the one connection config (``overrides``: librdkafka properties)."""
    return AdminClient(confluent_config(settings, **overrides), logger=logger or client_logger())


@dataclass(frozen=True)
class TopicWanted:
    name: str
    partitions: int
    # None: the cluster's replication (:func:`replication`), which is what every topic should
    # use; a number only for a topic that is deliberately not replicated like the rest.
    replication: int | None = None
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Replication:
    """How every Stormline topic is replicated: ``factor`` copies, ``min_insync`` of them
    acknowledged before an ``acks=all`` write succeeds (so one broker may be lost)."""

    factor: int
    min_insync: int

    def topic_config(self) -> dict[str, str]:
        return {"min.insync.replicas": str(self.min_insync)}


def replication_for(settings: Settings, brokers: int) -> Replication:
    """The replication of a cluster of ``brokers``: STORMLINE_REPLICATION_FACTOR and
    STORMLINE_MIN_INSYNC_REPLICAS when set, else 3 and 2 on 3+ brokers, 1 and 1 below."""
    factor = settings.replication_factor or (3 if brokers >= 3 else 1)
    min_insync = settings.min_insync_replicas or (2 if factor >= 3 else 1)
    if min_insync > factor:
        raise ValueError(
            f"STORMLINE_MIN_INSYNC_REPLICAS={min_insync} exceeds the replication factor {factor}:"
            " no write could ever be acknowledged"
        )
    return Replication(factor, min_insync)


def replication(
    settings: Settings, *, admin: AdminClient | None = None, timeout: float = 30.0
) -> Replication:
    """The replication every topic gets on the cluster ``settings`` name (asks it how many
    brokers it has unless the factor is set). Faust's ``topic_replication_factor``, the
    registry's journal and :func:`ensure_topics` all take it from here."""
    if settings.replication_factor is not None:
        return replication_for(settings, settings.replication_factor)
    md = (admin or admin_client(settings)).list_topics(timeout=timeout)
    return replication_for(settings, len(md.brokers))


def ensure_topics(
    settings: Settings,
    wanted: Sequence[TopicWanted],
    *,
    create: bool = True,
    admin: AdminClient | None = None,
    timeout: float = 30.0,
    on_created: Callable[[str], None] | None = None,
) -> tuple[Any, list[str]]:
    """Create the missing ``wanted`` topics; returns (metadata after, names created)."""
    admin = admin or admin_client(settings)
    md = admin.list_topics(timeout=timeout)
    missing = [w for w in wanted if w.name not in md.topics]
    if not create or not missing:
        return md, []
    rep = replication_for(settings, len(md.brokers))
    new = [
        NewTopic(
            w.name,
            w.partitions,
            w.replication or rep.factor,
            config={**rep.topic_config(), **w.config} if w.replication is None else w.config,
        )
        for w in missing
    ]
    for name, fut in admin.create_topics(new, request_timeout=timeout).items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        log.info("created topic %s", name)
        if on_created is not None:
            on_created(name)
    time.sleep(0.2)  # let the new topics' metadata reach the broker we ask next
    return admin.list_topics(timeout=timeout), [w.name for w in missing]


def topic_configs(
    admin: AdminClient, names: Sequence[str], timeout: float = 30.0
) -> dict[str, dict[str, str]]:
    """Each topic's effective configuration (name -> {key: value})."""
    if not names:
        return {}
    futures = admin.describe_configs(
        [ConfigResource("topic", n) for n in names], request_timeout=timeout
    )
    return {
        res.name: {k: v.value for k, v in fut.result(timeout).items()}
        for res, fut in futures.items()
    }


def end_offsets(
    settings: Settings,
    topic: str,
    partitions: int,
    admin: AdminClient | None = None,
    retries: int = 20,
) -> list[int]:
    """High watermarks of ``topic``'s partitions (retried while leaders are being elected)."""
    admin = admin or admin_client(settings)
    latest = OffsetSpec.latest()
    request = {TopicPartition(topic, p): latest for p in range(partitions)}
    policy = RetryPolicy(LEADER_ELECTION.base_s, LEADER_ELECTION.max_s, attempts=retries)
    for attempt in policy.retrying(lambda exc: isinstance(exc, KafkaException)):
        with attempt:
            futures = admin.list_offsets(request, request_timeout=10)
            return [futures[tp].result().offset for tp in request]
    raise AssertionError("unreachable: the retry policy re-raises")
