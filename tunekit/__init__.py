"""tunekit: the library the pipeline stages are written in (formats, templates, training, metrics, tracking)."""
