"""DICOM networking and the service: storage SCP, spool, audit DB, assembly, delivery.

This package never imports torch: the SCP must start in well under a second.
"""
