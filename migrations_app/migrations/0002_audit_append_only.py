"""On PostgreSQL, the audit table refuses UPDATE and DELETE: the log is append-only in the database
itself, whatever the application does. (SQLite, the demo's database, has no such guard; the hash
chain still detects any change there.)"""

from django.db import migrations

CREATE = """
CREATE OR REPLACE FUNCTION migrations_app_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: %% refused', TG_OP;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER migrations_app_audit_append_only
    BEFORE UPDATE OR DELETE ON migrations_app_auditentry
    FOR EACH ROW EXECUTE FUNCTION migrations_app_audit_append_only();
"""
DROP = """
DROP TRIGGER IF EXISTS migrations_app_audit_append_only ON migrations_app_auditentry;
DROP FUNCTION IF EXISTS migrations_app_audit_append_only();
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):
    dependencies = [("migrations_app", "0001_initial")]
    operations = [migrations.RunPython(forwards, backwards)]
