from django.contrib import admin
from django.urls import include, path

from migrations_app import auth_views

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/", include("migrations_app.api.urls")),
    path("", include("migrations_app.urls")),
]
