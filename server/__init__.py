"""The avgctl server: FastAPI app, SQLite store, websocket hub, autopilot and the ``avgctl`` CLI."""
