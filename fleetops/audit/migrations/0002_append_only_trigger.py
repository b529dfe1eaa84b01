"""Make audit_auditevent append-only in the database itself.

UPDATE is always rejected. DELETE is rejected unless the transaction set `fleetops.audit_prune`
(only the retention job does) AND the row is older than 30 days. TRUNCATE is left to the table
owner (test teardown); the application's role should not own the table in production.
"""

from django.db import migrations

FORWARD = """
CREATE OR REPLACE FUNCTION fleetops_audit_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND coalesce(current_setting('fleetops.audit_prune', true), '') = 'on'
       AND OLD.at < now() - interval '30 days' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_auditevent is append-only (% rejected)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER audit_auditevent_append_only
    BEFORE UPDATE OR DELETE ON audit_auditevent
    FOR EACH ROW EXECUTE FUNCTION fleetops_audit_append_only();
"""

REVERSE = """
DROP TRIGGER IF EXISTS audit_auditevent_append_only ON audit_auditevent;
DROP FUNCTION IF EXISTS fleetops_audit_append_only();
"""


class Migration(migrations.Migration):
    dependencies = [("audit", "0001_initial")]

    operations = [migrations.RunSQL(FORWARD, REVERSE)]
