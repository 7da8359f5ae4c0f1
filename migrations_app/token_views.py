"""The "API tokens" page: each user makes personal API tokens for their scripts, sees them, and
revokes them (admins see and revoke everyone's in the Django admin).

A new token's secret is in the answer to the POST that made it, and nowhere else: that page is
rendered, not redirected to (the secret is never put in the session or a message), and is not
cached.
"""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from migrations_app import access
from migrations_app.forms import ApiTokenForm
from migrations_app.models import ApiToken
from migrations_app.services.api_tokens import api_token_create, api_token_revoke
from migrations_app.services.errors import ActionRefused
from migrations_app.views import _deny, client_ip


def _page(request, form, *, created=None, secret="", status=200):
    now = timezone.now()
    tokens = ApiToken.objects.filter(user=request.user).select_related("revoked_by")
    return render(request, "migrations_app/api_tokens.html", {
        "form": form, "created": created, "secret": secret,
        "tokens": [(t, t.state(now)) for t in tokens],
    }, status=status)


@login_required
@never_cache
@require_http_methods(["GET", "POST"])
def token_list(request):
    """The user's tokens, newest first, and the form that makes one (POST)."""
    if request.method == "GET":
        return _page(request, ApiTokenForm())
    form = ApiTokenForm(request.POST)
    if not form.is_valid():
        return _page(request, form, status=400)
    try:
        token, secret = api_token_create(user=request.user, name=form.cleaned_data["name"],
                                         days=form.cleaned_data["days"], ip=client_ip(request))
    except ActionRefused as exc:
        form.add_error(exc.field if exc.field in form.fields else None, exc.message)
        return _page(request, form, status=403 if exc.denied else 400)
    return _page(request, ApiTokenForm(), created=token, secret=secret)


@login_required
@require_POST
def token_revoke(request, pk: int):
    token = get_object_or_404(ApiToken, pk=pk)
    verdict = access.can_view_api_token(request.user, token)
    if not verdict:
        _deny(request, verdict)
    try:
        api_token_revoke(token=token, actor=request.user, ip=client_ip(request))
    except ActionRefused as exc:
        messages.error(request, f"Token {token.name!r}: {exc.message}.")
    else:
        messages.success(request, f"Token {token.name!r} revoked: it no longer works.")
    return redirect("api_tokens")
