"""The HTTP API (FastAPI) over the pipeline: ``create_app`` builds it; ``embedding-pipeline serve-api`` runs it."""
