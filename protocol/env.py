"""Names of the environment variables avgctl reads (the readers are ``worker/dist.py`` and the
server's ``Settings``, prefix ``AVGCTL_``)."""

SERVER = "AVGCTL_SERVER"
"""The server URL a worker's link connects to."""
TOKEN = "AVGCTL_TOKEN"
"""The token a worker or the CLI presents (and, for ``avgctl serve``, the control token)."""
RUN_ID = "TORCHELASTIC_RUN_ID"
"""torchrun's run id: a job's default id."""
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
