"""What the broker says: messages waiting per queue, and live workers per queue.

Shared by ``gvr status`` and the Prometheus metrics. Queue depths come from the
broker itself: Redis ``LLEN`` (plus the ``unacked`` hash: messages a worker
holds), or the embedded SQLite broker's ``kombu_message`` table. Workers answer
Celery's ``active_queues`` broadcast, which needs Redis: on the SQLite broker
they cannot be seen, and ``Workers.checked`` says so instead of guessing.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.celery_app import QUEUE_DICOM, QUEUE_GPU
from node.config import Settings

QUEUES = (QUEUE_GPU, QUEUE_DICOM)
# kombu's Redis transport keeps a priority's messages in "<queue>\x06\x16<n>" beside the plain list
_REDIS_PRIORITY_SEP = "\x06\x16"
SQLITE_NO_BROADCAST = "not visible on the SQLite broker (no broadcast): use Redis to see workers (docs/deployment.md)"


@dataclass(frozen=True)
class QueueDepths:
    """Messages waiting per queue; ``unacked``: taken by a worker, not yet acknowledged (Redis only)."""

    broker: str
    waiting: dict[str, int] = field(default_factory=dict)
    unacked: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Workers:
    """Workers that answered within the timeout, by Celery node name (as Flower names them), per queue.

    ``checked`` is False where the broker cannot ask them (SQLite): then nothing is known.
    """

    names: list[str] = field(default_factory=list)
    by_queue: dict[str, list[str]] = field(default_factory=dict)
    checked: bool = True
    error: str | None = None


def is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


def redacted(url: str) -> str:
    """The broker URL without a password (it is printed)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else f"{scheme}://{user}@{host}"


def queue_depths(broker_url: str) -> QueueDepths:
    """Waiting messages per queue, read from the broker; an unreachable broker is an ``error``."""
    shown = redacted(broker_url)
    try:
        if is_redis(broker_url):
            return _redis_depths(broker_url, shown)
        if broker_url.startswith("sqla+sqlite:///"):
            return _sqlite_depths(broker_url.removeprefix("sqla+sqlite:///"), shown)
    except Exception as error:  # noqa: BLE001 - redis, sqlite and socket errors alike: report, do not crash
        return QueueDepths(shown, error=f"{type(error).__name__}: {error}")
    return QueueDepths(shown, error="queue depths are read from Redis or the SQLite broker only")


def _redis_depths(url: str, shown: str) -> QueueDepths:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        with client.pipeline(transaction=True) as pipe:  # MULTI/EXEC: every length at one instant
            names = {name: [name, *client.scan_iter(match=f"{name}{_REDIS_PRIORITY_SEP}*", count=100)]
                     for name in QUEUES}  # fmt: skip
            for keys in names.values():
                for key in keys:
                    pipe.llen(key)
            pipe.hlen("unacked")
            answers = [int(n) for n in pipe.execute()]
    finally:
        client.close()
    waiting, position = {}, 0
    for name, keys in names.items():
        waiting[name] = sum(answers[position : position + len(keys)])
        position += len(keys)
    return QueueDepths(shown, waiting, unacked=answers[-1])


def _sqlite_depths(path: str, shown: str) -> QueueDepths:
    if not Path(path).is_file():  # kombu creates the file with the first message: nothing is waiting
        return QueueDepths(shown, {name: 0 for name in QUEUES})
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"kombu_message", "kombu_queue"} <= tables:  # the file is opened before kombu declares its tables
            return QueueDepths(shown, {name: 0 for name in QUEUES})
        rows = connection.execute(
            "SELECT q.name, COUNT(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id"
            " WHERE m.visible = 1 GROUP BY q.name"
        ).fetchall()
    counts = {str(name): int(count) for name, count in rows}
    return QueueDepths(shown, {name: counts.get(name, 0) for name in QUEUES})


def live_workers(settings: Settings, timeout: float) -> Workers:
    """Workers answering Celery's ``active_queues`` broadcast within ``timeout`` s, with their queues."""
    if not is_redis(settings.celery_broker_url):
        return Workers(checked=False, error=SQLITE_NO_BROADCAST)
    from node.celery_app import make_celery

    app = make_celery(settings)
    try:
        app.conf.broker_connection_retry = False
        app.conf.broker_connection_max_retries = 0
        answers: dict[str, Any] = app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception as error:  # noqa: BLE001 - kombu/redis connection errors of many types: report them
        return Workers(error=f"{type(error).__name__}: {error}")
    finally:
        app.close()
    by_queue: dict[str, list[str]] = {name: [] for name in QUEUES}
    for worker, queues in sorted(answers.items()):
        for queue in queues or []:
            by_queue.setdefault(str(queue.get("name")), []).append(worker)
    return Workers(sorted(answers), by_queue)
