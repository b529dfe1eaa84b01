"""Settings shared by every environment. Environment-specific modules import from here."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from fleetops.settings.env import (
    broker_ssl_options,
    env_bool,
    env_broker_url,
    env_cache,
    env_choice,
    env_database,
    env_int,
    env_list,
    env_rate,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = Path(env_str("FLEETOPS_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = False
SECRET_KEY = env_str("SECRET_KEY")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "fleetops.apps.FleetOpsAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "django_prometheus",
    "axes",
    "fleetops.observability",
    "fleetops.access",
    "fleetops.audit",
    "fleetops.api",
    "fleetops.notifications",
    "fleetops.outbox",
    "curtailment",
    "migrations_app.apps.MigrationsAppConfig",
    "indexer",
]

MIDDLEWARE = [
    "fleetops.observability.middleware.RequestIdMiddleware",
    # Outside the session and auth middleware, which load from (and save to) the database.
    "fleetops.observability.middleware.DatabaseUnavailableMiddleware",
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    # Axes must come last so it sees the outcome of authentication.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "fleetops.urls"
WSGI_APPLICATION = "fleetops.wsgi.application"
ASGI_APPLICATION = "fleetops.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": env_database("DATABASE_URL", conn_max_age=env_int("DB_CONN_MAX_AGE", 60))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# The cache backs DRF throttles; the database cache is shared by every web process without extra
# infrastructure. Point CACHE_URL at Redis when there is one (redis://host:6379/1).
CACHES = {"default": env_cache("CACHE_URL")}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
AUTHENTICATION_BACKENDS = [
    # Axes first: it refuses locked-out credentials before the model backend checks the password.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
LOGIN_URL = "admin:login"
LOGIN_REDIRECT_URL = "admin:index"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "static")))
# The console's own script and stylesheet (fleetops/static/fleetops/): plain files, no build step.
STATICFILES_DIRS = [BASE_DIR / "fleetops" / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 8 * 3600, min_value=300)
X_FRAME_OPTIONS = "DENY"

# --- Login throttling (django-axes) ---------------------------------------------------------
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 5, min_value=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_COOLOFF_MINUTES", 15, min_value=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "access/lockout.html"
AXES_VERBOSE = False

# --- DRF ------------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "fleetops.access.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["fleetops.access.permissions.OrgRolePermission"],
    "DEFAULT_PAGINATION_CLASS": "fleetops.api.pagination.KeysetPagination",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    # drf-spectacular plus the error responses of every operation.
    "DEFAULT_SCHEMA_CLASS": "fleetops.api.schema.FleetOpsAutoSchema",
    "EXCEPTION_HANDLER": "fleetops.api.errors.api_exception_handler",
    "DEFAULT_THROTTLE_CLASSES": [
        # DRF's anon/user throttles, failing open while their cache (Redis) is unreachable.
        "fleetops.api.throttling.AnonThrottle",
        "fleetops.api.throttling.UserThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "anon": env_rate("API_THROTTLE_ANON", "60/min"),
        "user": env_rate("API_THROTTLE_USER", "1200/min"),
        # Invalid, revoked or expired API tokens per client address (fleetops.access.authentication).
        "failed_auth": env_rate("API_THROTTLE_FAILED_AUTH", "20/min"),
    },
    # The client address for the throttles: the Nth address from the right of X-Forwarded-For, or
    # REMOTE_ADDR when 0 (no proxy in front, so the header is the client's to forge).
    "NUM_PROXIES": env_int("API_NUM_PROXIES", 0, min_value=0, max_value=10),
    # JSON in, JSON out: no browsable API (humans read /api/docs/) and no form bodies.
    # DRF's JSON output written by orjson (fleetops.api.renderers).
    "DEFAULT_RENDERER_CLASSES": ["fleetops.api.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["fleetops.api.parsers.StrictJSONParser"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "FleetOps API",
    "DESCRIPTION": (
        "Automation API for the FleetOps operations portal. Authenticate with a per-user API token "
        "(`Authorization: Bearer fo_...`). Every error has the shape "
        '`{"error": {"code", "message", "fields"}}`.'
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "fleetops.api.schema.error_responses_hook",
    ],
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    # Several apps have a `state` field; name their enums after the model, not a hash.
    "ENUM_NAME_OVERRIDES": {
        "CurtailmentEventStateEnum": "curtailment.models.EventState",
        "CurtailmentTargetStateEnum": "curtailment.models.TargetState",
        "KeyStateEnum": "migrations_app.models.keys.KeyState",
        "KeyMigrationStatusEnum": "migrations_app.models.keys.KeyMigrationStatus",
    },
}

# --- Celery ---------------------------------------------------------------------------------------
# redis:// and rediss:// (Redis), amqp:// (RabbitMQ); filesystem:// for the demo, memory:// for tests.
CELERY_BROKER_URL = env_broker_url("CELERY_BROKER_URL")
CELERY_BROKER_USE_SSL = broker_ssl_options(CELERY_BROKER_URL)
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    # kombu's filesystem transport (the demo's embedded broker): every process that shares
    # FLEETOPS_VAR_DIR shares one folder as the queue.
    _broker_dir = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        # Broadcast (pidbox) bindings; kombu's default is ./control in the working directory.
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
# No result backend, so no `celery.backend_cleanup` schedule either.
CELERY_RESULT_EXPIRES = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A worker gives up after 100 failed reconnects by default (a few minutes); it must outlive a broker
# outage of any length instead (DESIGN.md rule 15).
CELERY_BROKER_CONNECTION_MAX_RETRIES = None

# --- FleetOps ---------------------------------------------------------------------------------------
FLEETOPS_AUDIT_RETENTION_DAYS = env_int("AUDIT_RETENTION_DAYS", 400, min_value=30)
FLEETOPS_IDEMPOTENCY_TTL_HOURS = env_int("IDEMPOTENCY_TTL_HOURS", 24, min_value=1)
# A request that holds its key longer than this is treated as crashed and may be taken over.
FLEETOPS_IDEMPOTENCY_STALE_SECONDS = env_int("IDEMPOTENCY_STALE_SECONDS", 300, min_value=10)
FLEETOPS_API_PAGE_SIZE = env_int("API_PAGE_SIZE", 50, min_value=1, max_value=1000)
FLEETOPS_API_MAX_PAGE_SIZE = env_int("API_MAX_PAGE_SIZE", 200, min_value=1, max_value=5000)
# Request bodies (fleetops.api.parsers): larger is a 413 (a 100,000-device list fits in the
# default); nested deeper is a 400 (no input nests beyond 3).
FLEETOPS_API_MAX_BODY_BYTES = env_int("API_MAX_BODY_BYTES", 4 * 1024 * 1024, min_value=1024)
FLEETOPS_API_MAX_JSON_DEPTH = env_int("API_MAX_JSON_DEPTH", 16, min_value=4, max_value=200)
FLEETOPS_METRICS_TOKEN = env_str("METRICS_TOKEN", "")
FLEETOPS_HEARTBEAT_STALE_SECONDS = env_int("HEARTBEAT_STALE_SECONDS", 120, min_value=5)
# Fleet gateway (curtailment): request timeout, concurrent requests per client, devices per command
# (100,000 devices at 500 a command and 8 in flight go out in 25 rounds of gateway latency).
FLEETOPS_GATEWAY_TIMEOUT_SECONDS = env_int("FLEET_GATEWAY_TIMEOUT_SECONDS", 10, min_value=1)
FLEETOPS_GATEWAY_CONCURRENCY = env_int("FLEET_GATEWAY_CONCURRENCY", 8, min_value=1, max_value=64)
FLEETOPS_CURTAIL_CHUNK_SIZE = env_int("CURTAIL_CHUNK_SIZE", 500, min_value=1, max_value=5000)
# The largest default restore batch: an event restores ceil(1% of its targets) devices a batch,
# clamped to [10, this], so up to this x 100 targets an event restores in 100 batches.
FLEETOPS_CURTAIL_RESTORE_BATCH_MAX = env_int(
    "CURTAIL_RESTORE_BATCH_MAX", 1000, min_value=10, max_value=10_000
)
FLEETOPS_TELEMETRY_RETENTION_DAYS = env_int("TELEMETRY_RETENTION_DAYS", 7, min_value=1)
# Indexer enrichment: the payload decoder (unset: the chain's best source serves /decode), decode
# attempts before `failed`, and how long a claim holds a row before a crashed worker's rows return.
FLEETOPS_INDEXER_DECODER_URL = env_str("INDEXER_DECODER_URL", "")
FLEETOPS_INDEXER_DECODER_TIMEOUT_SECONDS = env_int("INDEXER_DECODER_TIMEOUT_SECONDS", 5, min_value=1)
FLEETOPS_INDEXER_ENRICHMENT_MAX_ATTEMPTS = env_int("INDEXER_ENRICHMENT_MAX_ATTEMPTS", 5, min_value=1)
FLEETOPS_INDEXER_ENRICHMENT_LEASE_SECONDS = env_int("INDEXER_ENRICHMENT_LEASE_SECONDS", 300, min_value=10)
# Heights per range partition of the indexer's blocks / transactions / events (indexer.partitions).
FLEETOPS_INDEXER_PARTITION_HEIGHTS = env_int("INDEXER_PARTITION_HEIGHTS", 100_000, min_value=100)
# Key re-stake lifecycle (migrations_app.keys): attempt limit, retry backoff (base x2, capped, full
# jitter), claim batch and lease, verification window, and the cool-down auto-reset of failed keys
# (0 = off: failed keys wait for an operator's retry).
FLEETOPS_KEYS_MAX_ATTEMPTS = env_int("KEYS_MAX_ATTEMPTS", 5, min_value=1, max_value=100)
FLEETOPS_KEYS_BACKOFF_BASE_SECONDS = env_int("KEYS_BACKOFF_BASE_SECONDS", 30, min_value=1)
FLEETOPS_KEYS_BACKOFF_CAP_SECONDS = env_int("KEYS_BACKOFF_CAP_SECONDS", 1800, min_value=1)
FLEETOPS_KEYS_CLAIM_BATCH = env_int("KEYS_CLAIM_BATCH", 100, min_value=1, max_value=5000)
FLEETOPS_KEYS_CLAIM_LEASE_SECONDS = env_int("KEYS_CLAIM_LEASE_SECONDS", 120, min_value=5)
FLEETOPS_KEYS_BROADCAST_CONCURRENCY = env_int("KEYS_BROADCAST_CONCURRENCY", 4, min_value=1, max_value=64)
FLEETOPS_KEYS_TX_EXPIRATION_BLOCKS = env_int("KEYS_TX_EXPIRATION_BLOCKS", 30, min_value=1)
FLEETOPS_KEYS_VERIFY_BATCH = env_int("KEYS_VERIFY_BATCH", 500, min_value=1, max_value=10000)
# A pending tx is re-checked after min(unavailable_checks, 20) x this (and never sooner than the gap).
FLEETOPS_KEYS_VERIFY_BACKOFF_SECONDS = env_int("KEYS_VERIFY_BACKOFF_SECONDS", 30, min_value=1)
FLEETOPS_KEYS_VERIFY_MIN_GAP_SECONDS = env_int("KEYS_VERIFY_MIN_GAP_SECONDS", 5, min_value=0)
FLEETOPS_KEYS_COOLDOWN_RESET_SECONDS = env_int("KEYS_COOLDOWN_RESET_SECONDS", 0, min_value=0)
FLEETOPS_KEYS_STUCK_SECONDS = env_int("KEYS_STUCK_SECONDS", 600, min_value=1)
# "Stuck" flags in the console (docs/operator-guide.md): a pending curtailment event older than
# this; a restoring one past its restore plan (batches x interval) plus the grace; a protocol
# history migration in progress whose cursor has not moved for this long.
FLEETOPS_CURTAILMENT_PENDING_STUCK_SECONDS = env_int("CURTAILMENT_PENDING_STUCK_SECONDS", 600, min_value=1)
FLEETOPS_CURTAILMENT_RESTORE_GRACE_SECONDS = env_int("CURTAILMENT_RESTORE_GRACE_SECONDS", 300, min_value=0)
FLEETOPS_PROTOCOL_STUCK_SECONDS = env_int("PROTOCOL_STUCK_SECONDS", 900, min_value=1)
FLEETOPS_KEYS_RPC_TIMEOUT_SECONDS = env_int("KEYS_RPC_TIMEOUT_SECONDS", 10, min_value=1)
# How long after a broadcast whose outcome was lost (transport error) its hash is looked up on chain
# (time for a tx the node did take to land, so it is found rather than re-sent).
FLEETOPS_KEYS_LOOKUP_DELAY_SECONDS = env_int("KEYS_LOOKUP_DELAY_SECONDS", 5, min_value=0)
# Notifications: webhook timeout and send attempts before a delivery is marked `error`.
FLEETOPS_NOTIFICATION_TIMEOUT_SECONDS = env_int("NOTIFICATION_TIMEOUT_SECONDS", 5, min_value=1)
FLEETOPS_NOTIFICATION_MAX_ATTEMPTS = env_int("NOTIFICATION_MAX_ATTEMPTS", 5, min_value=1)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "fleetops@localhost")
EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")

# --- Logging --------------------------------------------------------------------------------------
LOG_FORMAT = env_choice("LOG_FORMAT", ("json", "text"), "json")
LOG_LEVEL = env_choice("LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")


def build_logging(fmt: str, level: str) -> dict[str, object]:
    formatter = (
        {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(actor)s",
            "rename_fields": {"asctime": "ts", "levelname": "level", "name": "logger"},
        }
        if fmt == "json"
        else {"format": "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s %(actor)s] %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "fleetops.observability.logging.RequestContextFilter"}},
        "formatters": {"main": formatter},
        "handlers": {
            "console": {"class": "logging.StreamHandler", "formatter": "main", "filters": ["context"]},
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            "django.db.backends": {"level": "WARNING"},
            "axes": {"level": "WARNING"},
            # One INFO line per HTTP request to a fleet gateway, RPC node or decoder drowns the log;
            # the clients log their own failures and count every request in metrics.
            "httpx": {"level": "WARNING"},
            "httpcore": {"level": "WARNING"},
        },
    }


LOGGING = build_logging(LOG_FORMAT, LOG_LEVEL)

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    PROMETHEUS_EXPORT_MIGRATIONS = False
PROMETHEUS_METRIC_NAMESPACE = ""
_ = env_bool  # re-exported for environment modules
