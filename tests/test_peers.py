"""Peer lost or own failure: the errors TensorFlow raises when a peer is gone, and look-alikes, classified.

The heartbeat message is copied from a survivor's log (worker 1 SIGKILLed, then SIGSTOPped, on
loopback); the reset one keeps only what issue 10 reported (`Connection reset by peer` in
`CollectiveReduceV2`, no task named). tests/test_faults.py provokes the real ones end to end.
The look-alikes are what a worker's own faults and the storage clients raise.
"""

from __future__ import annotations

import pytest
import tensorflow as tf

from pneumonia.training.peers import is_peer_lost, named_tasks

# Worker 1 SIGKILLed or stopped: worker 0's all-reduce, after the coordination service missed its heartbeats.
HEARTBEATS = ("{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_device_/job:worker/replica:0/task:0/"
              "device:CPU:0}} Collective ops is aborted by: Error reported from /job:worker/task:1: The following "
              "tasks are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have "
              "crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) "
              "to debug further.\nThe error could be from a previous operation. Restart your program to reset. "
              "[Op:CollectiveReduceV2] name: ")
# Worker 1 SIGKILLed while worker 0 waited in the ring all-reduce: the TCP connection is reset at once.
RESET = ("{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_device_/job:worker/replica:0/task:0/"
         "device:CPU:0}} Collective ops is aborted by: Connection reset by peer [Op:CollectiveReduceV2]")


def unavailable(message: str) -> tf.errors.OpError:
    return tf.errors.UnavailableError(None, None, message)


def test_the_task_named_is_the_culprit_not_the_device_the_op_ran_on() -> None:
    assert named_tasks(HEARTBEATS) == {("worker", 1)}
    assert named_tasks("/job:worker/replica:0/task:12/device:CPU:0 and /job:chief/task:0: x") == {("chief", 0)}


@pytest.mark.parametrize("message", [HEARTBEATS, RESET], ids=["heartbeats", "connection-reset"])
def test_a_peer_gone_is_peer_lost_for_the_survivor(message: str) -> None:
    assert is_peer_lost(unavailable(message), "worker", 0)
    assert is_peer_lost(tf.errors.AbortedError(None, None, message), "worker", 0)


def test_an_error_that_names_this_worker_is_its_own() -> None:
    # Worker 1 reading the same report: the cluster says worker 1 is the one that stopped.
    assert not is_peer_lost(unavailable(HEARTBEATS), "worker", 1)


@pytest.mark.parametrize("error", [
    # A storage fault during a backup write: also "unavailable", also a reset, but not through the cluster.
    tf.errors.UnavailableError(None, None, "Error executing an HTTP request: libcurl code 56 meaning 'Failure when "
                                           "receiving data from the peer', error details: Recv failure: Connection "
                                           "reset by peer when uploading gs://bucket/runs/r/backup/chief/x"),
    # This worker's own input or numerics: another kind of error, whatever it mentions.
    tf.errors.InvalidArgumentError(None, None, "Collective ops is aborted by: Input to reshape is a tensor with 12 "
                                               "values, but the requested shape has 16"),
    tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[64,224,224,3]"),
    # Python-side bugs are never peer faults.
    RuntimeError("Connection reset by peer in /job:worker/task:1"),
])
def test_own_faults_and_look_alikes_are_not_peer_lost(error: BaseException) -> None:
    assert not is_peer_lost(error, "worker", 0)
