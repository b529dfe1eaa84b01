"""Production: every secret and host from the environment, HTTPS-only cookies, JSON logs."""

from __future__ import annotations

from fleetops.settings.base import *  # noqa: F403
from fleetops.settings.env import NETWORK_BROKER_SCHEMES, env_bool, env_broker_url, env_int, env_list

DEBUG = False
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS")
# Several hosts share one broker: the demo's filesystem broker and the tests' in-memory one cannot.
CELERY_BROKER_URL = env_broker_url("CELERY_BROKER_URL", schemes=NETWORK_BROKER_SCHEMES)

# TLS terminates at the load balancer, which sets X-Forwarded-Proto.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# ... and appends the client's address to X-Forwarded-For: the API throttles count that address,
# not the balancer's (one address for every client). Count the proxies in front of gunicorn.
REST_FRAMEWORK["NUM_PROXIES"] = env_int("API_NUM_PROXIES", 1, min_value=0, max_value=10)  # noqa: F405
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
# The load balancer probes /health/* over plain HTTP inside the network.
SECURE_REDIRECT_EXEMPT = [r"^health/", r"^metrics$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000, min_value=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_SECURE = True
CSRF_COOKIE_SECURE = True
CSRF_COOKIE_HTTPONLY = True

# Submitting the domain to the browsers' HSTS preload list is a one-way operator decision (set
# SECURE_HSTS_PRELOAD=1 when you have); until then the check's reminder is expected.
SILENCED_SYSTEM_CHECKS = ["security.W021"]
