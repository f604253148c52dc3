"""``gvr web``: the review page. Reads the audit DB and the spool; never writes DICOM."""
