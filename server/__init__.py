"""loopserve HTTP server: FastAPI app, OpenAI-compatible routes, metrics, CLI."""
