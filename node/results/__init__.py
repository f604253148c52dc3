"""Result objects the node sends back to the PACS: Secondary Captures and a TID 1500 SR.

``build.build_results`` turns an inference job's artefacts (``node.artefacts``)
into DICOM datasets; ``build.write_outbox`` puts them in the spool outbox for
``node.delivery``. Pure numpy, Pillow, pydicom and highdicom: never torch.
"""
