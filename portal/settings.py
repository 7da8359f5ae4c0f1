"""Settings for the migration portal.

Everything that differs between a laptop demo, CI and production comes from the environment:
DATABASE_URL (SQLite when unset), REDIS_URL, SECRET_KEY, DEBUG, ALLOWED_HOSTS, PORTAL_DATA_DIR.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent

# Under pytest, unit tests run in one process: an in-memory channel layer and broker (nothing they
# queue can reach a real worker) and PostgreSQL. End-to-end tests start real servers with their own
# environment. Anything set in the environment still wins.
TESTING = "pytest" in sys.modules
if TESTING:
    for _key, _value in {
        "DATABASE_URL": "postgres://portal:portal@127.0.0.1:5432/portal",
        "CHANNEL_LAYER": "memory",
        "CELERY_BROKER_URL": "memory://",
        "PORTAL_HEARTBEAT_S": "0.2",
        "PORTAL_PROGRESS_INTERVAL_S": "0.05",
        "SECRET_KEY": "test-only-secret-key-" + "t" * 30,
        "DEBUG": "1",  # development settings (no HTTPS redirect); Django's test runner still runs with DEBUG off
    }.items():
        os.environ.setdefault(_key, _value)
DATA_DIR = Path(os.environ.get("PORTAL_DATA_DIR", BASE_DIR / "var"))
DATA_DIR.mkdir(parents=True, exist_ok=True)


def env_bool(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in {"1", "true", "yes", "on"}


DEBUG = env_bool("DEBUG", False)  # the demo sets DEBUG=1; a deployment that forgets gets the safe side
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise RuntimeError("SECRET_KEY must be set when DEBUG is off")
    SECRET_KEY = "insecure-demo-key-only-for-local-use-" + "x" * 20
ALLOWED_HOSTS = [h for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h]
CSRF_TRUSTED_ORIGINS = [o for o in os.environ.get("CSRF_TRUSTED_ORIGINS", "").split(",") if o]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "channels",
    "django_htmx",
    "migrations_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files from the portal itself: no CDN, no separate web server needed (air-gapped sites).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "portal.middleware.ContentSecurityPolicyMiddleware",
]

ROOT_URLCONF = "portal.urls"
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
                "migrations_app.access.roles_context",
            ],
        },
    },
]
WSGI_APPLICATION = None
ASGI_APPLICATION = "portal.asgi.application"

# -- database: PostgreSQL through DATABASE_URL, SQLite (WAL, immediate transactions) otherwise --
if os.environ.get("DATABASE_URL"):
    # Persistent connections do not suit ASGI (each request may run in another thread): off by default.
    DATABASES = {
        "default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=int(os.environ.get("DB_CONN_MAX_AGE", "0")))
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "portal.sqlite3",
            "OPTIONS": {
                # The web server and the workers write concurrently: WAL lets readers go on, and
                # IMMEDIATE takes the write lock at BEGIN so two writers queue instead of deadlocking.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
            },
        }
    }
if TESTING:
    # Each test session its own database: two sessions on one server never drop each other's.
    DATABASES["default"].setdefault("TEST", {})["NAME"] = f"test_portal_{os.getpid()}"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# -- Redis: Celery broker and the channel layer --------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# Shared by every process (login throttling counts failures across web servers).
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    if TESTING
    else {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL, "KEY_PREFIX": "portal"}
}
if os.environ.get("CHANNEL_LAYER") == "memory":  # single-process tests only
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], "prefix": os.environ.get("CHANNEL_PREFIX", "portal")},
        }
    }
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None  # results live in MigrationRun, not in the broker
CELERY_TASK_ACKS_LATE = False  # a migration is not idempotent: never rely on redelivery
CELERY_TASK_REJECT_ON_WORKER_LOST = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_QUEUE", "portal")
CELERY_BEAT_SCHEDULE = {
    "dispatch-due-requests": {"task": "migrations_app.tasks.dispatch_due",
                              "schedule": float(os.environ.get("PORTAL_DISPATCH_EVERY_S", "15"))},
    "expire-stale-requests": {"task": "migrations_app.tasks.expire_stale", "schedule": 60.0},
    "audit-checkpoint": {"task": "migrations_app.tasks.audit_checkpoint", "schedule": 300.0},
    "reconcile-stale-runs": {"task": "migrations_app.tasks.reconcile_stale",
                             "schedule": float(os.environ.get("PORTAL_RECONCILE_EVERY_S", "20"))},
    "sync-inventory": {"task": "migrations_app.tasks.sync_all_inventories", "schedule": 300.0},
    "resend-notifications": {"task": "migrations_app.tasks.resend_notifications", "schedule": 300.0},
}

# -- portal behaviour ------------------------------------------------------------------------
PORTAL = {
    # Simulator state shared by the web server and the workers.
    "SIMULATOR_STATE_DIR": str(DATA_DIR / "simulator"),
    # Seconds between heartbeats of a running migration.
    "HEARTBEAT_S": float(os.environ.get("PORTAL_HEARTBEAT_S", "2")),
    # A running migration whose heartbeat is older than this is reconciled with the hypervisor.
    # Keep it above the longest a driver call that starts a hypervisor task may take (the
    # driver's request timeout), so a slow worker is never judged lost before its start lands.
    "STALE_AFTER_S": float(os.environ.get("PORTAL_STALE_AFTER_S", "60")),
    # Most runs of one connection a worker message carries (and a worker claims and moves
    # together, see services.runs.execute). Runs queued in one transaction (a batch approval, a
    # move plan) and runs sent again together travel in such batches; 1 sends one run a message.
    "WORKER_BATCH": max(1, int(os.environ.get("PORTAL_WORKER_BATCH", "16"))),
    # A run whose worker was lost before it handed the move to the hypervisor goes back in line
    # (nothing moved) at most this many times; lost once more, it fails with that reason.
    "MAX_REQUEUES": int(os.environ.get("PORTAL_MAX_REQUEUES", "3")),
    # A queued run whose broker message may be lost is sent again after this many seconds.
    "REDISPATCH_AFTER_S": float(os.environ.get("PORTAL_REDISPATCH_AFTER_S", "300")),
    # Past a move's budget by this much: a live worker aborts a move its driver did not stop, and
    # the watchdog settles a lost worker's move the hypervisor cannot abort as errored.
    "ABORT_GRACE_S": float(os.environ.get("PORTAL_ABORT_GRACE_S", "300")),
    # Minimum seconds between two stored progress events of one run (phase changes always stored).
    "PROGRESS_INTERVAL_S": float(os.environ.get("PORTAL_PROGRESS_INTERVAL_S", "0.25")),
    # Completion budget per GiB of memory + copied disk (Nova's live_migration_completion_timeout).
    "TIMEOUT_S_PER_GIB": float(os.environ.get("PORTAL_TIMEOUT_S_PER_GIB", "800")),
    "TIMEOUT_MIN_S": 120.0,
    # A cold move's budget also covers bringing the guest down and powering the VM on again: this
    # many seconds on top (above a vCenter connection's guest_shutdown_s, default 180 s).
    "COLD_POWER_S": float(os.environ.get("PORTAL_COLD_POWER_S", "300")),
    # Login throttling: this many failures for one user name (or one address) lock it out for
    # LOGIN_LOCKOUT_S seconds.
    "LOGIN_MAX_FAILURES": int(os.environ.get("PORTAL_LOGIN_MAX_FAILURES", "5")),
    "LOGIN_LOCKOUT_S": int(os.environ.get("PORTAL_LOGIN_LOCKOUT_S", "900")),
    # Personal API tokens: the expiry a new token is offered, and the longest one may ask for (days).
    # Failed token attempts count against the login throttle of their address.
    "API_TOKEN_DEFAULT_DAYS": int(os.environ.get("PORTAL_API_TOKEN_DEFAULT_DAYS", "90")),
    "API_TOKEN_MAX_DAYS": int(os.environ.get("PORTAL_API_TOKEN_MAX_DAYS", "365")),
    # Pending requests expire after this many hours without a decision.
    "PENDING_EXPIRY_HOURS": float(os.environ.get("PORTAL_PENDING_EXPIRY_HOURS", "72")),
    # Change windows: the shortest window a request may ask for, and how far ahead it may close.
    "WINDOW_MIN_MINUTES": float(os.environ.get("PORTAL_WINDOW_MIN_MINUTES", "15")),
    "WINDOW_MAX_DAYS": float(os.environ.get("PORTAL_WINDOW_MAX_DAYS", "30")),
    # Notifications: the portal's address for links in e-mails and webhook payloads; webhook
    # delivery gives up after this many seconds per attempt and this many retries (backoff 2^n s).
    "BASE_URL": os.environ.get("PORTAL_BASE_URL", "http://127.0.0.1:8000").rstrip("/"),
    "WEBHOOK_TIMEOUT_S": float(os.environ.get("PORTAL_WEBHOOK_TIMEOUT_S", "5")),
    "WEBHOOK_MAX_RETRIES": int(os.environ.get("PORTAL_WEBHOOK_MAX_RETRIES", "5")),
    # Move plans: attempts per VM (the first plus retries after a failure), and the share of a
    # host's memory the planner keeps free.
    "PLAN_MAX_ATTEMPTS": int(os.environ.get("PORTAL_PLAN_MAX_ATTEMPTS", "2")),
    "PLAN_HOST_HEADROOM": float(os.environ.get("PORTAL_PLAN_HOST_HEADROOM", "0.1")),
    # Off by default: when on, an admin may approve any stage of any request but their own, which
    # completes every remaining stage; each such approval is audited as a bypass.
    "ADMIN_BYPASS_APPROVAL": env_bool("PORTAL_ADMIN_BYPASS_APPROVAL", False),
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
WHITENOISE_USE_FINDERS = DEBUG  # production runs collectstatic; the demo serves straight from the apps

# Behind TLS (every deployment that is not the local demo): secure cookies, HSTS, HTTPS redirect.
# PORTAL_TLS_PROXY=1 when a reverse proxy terminates TLS and sets X-Forwarded-Proto.
if not DEBUG:
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("SECURE_COOKIES", True)
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", str(365 * 24 * 3600)))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
    if env_bool("PORTAL_TLS_PROXY", False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_AGE = int(os.environ.get("SESSION_COOKIE_AGE", str(8 * 3600)))  # one working day
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the page, not the cookie
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"daphne": {"level": "WARNING"}, "django.channels.server": {"level": "WARNING"}},
}
# Mail through Django's own settings: the console backend prints mails (the demo); a deployment sets
# EMAIL_BACKEND=django.core.mail.backends.smtp.EmailBackend and EMAIL_HOST & co. Tests use locmem.
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "25"))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "migration-portal@localhost")
