from django.urls import path

from migrations_app.api import views

urlpatterns = [
    path("requests/", views.requests_collection, name="api_requests"),
    path("requests/bulk/", views.requests_bulk, name="api_requests_bulk"),
    path("requests/approve/", views.requests_bulk_approve, name="api_requests_bulk_approve"),
    path("requests/<int:pk>/", views.request_item, name="api_request"),
    path("requests/<int:pk>/approve/", views.request_approve, name="api_request_approve"),
    path("requests/<int:pk>/reject/", views.request_reject, name="api_request_reject"),
    path("requests/<int:pk>/cancel/", views.request_cancel, name="api_request_cancel"),
    path("runs/<int:pk>/events/", views.run_events, name="api_run_events"),
]
