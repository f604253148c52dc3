"""Models, bundles, preprocessing, prediction, rationale optimisation and the GPU task."""
