"""B6: the portal under load, behind gunicorn as the README configures it, beside a raw WSGI app.

The database holds `--events` indexed events (bulk-loaded as B5 does: binary COPY, VACUUM ANALYZE)
for the chain `sim` of one organization. Each phase starts one server, waits on its readiness
endpoint, and lets a load generator in a process of its own run `--warmup` + `--duration` seconds of

- `--readers` readers (each a viewer with an API token of its own; keep-alive HTTP where the
  server keeps connections open, sync workers close them): events pages
  `GET /api/v1/indexer/chains/sim/events?cursor=…` at random keyset depths (uniform over the
  table's ids; one request in 50 is the first page);
- `--writers` writers (each an operator with a token of its own): `POST …/enrichments/requeue`
  with an `Idempotency-Key`, the API's cheapest honest write: the key is claimed in the
  idempotency table, the requeue selects the re-queueable rows among the ids sent (none, so nothing
  moves), and the response is stored with the key in one transaction. Every `--replay-every`-th
  request repeats the writer's previous key and body, which must replay the stored bytes.

Phases: the raw app (`bench/_raw_wsgi.py`: psycopg, no Django, the same queries and writes on the
same rows, the same idempotency table and semantics) and the portal (`fleetops.wsgi`, production
settings), each under `gunicorn -c deploy/gunicorn.conf.py` with the same environment, one after
the other (order alternating per `--rounds`), so neither competes with the other for the two cores.
What the settings need for a load balancer is sent as one would: `X-Forwarded-Proto: https` and an
`X-Forwarded-For` address per client. The API rate limit is raised (API_THROTTLE_USER) so that it
never refuses; the rate limits still count every request (where CACHE_URL says: unset is the
embedded default, `--cache-url redis://…` sets it for both servers).

Goals (issue 15, BENCHMARKS.md B6): portal requests/s >= 30% of raw, portal p95 <= 3x raw (the
worse of reads and writes), 0 errors in either phase.

    python -m bench.b6_load [--duration 60] [--readers 20] [--writers 5] [--events 1000000]
                            [--cache-url redis://127.0.0.1:6379/1] [--rounds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench._indexer import percentile
from bench._loadgen import Plan, run_load
from bench.b1_reconciler import free_port
from bench.b5_reads import load_events
from bench.common import Timer, setup_django

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).with_name("gunicorn")
GUNICORN_CONFIG = ROOT / "deploy" / "gunicorn.conf.py"
CHAIN_SLUG = "sim"
EVENTS_PATH = f"/api/v1/indexer/chains/{CHAIN_SLUG}/events"
REQUEUE_PATH = f"/api/v1/indexer/chains/{CHAIN_SLUG}/enrichments/requeue"
APPS = {"raw": "bench._raw_wsgi:application", "portal": "fleetops.wsgi:application"}
NETWORK_BROKERS = ("redis://", "rediss://", "amqp://", "amqps://", "pyamqp://")
POSITIONS = 5_000  # distinct random keyset depths per run


# --- servers -----------------------------------------------------------------------------------------


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Poll the readiness endpoint until it answers 200; fail at once if the server exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            last = f"{error.code} {error.read()[:300]!r}"
        except OSError as error:
            last = str(error)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready within {timeout:.0f}s: {last}")
        time.sleep(0.1)


@contextlib.contextmanager
def gunicorn(app: str, env: dict[str, str], log: Path) -> Iterator[str]:
    """`gunicorn <app> -c deploy/gunicorn.conf.py` on a free loopback port, in a session of its own
    (master and workers stopped together on exit, whatever happens)."""
    port = free_port()
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(GUNICORN), APPS[app], "--config", str(GUNICORN_CONFIG), "--bind", f"127.0.0.1:{port}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}/health/ready", process)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def gunicorn_settings(env: dict[str, str]) -> dict[str, Any]:
    """What deploy/gunicorn.conf.py resolves to in `env` (printed with the figures)."""
    import runpy

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        return runpy.run_path(str(GUNICORN_CONFIG))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def server_env(args: argparse.Namespace, secret: str, metrics_dir: str) -> dict[str, str]:
    """Production settings as deploy/env.example has them, pointed at the benchmark's database."""
    from fleetops.access.models import Role
    from fleetops.api.models import IdempotencyKey
    from indexer.models import ENRICHMENT_MACHINE, ENRICHMENT_REQUEUEABLE, EnrichmentStatus
    from indexer.services import edge_role

    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "CACHE_URL", "DJANGO_", "LOG_"))}
    broker = os.environ.get("CELERY_BROKER_URL", "")
    env.update(
        DJANGO_SETTINGS_MODULE="fleetops.settings.production",
        SECRET_KEY=secret,
        ALLOWED_HOSTS="127.0.0.1,localhost",
        # Required by production settings; a requeue that moves nothing publishes nothing.
        CELERY_BROKER_URL=broker if broker.startswith(NETWORK_BROKERS) else "redis://127.0.0.1:6379/0",
        # Never refuse: the counting is measured, a 429 is not what B6 is about.
        API_THROTTLE_USER="100000000/min",
        PROMETHEUS_MULTIPROC_DIR=metrics_dir,
        B6_ROLES=",".join(sorted(Role.values, key=Role.rank)),
        B6_REQUEUE_ROLE=str(edge_role(ENRICHMENT_MACHINE, ENRICHMENT_REQUEUEABLE, EnrichmentStatus.PENDING)),
        B6_REQUEUEABLE=",".join(ENRICHMENT_REQUEUEABLE),
        B6_IDEMPOTENCY_STATES=f"{IdempotencyKey.State.IN_FLIGHT},{IdempotencyKey.State.COMPLETED}",
    )
    env.pop("DATABASE_URL", None)
    env["DATABASE_URL"] = os.environ["DATABASE_URL"]
    if args.cache_url:
        env["CACHE_URL"] = args.cache_url
    return env


# --- rows --------------------------------------------------------------------------------------------


def seed(args: argparse.Namespace) -> dict[str, Any]:
    from django.contrib.auth import get_user_model
    from django.db import connection

    from fleetops.access.models import Membership, Organization, Role
    from fleetops.access.services import api_token_create
    from fleetops.audit.actors import Actor
    from indexer.models import ENRICHMENT_REQUEUEABLE, Chain, Enrichment, IndexerState

    org = Organization.objects.create(slug="b6", name="B6 Load")
    chain = Chain.objects.create(
        org=org, slug=CHAIN_SLUG, chain_id="fleetops-sim-1", expected_block_time_seconds=1.0
    )
    IndexerState.objects.create(chain=chain)
    params = connection.get_connection_params()
    conninfo = {k: v for k, v in params.items() if isinstance(v, str | int) and not isinstance(v, bool)}
    with Timer() as t_load:
        load_events(conninfo, chain.pk, 1, args.events)
    with connection.cursor() as cur:
        cur.execute("SELECT min(id), max(id), count(*) FROM indexer_event WHERE chain_id = %s", [chain.pk])
        low, high, total = cur.fetchone()
    print(f"loaded {total:,} events with binary COPY + VACUUM ANALYZE in {t_load.elapsed:.0f}s")
    # The writers' ids must select nothing, or the two apps would not do the same work.
    assert not Enrichment.objects.filter(status__in=ENRICHMENT_REQUEUEABLE).exists()

    def tokens(role: str, count: int) -> list[str]:
        out = []
        for i in range(count):
            user = get_user_model().objects.create_user(username=f"b6-{role}-{i}", password="x" * 16)
            Membership.objects.create(user=user, org=org, role=role)
            token = api_token_create(
                user=user, org=org, token_role=role, name=f"b6 {role} {i}", actor=Actor.for_user(user)
            )
            out.append(token.plaintext)
        return out

    return {
        "org": org.pk,
        "low": low,
        "high": high,
        "readers": tokens(Role.VIEWER, args.readers),
        "writers": tokens(Role.OPERATOR, args.writers),
    }


def get_page(host: str, rows: dict[str, Any], cursor: str | None) -> dict[str, Any]:
    query = f"?cursor={cursor}" if cursor else ""
    request = urllib.request.Request(
        f"http://{host}{EVENTS_PATH}{query}",
        headers={
            "Authorization": f"Bearer {rows['readers'][0]}",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-For": "10.6.0.1",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        page: dict[str, Any] = json.loads(response.read())
    return page


def cursors(app: str, host: str, rows: dict[str, Any], secret: str, positions: list[int]) -> list[str]:
    """Each keyset position as the app's own cursor. The portal's binding comes from a real first
    page (its next_cursor), so minting goes through the pagination's own signing and format."""
    from django.core import signing

    from fleetops.api import pagination

    if app == "raw":
        from bench._raw_wsgi import sign_cursor

        return [sign_cursor(rows["org"], EVENTS_PATH, p, secret=secret.encode()) for p in positions]
    first = get_page(host, rows, None)["next_cursor"]
    binding = signing.loads(first, key=secret, salt=pagination._SALT)["b"]
    return [
        str(signing.dumps({"p": [p], "b": binding}, key=secret, salt=pagination._SALT, compress=True))
        for p in positions
    ]


# --- report ------------------------------------------------------------------------------------------


def summarize(app: str, outcome: dict[str, Any], duration: float) -> dict[str, Any]:
    out: dict[str, Any] = {"errors": 0, "requests": 0}
    for kind in ("read", "write"):
        samples = outcome["latencies"][kind]
        errors = outcome["errors"][kind]
        out[kind] = {
            "rps": len(samples) / duration,
            "p50": percentile(samples, 0.5),
            "p95": percentile(samples, 0.95),
            "p99": percentile(samples, 0.99),
            "errors": errors,
        }
        out["errors"] += errors
        out["requests"] += len(samples)
        print(
            f"  {app:<6} {kind:<5} {len(samples) / duration:8.1f} req/s"
            f"  p50 {out[kind]['p50'] * 1000:7.2f} ms"
            f"  p95 {out[kind]['p95'] * 1000:7.2f} ms  p99 {out[kind]['p99'] * 1000:7.2f} ms"
            f"  errors {errors}"
        )
    out["rps"] = out["requests"] / duration
    replays = outcome["replays"]
    print(
        f"  {app:<6} total {out['rps']:8.1f} req/s, {replays} idempotent replays checked byte for byte; "
        f"load generator CPU {outcome['cpu'] / duration:.0%} of one core"
    )
    for sample in outcome["error_samples"][:5]:
        print(f"    error: {sample}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each phase")
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--writers", type=int, default=5)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--replay-every", type=int, default=4, help="every Nth write repeats the last key")
    parser.add_argument("--rounds", type=int, default=1, help="raw/portal phase pairs (order alternates)")
    parser.add_argument("--cache-url", default="", help="CACHE_URL for both servers (default: unset)")
    parser.add_argument("--db", default="fleetops_bench_b6")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined,unused-ignore]
    server = setup_django(args.db)  # noqa: F841 - keeps an embedded server alive

    import random

    rows = seed(args)
    secret = secrets.token_urlsafe(50)
    rng = random.Random(6)
    positions = [rng.randint(rows["low"], rows["high"] + 1) for _ in range(POSITIONS)]
    workdir = Path(tempfile.mkdtemp(prefix="b6-"))
    metrics_dir = workdir / "prometheus"
    metrics_dir.mkdir()
    env = server_env(args, secret, str(metrics_dir))
    conf = gunicorn_settings(env)
    print(
        f"gunicorn -c {GUNICORN_CONFIG.relative_to(ROOT)}: {conf['workers']} {conf['worker_class']} "
        f"workers x {conf['threads']} threads; "
        f"CACHE_URL={env.get('CACHE_URL') or 'unset'}; "
        f"{args.readers} readers + {args.writers} writers, "
        f"{args.warmup:g} s warm-up + {args.duration:g} s per phase; logs in {workdir}"
    )

    ctx = multiprocessing.get_context("spawn")
    results: dict[str, list[dict[str, Any]]] = {"raw": [], "portal": []}
    pages: dict[str, list[Any]] = {}
    for round_no in range(args.rounds):
        order = ("raw", "portal") if round_no % 2 == 0 else ("portal", "raw")
        for app in order:
            with gunicorn(app, env, workdir / f"{app}.log") as host:
                app_cursors = cursors(app, host, rows, secret, positions)
                # Same rows from both apps: the first page and one deep page, compared field by field.
                pages[app] = [get_page(host, rows, c)["results"] for c in (None, app_cursors[0])]
                plan = Plan(
                    host=host,
                    events_path=EVENTS_PATH,
                    requeue_path=REQUEUE_PATH,
                    reader_tokens=rows["readers"],
                    writer_tokens=rows["writers"],
                    cursors=app_cursors,
                    warmup=args.warmup,
                    duration=args.duration,
                    replay_every=args.replay_every,
                    key_prefix=f"b6-{app}-{round_no}-{secrets.token_hex(4)}",
                    seed=round_no,
                )
                with ctx.Pool(1) as pool:
                    outcome = pool.apply(run_load, (plan,))
            print(f"round {round_no + 1} {app}:")
            results[app].append(summarize(app, outcome, args.duration))

    same_rows = pages["raw"] == pages["portal"]
    print(f"first and deep page identical in both apps: {same_rows}")
    return report(results, same_rows)


def _ratio(portal: float, raw: float) -> float:
    """portal / raw; a kind with no successful request (p95 NaN) counts as infinitely slow."""
    if math.isnan(portal) or math.isnan(raw) or raw == 0:
        return math.inf
    return portal / raw


def report(results: dict[str, list[dict[str, Any]]], same_rows: bool) -> int:
    throughput = statistics.median(
        p["rps"] / r["rps"] for p, r in zip(results["portal"], results["raw"], strict=True)
    )
    p95_ratios = {
        kind: statistics.median(
            _ratio(p[kind]["p95"], r[kind]["p95"])
            for p, r in zip(results["portal"], results["raw"], strict=True)
        )
        for kind in ("read", "write")
    }
    worst_kind = max(p95_ratios, key=lambda k: p95_ratios[k])
    errors = {app: sum(r["errors"] for r in runs) for app, runs in results.items()}
    print(
        f"portal/raw: throughput {throughput:.2f}, p95 reads {p95_ratios['read']:.2f}, "
        f"p95 writes {p95_ratios['write']:.2f}; errors portal {errors['portal']}, raw {errors['raw']}"
    )
    ok_throughput = throughput >= 0.30
    ok_p95 = p95_ratios[worst_kind] <= 3.0
    ok_errors = errors["portal"] == 0 and errors["raw"] == 0 and same_rows
    print(f"RESULT b6_load throughput_ratio={throughput:.2f} goal=0.30 {'pass' if ok_throughput else 'FAIL'}")
    print(
        f"RESULT b6_load p95_ratio={p95_ratios[worst_kind]:.2f} goal=3.0 ({worst_kind}s, the worse kind) "
        f"{'pass' if ok_p95 else 'FAIL'}"
    )
    print(
        f"RESULT b6_load errors={errors['portal']} goal=0 (raw: {errors['raw']}) "
        f"{'pass' if ok_errors else 'FAIL'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
