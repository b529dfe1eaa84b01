"""gunicorn settings for FleetOps web nodes: `gunicorn fleetops.wsgi -c deploy/gunicorn.conf.py`."""

import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
# A request is mostly Python on the CPU between short PostgreSQL round trips, so processes, not
# threads, use the cores: threads of one process queue for the GIL after every query (a write
# makes over ten), which stretches the latency of exactly the query-heavy requests. gunicorn's
# rule of thumb, two processes per core plus one, keeps a core busy while another process waits
# on the database. GUNICORN_THREADS > 1 switches to gthread (keep-alive to the load balancer);
# each thread then holds a database connection of its own (DB_CONN_MAX_AGE), so a node opens
# workers x threads connections.
workers = int(os.environ.get("WEB_CONCURRENCY", str(2 * (os.cpu_count() or 1) + 1)))
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
worker_class = "gthread" if threads > 1 else "sync"
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 20
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss rid=%({x-request-id}o)s'
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    # prometheus_client multiprocess mode: forget a dead worker's live gauges.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


# FleetOps does not use gunicorn's control socket; without it two instances on one host never clash.
control_socket_disable = True
