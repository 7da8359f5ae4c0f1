"""Shared set-up of the benchmarks that run the portal's own code: a fresh PostgreSQL database
(portal_bench) migrated, Django configured for one process (in-memory channel layer and broker)."""

from __future__ import annotations

import os
import tempfile

ADMIN_URL = os.environ.get("BENCH_PG_ADMIN", "postgres://portal:portal@127.0.0.1:5432/portal")
BENCH_DB = os.environ.get("BENCH_DB", "portal_bench")  # another name lets benchmarks run side by side


def fresh_database() -> str:
    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB}")
        conn.execute(f"CREATE DATABASE {BENCH_DB}")
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + BENCH_DB


def django_on_fresh_database() -> None:
    os.environ["DATABASE_URL"] = fresh_database()
    os.environ.setdefault("CHANNEL_LAYER", "memory")
    os.environ.setdefault("CELERY_BROKER_URL", "memory://")
    os.environ["PORTAL_DATA_DIR"] = tempfile.mkdtemp(prefix="bench-portal-")
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
