from django.urls import path

from migrations_app.api import plans, views

urlpatterns = [
    path("requests/", views.requests_collection, name="api_requests"),
    path("requests/bulk/", views.requests_bulk, name="api_requests_bulk"),
    path("requests/approve/", views.requests_bulk_approve, name="api_requests_bulk_approve"),
    path("requests/<int:pk>/", views.request_item, name="api_request"),
    path("requests/<int:pk>/approve/", views.request_approve, name="api_request_approve"),
    path("requests/<int:pk>/reject/", views.request_reject, name="api_request_reject"),
    path("requests/<int:pk>/cancel/", views.request_cancel, name="api_request_cancel"),
    path("runs/<int:pk>/events/", views.run_events, name="api_run_events"),
    path("plans/", plans.plans_collection, name="api_plans"),
    path("plans/<int:pk>/", plans.plan_detail, name="api_plan"),
    path("plans/<int:pk>/items/<int:item_pk>/fallback/", plans.plan_item_fallback, name="api_plan_fallback"),
    path("plans/<int:pk>/submit/", plans.plan_submit, name="api_plan_submit"),
    path("plans/<int:pk>/approve/", plans.plan_approve, name="api_plan_approve"),
    path("plans/<int:pk>/reject/", plans.plan_reject, name="api_plan_reject"),
    path("plans/<int:pk>/cancel/", plans.plan_cancel, name="api_plan_cancel"),
]
