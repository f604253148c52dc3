"""The audit database: every association, instance, study, job, delivery and event."""
