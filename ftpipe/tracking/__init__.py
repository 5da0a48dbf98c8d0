"""The MLflow record: stage and pipeline runs, system metrics, pending uploads, the UI command."""
