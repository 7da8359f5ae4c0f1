from django.urls import path, re_path

from migrations_app import views

urlpatterns = [
    path("", views.home, name="home"),
    path("inventory/", views.inventory, name="inventory"),
    path("vms/<int:pk>/", views.vm_detail, name="vm_detail"),
    path("vms/<int:pk>/migrate/", views.vm_migrate, name="vm_migrate"),
    path("vms/<int:pk>/migrate/datastores/", views.vm_migrate_datastores, name="vm_migrate_datastores"),
    path("requests/", views.my_requests, name="my_requests"),
    path("requests/<int:pk>/", views.request_detail, name="request_detail"),
    path("requests/<int:pk>/approve/", views.request_approve, name="request_approve"),
    path("requests/<int:pk>/reject/", views.request_reject, name="request_reject"),
    path("requests/<int:pk>/cancel/", views.request_cancel, name="request_cancel"),
    path("approvals/", views.approvals, name="approvals"),
    path("notifications/", views.notification_settings, name="notification_settings"),
    path("audit/", views.audit_log, name="audit"),
    path("audit/verify/", views.audit_verify, name="audit_verify"),
    path("audit/<int:pk>/", views.audit_entry, name="audit_entry"),
    re_path(r"^audit/export\.(?P<fmt>csv|json)$", views.audit_export, name="audit_export"),
]
