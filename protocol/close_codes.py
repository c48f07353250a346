"""Websocket close codes the server sends a worker (``WS /ws/worker``); the reason says more.

- 1008 policy violation: malformed JSON, a frame that is not a valid message, no ``hello`` first,
  ``rank >= world_size``, a world size contradicting the running job, an ack from a rank other than 0;
- 1009 too big: a frame over ``max_frame_bytes``;
- 4000 replaced: the same link (its ``hello.link``, with the job's secret) connected again for its
  rank; the newer connection wins, since the older one is the one that is stale (e.g. half-open
  after a network blip);
- 4403 not a process of this job: the hello's ``job_secret`` is not the one the job was bound to at
  its first hello (the worker token is shared by every job's workers; the secret is what only the
  job's own processes hold). The link retries with backoff: a checkpoint may bring the secret later;
- 4409 conflict: any other connection claims a (job, rank) that is connected; the newcomer is
  refused (the reason names no host, pid or world size). The link retries with backoff: a process
  restarted by torchrun may find its predecessor's connection not yet closed;
- 1011 internal error: the server could not store batches this connection sent (its SQLite
  writer process died); the link sends them again on its next connection;
- 1012 service restart: the server is shutting down.

Dashboards (``WS /ws/jobs/{job_id}``): 1008 for an invalid job id, 4404 for an unknown job,
1013 for a client that fell behind.
"""

POLICY = 1008
TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
REPLACED = 4000
NOT_MEMBER = 4403
CONFLICT = 4409
NO_JOB = 4404
TOO_SLOW = 1013

WORKER_FATAL = frozenset({POLICY, TOO_BIG})
"""A link that is closed with one of these stops for good: sending the same again cannot help."""

WORKER_REFUSED = frozenset({NOT_MEMBER, CONFLICT})
"""A link closed with one of these tries again with backoff (up to ~30 s apart), warning why."""
