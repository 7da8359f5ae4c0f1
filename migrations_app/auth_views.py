"""Login and logout pages that record every login, failed login and logout in the audit log."""

from __future__ import annotations

from django.contrib.auth import views as auth_views

from migrations_app import throttle
from migrations_app.choices import AuditAction
from migrations_app.services.audit import audit_session


def _ip(request) -> str | None:
    return request.META.get("REMOTE_ADDR") or None


class LoginView(auth_views.LoginView):
    template_name = "registration/login.html"

    def post(self, request, *args, **kwargs):
        username = request.POST.get("username", "")
        if throttle.locked_out(username, _ip(request)):
            # Refused before the password is even checked, so guessing gains nothing.
            audit_session(action=AuditAction.USER_LOGIN_FAILED, username=username, ip=_ip(request),
                          reason="locked out after too many failed logins")
            form = self.get_form()
            form.add_error(None, "Too many failed logins. Try again later or ask an administrator.")
            return self.render_to_response(self.get_context_data(form=form), status=429)
        return super().post(request, *args, **kwargs)

    def form_valid(self, form):
        response = super().form_valid(form)
        throttle.clear(form.get_user().get_username())
        audit_session(action=AuditAction.USER_LOGIN, user=form.get_user(), ip=_ip(self.request))
        return response

    def form_invalid(self, form):
        username = self.request.POST.get("username", "")
        throttle.record_failure(username, _ip(self.request))
        audit_session(action=AuditAction.USER_LOGIN_FAILED, username=username, ip=_ip(self.request))
        return super().form_invalid(form)


class LogoutView(auth_views.LogoutView):
    def post(self, request, *args, **kwargs):
        user = request.user if request.user.is_authenticated else None
        response = super().post(request, *args, **kwargs)
        if user is not None:
            audit_session(action=AuditAction.USER_LOGOUT, user=user, ip=_ip(request))
        return response
