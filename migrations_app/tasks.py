"""Celery tasks: thin entry points that load ids and call services.

``execute_run`` is acked early (settings: CELERY_TASK_ACKS_LATE = False): a migration is never
retried by redelivery; the run's claim in the database decides whether it starts.
"""

from __future__ import annotations

import logging
import os
import socket

from celery import shared_task
from celery.signals import worker_process_shutdown, worker_shutdown
from django.conf import settings

from drivers import base as drv
from drivers import registry
from migrations_app import notifications
from migrations_app.models import HypervisorConnection
from migrations_app.services import audit as audit_services
from migrations_app.services import inventory as inventory_services
from migrations_app.services import plans as plan_services
from migrations_app.services import recovery as recovery_services
from migrations_app.services import requests as request_services
from migrations_app.services import runs as run_services

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@shared_task(name="migrations_app.tasks.execute_run", ignore_result=True)
def execute_run(run_id: int) -> None:
    run_services.migration_run_execute(run_id=int(run_id), worker=worker_name())


@shared_task(name="migrations_app.tasks.execute_runs", ignore_result=True)
def execute_runs(run_ids: list[int]) -> None:
    """A batch of runs of one connection (``runs.dispatch_many``), claimed and moved together."""
    if not isinstance(run_ids, list) or not all(isinstance(pk, int) and not isinstance(pk, bool) for pk in run_ids):
        log.error("execute_runs wants a list of run ids, got %r; message dropped", run_ids)
        return
    run_services.migration_runs_execute(run_ids=run_ids, worker=worker_name())


@shared_task(name="migrations_app.tasks.dispatch_due", ignore_result=True)
def dispatch_due() -> None:
    run_services.migration_request_start_due()
    run_services.migration_run_redispatch_stale(older_than_s=settings.PORTAL["REDISPATCH_AFTER_S"])
    run_services.dispatch_all_admissible()
    plan_services.move_plan_settle_stale()


@shared_task(name="migrations_app.tasks.reconcile_stale", ignore_result=True)
def reconcile_stale() -> None:
    recovery_services.migration_run_reconcile_stale()


@shared_task(name="migrations_app.tasks.audit_checkpoint", ignore_result=True)
def audit_checkpoint() -> None:
    audit_services.audit_verify_and_record()


@shared_task(name="migrations_app.tasks.expire_stale", ignore_result=True)
def expire_stale() -> None:
    request_services.migration_request_expire_stale()
    plan_services.move_plan_expire_stale()


@shared_task(bind=True, name="migrations_app.tasks.deliver_notification", ignore_result=True)
def deliver_notification(self, delivery_id: int) -> None:
    """Send one notification; retry with exponential backoff (1, 2, 4... s), then record the failure.
    Never raises into anyone's flow: the request's change committed before this was queued."""
    try:
        notifications.deliver(int(delivery_id))
    except notifications.DeliveryFailed as exc:
        max_retries = settings.PORTAL["WEBHOOK_MAX_RETRIES"]
        if self.request.retries >= max_retries:
            notifications.give_up(int(delivery_id))
            return
        raise self.retry(exc=exc, countdown=2**self.request.retries, max_retries=max_retries) from None


@shared_task(name="migrations_app.tasks.resend_notifications", ignore_result=True)
def resend_notifications() -> None:
    notifications.resend_unsent()


@shared_task(name="migrations_app.tasks.sync_inventory", ignore_result=True)
def sync_inventory(connection_id: int) -> None:
    connection = HypervisorConnection.objects.get(pk=connection_id)
    try:
        inventory_services.inventory_sync(connection=connection)
    except drv.DriverError as exc:
        log.warning("inventory sync of %s failed: %s", connection.name, exc.explanation())


@shared_task(name="migrations_app.tasks.sync_all_inventories", ignore_result=True)
def sync_all_inventories() -> None:
    for pk in HypervisorConnection.objects.filter(enabled=True).values_list("pk", flat=True):
        sync_inventory.delay(pk)


@worker_shutdown.connect
@worker_process_shutdown.connect
def _logout(**_kwargs) -> None:
    registry.close_all()
