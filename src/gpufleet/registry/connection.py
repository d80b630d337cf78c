"""Connecting to Redis, standalone or under Sentinel, for the registry (redis-py) and the broker (Celery/kombu).

``redis.url`` is ``redis://`` / ``rediss://`` (one server, or a managed replicated service behind one address), or
``sentinel://[:password@]host1:26379,host2:26379,host3:26379/<db>?master=<name>`` for Redis Sentinel: the
sentinels are asked where the master is, and asked again after a failover. The password is the master's (and its
replicas'); the sentinels themselves take none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import hiredis
import redis

SENTINEL_SCHEME = "sentinel"
SENTINEL_TIMEOUT_S = 2.0  # one sentinel that does not answer must not hold a reconnect for long


@dataclass(frozen=True)
class SentinelUrl:
    hosts: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel(url: str) -> SentinelUrl:
    """Raises ValueError (with what to write instead) for a sentinel URL that is not valid."""
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel address {item!r} must be host:port")
        hosts.append((host.strip("[]"), int(port)))
    masters = parse_qs(parts.query).get("master", [])
    if len(masters) != 1 or not masters[0]:
        raise ValueError("a sentinel URL names its master: sentinel://host1:26379,host2:26379/0?master=mymaster")
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise ValueError(f"the database must be a number, not {db!r}")
    return SentinelUrl(tuple(hosts), masters[0], int(db), unquote(username) or None, unquote(password) or None)


def is_sentinel(url: str) -> bool:
    return url.startswith(f"{SENTINEL_SCHEME}://")


def client(url: str, **options: Any) -> redis.Redis:
    """A client for ``url``; under Sentinel, one whose connections find the current master (again after a
    failover). ``options`` are redis-py's connection options (timeouts, health checks)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    from redis.sentinel import Sentinel

    s = parse_sentinel(url)
    timeouts = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S}
    sentinel = Sentinel(list(s.hosts), sentinel_kwargs=timeouts)
    master: redis.Redis = sentinel.master_for(s.master, db=s.db, username=s.username, password=s.password, **options)
    return master


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and extra transport options for ``url``: kombu's own sentinel form
    (``sentinel://...;sentinel://...`` with ``master_name``)."""
    if not is_sentinel(url):
        return url, {}
    s = parse_sentinel(url)
    auth = ""
    if s.password is not None:
        auth = f"{quote(s.username or '', safe='')}:{quote(s.password, safe='')}@"
    broker = ";".join(f"sentinel://{auth}{host}:{port}/{s.db}" for host, port in s.hosts)
    return broker, {"master_name": s.master, "sentinel_kwargs": {"socket_timeout": SENTINEL_TIMEOUT_S}}


def pack_commands(commands: list[tuple[Any, ...]]) -> bytes:
    """``commands`` in Redis's protocol, as one buffer: redis-py's own pipeline packing writes a trigger's batch of
    envelopes in a hundred system calls (one every 6 KB)."""
    return b"".join([hiredis.pack_command(tuple(args)) for args in commands])


class ScriptPipeline(redis.client.Pipeline):
    """A non-transactional pipeline that sends its scripts' EVALSHA without asking first whether Redis has them, and
    that can be sent now and answered later (:meth:`send`, :meth:`receive`).

    redis-py's pipeline sends SCRIPT EXISTS before every execute that holds a script: one more round trip, which a
    worker paid between two tasks and a trigger per batch. Redis keeps a loaded script until it restarts or fails over,
    so here a command answered NOSCRIPT (it did not run) is run again once its scripts are loaded, with a WAIT that
    followed it, and its reply takes the failed one's place.
    """

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client.connection_pool, client.response_callbacks, transaction=False, shard_hint=None)

    def load_scripts(self) -> None:
        return None

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        stack, scripts = list(self.command_stack), list(self.scripts)
        return self._settle(stack, scripts, super().execute(raise_on_error=False), raise_on_error)

    def send(self) -> None:
        """Write the commands to Redis now; :meth:`receive` reads the replies. In between, the caller may do other
        work while Redis runs them. No retry: an error is the caller's to handle (the pipeline is then empty)."""
        self.connection = conn = self.connection or self.connection_pool.get_connection()
        try:
            conn.send_packed_command([pack_commands([args for args, _ in self.command_stack])])  # type: ignore[no-untyped-call]
        except BaseException:
            conn.disconnect()  # type: ignore[no-untyped-call]
            self.reset()
            raise

    def receive(self, raise_on_error: bool = True) -> list[Any]:
        """The replies to what :meth:`send` wrote, as :meth:`execute` returns them."""
        conn, stack, scripts = self.connection, list(self.command_stack), list(self.scripts)
        assert conn is not None, "receive() without send()"
        replies: list[Any] = []
        try:
            for args, options in stack:
                try:
                    replies.append(self.parse_response(conn, args[0], **options))  # type: ignore[no-untyped-call]
                except redis.exceptions.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            conn.disconnect()  # type: ignore[no-untyped-call]  # replies may be left unread on it
            raise
        finally:
            self.reset()
        return self._settle(stack, scripts, replies, raise_on_error)

    def _settle(self, stack: list[Any], scripts: list[Any], replies: list[Any], raise_on_error: bool) -> list[Any]:
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]
        if missing:
            again = [i for i, (args, _) in enumerate(stack) if i in missing or (i > missing[0] and args[0] == "WAIT")]
            retry = redis.client.Pipeline(self.connection_pool, self.response_callbacks, False, None)
            for script in scripts:
                retry.execute_command("SCRIPT LOAD", script.script)  # type: ignore[no-untyped-call]
            for i in again:
                args, options = stack[i]
                retry.execute_command(*args, **options)  # type: ignore[no-untyped-call]
            for i, reply in zip(again, retry.execute(raise_on_error=False)[len(scripts) :], strict=True):
                replies[i] = reply
        if raise_on_error:
            for i, reply in enumerate(replies):
                if isinstance(reply, redis.exceptions.ResponseError):
                    self.annotate_exception(reply, i + 1, stack[i][0])  # type: ignore[no-untyped-call]
                    raise reply
        return replies
