"""Approval policies: ordered rules over a request's facts that approve, reject or require stages.

``rules`` holds the pure data types and evaluation, ``document`` the YAML/JSON form and its
validation, ``facts`` reads the facts from a request, ``defaults`` is the policy shipped with the
product. The database side (models, import, the active policy) lives in ``models.policy`` and
``services.policies``.
"""
