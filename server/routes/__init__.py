"""One router per resource: health, jobs, commands, metrics, limits, Prometheus, websockets."""
