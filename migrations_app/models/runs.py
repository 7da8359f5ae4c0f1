"""The execution of an approved request: one run per request, and its numbered progress events."""

from __future__ import annotations

from django.db import models

from migrations_app.choices import Phase


class MigrationRun(models.Model):
    """The execution record of a request (the request is not the run).

    Written by the worker through ``services.runs``; ``heartbeat_at`` proves a worker still owns it,
    ``task_id`` is the hypervisor's own task, ``worker_task_id`` the queue's message id (replaced
    each time the run is put back in line, so it names one claim). ``handed_at`` is committed
    before the driver is asked to move anything: while it is empty, the hypervisor was never
    asked, and a run whose worker was lost is put back in line (``requeues`` counts how often).
    ``last_seq`` is the number of the newest ``RunEvent``.
    """

    request = models.OneToOneField("migrations_app.MigrationRequest", on_delete=models.CASCADE, related_name="run")
    phase = models.CharField(max_length=20, choices=Phase.choices, default=Phase.WAITING)
    percent = models.FloatField(default=0.0)
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    rate_bytes_per_s = models.FloatField(default=0.0)
    eta_s = models.FloatField(null=True, blank=True)
    iteration = models.PositiveIntegerField(null=True, blank=True)
    task_id = models.CharField(max_length=200, blank=True, help_text="The hypervisor's task id.")
    worker_task_id = models.CharField(max_length=200, blank=True, help_text="The queue message id.")
    worker = models.CharField(max_length=200, blank=True, help_text="Which worker process claimed it.")
    timeout_s = models.FloatField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    queued_at = models.DateTimeField(auto_now_add=True)
    dispatched_at = models.DateTimeField(null=True, blank=True, help_text="Last time it was handed to the queue.")
    wait_reason = models.CharField(max_length=300, blank=True, help_text="Why admission control holds it back.")
    started_at = models.DateTimeField(null=True, blank=True)
    handed_at = models.DateTimeField(null=True, blank=True,
                                     help_text="When it was handed to the hypervisor; empty: the driver was never asked.")
    requeues = models.PositiveSmallIntegerField(
        default=0, help_text="Times it was put back in line because its worker was lost before the move started.")
    finished_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    downtime_ms = models.FloatField(null=True, blank=True)
    explanation = models.TextField(blank=True, help_text="What happened, in words a VM owner understands.")
    traceback = models.TextField(blank=True, help_text="Only when the portal's own code broke.")
    last_seq = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-queued_at"]

    def __str__(self) -> str:
        return f"run of request #{self.request_id}"


class RunEvent(models.Model):
    """One numbered progress event of a run. Pages that reconnect ask for events after their last seq."""

    run = models.ForeignKey(MigrationRun, on_delete=models.CASCADE, related_name="events")
    seq = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    status = models.CharField(max_length=20)
    phase = models.CharField(max_length=20, choices=Phase.choices)
    percent = models.FloatField(default=0.0)
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    rate_bytes_per_s = models.FloatField(default=0.0)
    eta_s = models.FloatField(null=True, blank=True)
    iteration = models.PositiveIntegerField(null=True, blank=True)
    message = models.CharField(max_length=500, blank=True)

    class Meta:
        ordering = ["run", "seq"]
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="unique_event_seq_per_run")]

    def __str__(self) -> str:
        return f"{self.run_id}#{self.seq} {self.phase} {self.percent:.0f}%"
