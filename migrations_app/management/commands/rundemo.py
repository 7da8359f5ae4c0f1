"""Run the whole portal in the foreground: Daphne (HTTP + websockets), a Celery worker and beat.

Ctrl-C (or SIGTERM) stops all three. Meant for the demo and for development; production runs the
same three programs under its own supervisor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Start Daphne, a Celery worker and Celery beat together; Ctrl-C stops them all."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--concurrency", type=int, default=4, help="Migrations run at once by the worker.")

    def handle(self, *args, bind: str, port: int, concurrency: int, **options):
        py = sys.executable
        beat_schedule = os.path.join(settings.DATA_DIR, "celerybeat-schedule")
        commands = {
            "web": [py, "-m", "daphne", "-b", bind, "-p", str(port), "portal.asgi:application"],
            "worker": [py, "-m", "celery", "-A", "portal", "worker", "-Q", settings.CELERY_TASK_DEFAULT_QUEUE,
                       "--concurrency", str(concurrency), "--pool", "threads", "--loglevel", "INFO"],
            "beat": [py, "-m", "celery", "-A", "portal", "beat", "--schedule", beat_schedule, "--loglevel", "WARNING"],
        }
        procs = {name: subprocess.Popen(cmd) for name, cmd in commands.items()}
        self.stdout.write(self.style.SUCCESS(f"Portal running at http://{bind}:{port}/  (Ctrl-C stops it)"))
        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        # Explicit handlers: a shell that starts us in the background ignores SIGINT by default.
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        while not stopping:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    self.stderr.write(f"{name} exited with {proc.returncode}; stopping the others")
                    stopping = True
            if not stopping:
                time.sleep(0.5)  # a supervisor's check of its children; signals set ``stopping``
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.stdout.write("Stopped.")
