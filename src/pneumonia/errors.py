"""Errors that decide a stage's exit code: 2 means bad input or config (retrying will not help)."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


class BadInputError(Exception):
    """The input (archive, manifest, shards) cannot be used; the message says which and what to do."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BadInputError):
    """A configuration key or value is wrong; the message names the key."""


class UpstreamMissingError(BadInputError):
    """A stage's input marker (_SUCCESS.json) is missing after the allowed wait."""


class StorageError(Exception):
    """Storage kept failing, or holds other bytes than were written: retryable (exit 1), never bad input.

    GCS answers 503/429 and resets connections every so often; an object that is missing or differs
    from its manifest's checksum was damaged on the way, not made wrong by the user.
    """

    exit_code = EXIT_FAILURE

# SIGTERM (preemption, node drain) after the backup is saved: the Jobs' podFailurePolicy ignores
# this code, so the pod is replaced without spending backoffLimit and training resumes from backup.
EXIT_PREEMPTED = 143

# A training worker stopped because a PEER is gone (crashed, preempted, its node lost): its
# collectives failed through no fault of its own. The train Job's podFailurePolicy ignores this
# code, so only the pod that failed spends a retry; activeDeadlineSeconds still bounds the Job.
# 75 is EX_TEMPFAIL in sysexits.h: "temporary failure, try again".
EXIT_PEER_LOST = 75


class PeerLostError(Exception):
    """Another worker of the cluster died or stopped answering; this worker is fine and can rejoin."""

    exit_code = EXIT_PEER_LOST


class PeersUnreachableError(Exception):
    """Peers lost again after the index's forgiven restarts ran out (cluster.max_forgiven_restarts): counted
    (exit 1), so a partition that never heals fails the train Job instead of looping until its deadline."""

    exit_code = EXIT_FAILURE


class Terminated(Exception):
    """SIGTERM arrived (preemption, node drain, pod deletion) outside a handler of the stage's own."""
