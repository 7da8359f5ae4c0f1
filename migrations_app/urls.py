from django.urls import path, re_path

from migrations_app import batch_views, plan_views, views

urlpatterns = [
    path("", views.home, name="home"),
    path("inventory/", views.inventory, name="inventory"),
    path("vms/migrate/", batch_views.vms_migrate, name="vms_migrate"),
    path("vms/<int:pk>/", views.vm_detail, name="vm_detail"),
    path("vms/<int:pk>/migrate/", views.vm_migrate, name="vm_migrate"),
    path("vms/<int:pk>/migrate/datastores/", views.vm_migrate_datastores, name="vm_migrate_datastores"),
    path("requests/", views.my_requests, name="my_requests"),
    path("requests/approve/", batch_views.requests_approve_selected, name="requests_approve_selected"),
    path("requests/<int:pk>/", views.request_detail, name="request_detail"),
    path("requests/<int:pk>/approve/", views.request_approve, name="request_approve"),
    path("requests/<int:pk>/reject/", views.request_reject, name="request_reject"),
    path("requests/<int:pk>/cancel/", views.request_cancel, name="request_cancel"),
    path("approvals/", views.approvals, name="approvals"),
    path("notifications/", views.notification_settings, name="notification_settings"),
    path("plans/", plan_views.plan_list, name="plans"),
    path("plans/new/", plan_views.plan_build, name="plan_build"),
    path("plans/queue/", plan_views.plan_queue, name="plan_queue"),
    path("plans/<int:pk>/", plan_views.plan_detail, name="plan_detail"),
    path("plans/<int:pk>/items/<int:item_pk>/fallback/", plan_views.plan_fallback, name="plan_fallback"),
    path("plans/<int:pk>/submit/", plan_views.plan_submit, name="plan_submit"),
    path("plans/<int:pk>/approve/", plan_views.plan_approve, name="plan_approve"),
    path("plans/<int:pk>/reject/", plan_views.plan_reject, name="plan_reject"),
    path("plans/<int:pk>/cancel/", plan_views.plan_cancel, name="plan_cancel"),
    path("audit/", views.audit_log, name="audit"),
    path("audit/verify/", views.audit_verify, name="audit_verify"),
    path("audit/<int:pk>/", views.audit_entry, name="audit_entry"),
    re_path(r"^audit/export\.(?P<fmt>csv|json)$", views.audit_export, name="audit_export"),
]
