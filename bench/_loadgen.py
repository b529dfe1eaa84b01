"""B6's load generator: readers and writers as threads on keep-alive HTTP connections, run in a
process of its own (`bench.b6_load` starts it through a spawn pool, one per phase)."""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Plan:
    host: str
    events_path: str
    requeue_path: str
    reader_tokens: list[str]
    writer_tokens: list[str]
    cursors: list[str]
    warmup: float
    duration: float
    replay_every: int
    key_prefix: str
    seed: int


def run_load(plan: Plan) -> dict[str, Any]:
    """Readers and writers as threads on keep-alive connections (stdlib http.client: the cheapest
    client per request, so the generator takes as little of the two cores as it can). Requests
    started before the warm-up ends are not counted."""
    started = time.monotonic()
    measure_from, stop_at = started + plan.warmup, started + plan.warmup + plan.duration
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {"read": [], "write": []}
    errors = {"read": 0, "write": 0}
    error_samples: list[str] = []
    replays = [0]

    def record(kind: str, began: float, elapsed: float, problem: str | None) -> None:
        if began < measure_from:
            return
        with lock:
            if problem is None:
                latencies[kind].append(elapsed)
            else:
                errors[kind] += 1
                if len(error_samples) < 20:
                    error_samples.append(f"{kind}: {problem}")

    def headers(token: str, client: int) -> dict[str, str]:
        # What the load balancer in front of gunicorn adds, as deploy/env.example expects.
        return {
            "Authorization": f"Bearer {token}",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-For": f"10.6.{client // 250}.{client % 250 + 1}",
        }

    def send(conn: http.client.HTTPConnection, method: str, url: str, body: bytes | None, hdrs: Any) -> Any:
        try:
            conn.request(method, url, body=body, headers=hdrs)
            response = conn.getresponse()
            return response.status, response.read(), response
        except (OSError, http.client.HTTPException):
            conn.close()  # reconnect once: a worker may close a kept-alive connection at any time
            conn.request(method, url, body=body, headers=hdrs)
            response = conn.getresponse()
            return response.status, response.read(), response

    def reader(index: int) -> None:
        rng = random.Random(plan.seed * 1000 + index)
        conn = http.client.HTTPConnection(plan.host, timeout=60)
        hdrs = headers(plan.reader_tokens[index], index)
        while (began := time.monotonic()) < stop_at:
            url = plan.events_path
            if rng.randrange(50):
                url += "?cursor=" + rng.choice(plan.cursors)
            problem = None
            try:
                status, body, _ = send(conn, "GET", url, None, hdrs)
                if status != 200 or not body.startswith(b'{"results":['):
                    problem = f"{status} {body[:200]!r}"
            except Exception as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
            record("read", began, time.monotonic() - began, problem)
        conn.close()

    def writer(index: int) -> None:
        rng = random.Random(plan.seed * 1000 + 500 + index)
        conn = http.client.HTTPConnection(plan.host, timeout=60)
        client = len(plan.reader_tokens) + index
        hdrs = headers(plan.writer_tokens[index], client) | {"Content-Type": "application/json"}
        previous: tuple[str, bytes, bytes] | None = None
        n = 0
        while (began := time.monotonic()) < stop_at:
            n += 1
            replay = previous is not None and n % plan.replay_every == 0
            if replay and previous is not None:
                key, body, first = previous
            else:
                key = f"{plan.key_prefix}-{index}-{n}"
                ids = sorted(rng.sample(range(1, 10_000_000), 3))
                body, first = json.dumps({"ids": ids, "reason": "b6 load"}).encode(), b""
            problem = None
            try:
                status, content, response = send(
                    conn, "POST", plan.requeue_path, body, hdrs | {"Idempotency-Key": key}
                )
                if status != 200 or not content.startswith(b'{"requeued":'):
                    problem = f"{status} {content[:200]!r}"
                elif replay and (content != first or response.getheader("Idempotent-Replayed") != "true"):
                    problem = f"replay differs: {content[:100]!r} != {first[:100]!r}"
                elif not replay:
                    previous = (key, body, content)
                elif began >= measure_from:
                    with lock:
                        replays[0] += 1
            except Exception as exc:
                problem = f"{exc.__class__.__name__}: {exc}"
            record("write", began, time.monotonic() - began, problem)
        conn.close()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(len(plan.reader_tokens))]
    threads += [threading.Thread(target=writer, args=(i,)) for i in range(len(plan.writer_tokens))]
    cpu_before = time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu = (time.process_time() - cpu_before) * plan.duration / (time.monotonic() - started)
    return {
        "latencies": latencies,
        "errors": errors,
        "error_samples": error_samples,
        "replays": replays[0],
        "cpu": cpu,
    }
