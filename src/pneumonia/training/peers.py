"""Telling a lost peer from this worker's own failure, by the error TensorFlow raises.

When another worker dies or stops answering, this worker's next collective fails: its connection
is reset (about 1 s after a SIGKILL), or the coordination service declares the peer unhealthy
after missed heartbeats (about 9 s after its node stops). Those errors are "unavailable"-kind
errors that come from the cluster and name the task that failed. A worker's own faults do not
look like that: a bad record or a bug raises another kind, out of memory kills the process, a
storage error names no task, and an error that names this very task is this task's own.
"""

from __future__ import annotations

import re

import tensorflow as tf

# What a collective or the coordination service raises when a peer is gone.
_PEER_ERROR_TYPES = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError,
                     tf.errors.CancelledError)
# A task named in a message: "/job:worker/task:1", "/job:worker/replica:0/task:1"; a device path
# ("/job:worker/replica:0/task:0/device:CPU:0") is where an op ran, this worker's own, not a culprit.
_TASK = re.compile(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)(?![\d/])")
# Signs that the failure came through the cluster (collectives, coordination service, peer RPC),
# not from a file system or a remote service that also speaks of resets and refusals.
_THROUGH_THE_CLUSTER = re.compile(r"collective ops is aborted|collective\w*(?:reduce|gather|bcast)|"
                                  r"stopped sending heartbeats|coordination service|tasks are unhealthy", re.I)
_TRANSPORT = re.compile(r"connection reset by peer|socket closed|connection refused|failed to connect|"
                        r"broken pipe|end of file|unhealthy|heartbeat", re.I)


def named_tasks(message: str) -> set[tuple[str, int]]:
    """The (job, index) of every cluster task a message names as a party, not as a device."""
    return {(job, int(index)) for job, index in _TASK.findall(message)}


def is_peer_lost(error: BaseException, task_type: str, task_index: int) -> bool:
    """Whether `error` says another worker is gone, rather than that this one (task_type, task_index) failed."""
    if not isinstance(error, _PEER_ERROR_TYPES):
        return False
    message = str(getattr(error, "message", "") or error)
    if not _THROUGH_THE_CLUSTER.search(message):
        return False
    named = named_tasks(message)
    if (task_type, task_index) in named:
        return False  # the cluster reports this worker itself: its own failure counts
    # A peer named as the culprit, or a collective that lost its connection to a peer.
    return bool(named) or bool(_TRANSPORT.search(message))
