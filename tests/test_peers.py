"""Peer lost or own failure: the errors TensorFlow raises when a peer is gone, and look-alikes, classified.

Both peer messages are copied from survivors' logs on loopback (the reset one as far as the log
line kept it); tests/test_faults.py provokes them end to end. The look-alikes are what a worker's
own faults and the storage clients raise.
"""

from __future__ import annotations

import pytest
import tensorflow as tf

from pneumonia.training.peers import is_peer_lost, named_tasks

# Worker 1 SIGKILLed (or SIGSTOPped) while worker 0 was busy: the coordination service missed its heartbeats.
HEARTBEATS = ("{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_device_/job:worker/replica:0/task:0/"
              "device:CPU:0}} Collective ops is aborted by: Error reported from /job:worker/task:1: The following "
              "tasks are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have "
              "crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) "
              "to debug further.\nThe error could be from a previous operation. Restart your program to reset. "
              "[Op:CollectiveReduceV2] name: ")
# Worker 0 (the chief) SIGKILLed while worker 1 waited in the ring all-reduce: reset within 2.4 s.
RESET = ("{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_device_/job:worker/replica:0/task:1/"
         "device:CPU:0}} Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error "
         "information from remote target /job:worker/replica:0/task:0 while calling /tensorflow.WorkerService/")
SURVIVORS = [(HEARTBEATS, 0), (RESET, 1)]


def unavailable(message: str) -> tf.errors.OpError:
    return tf.errors.UnavailableError(None, None, message)


def test_the_task_named_is_the_culprit_not_the_device_the_op_ran_on() -> None:
    assert named_tasks(HEARTBEATS) == {("worker", 1)}
    assert named_tasks("/job:worker/replica:0/task:12/device:CPU:0 and /job:chief/task:0: x") == {("chief", 0)}


@pytest.mark.parametrize(("message", "survivor"), SURVIVORS, ids=["heartbeats", "connection-reset"])
def test_a_peer_gone_is_peer_lost_for_the_survivor(message: str, survivor: int) -> None:
    assert is_peer_lost(unavailable(message), "worker", survivor)
    assert is_peer_lost(tf.errors.AbortedError(None, None, message), "worker", survivor)


@pytest.mark.parametrize(("message", "survivor"), SURVIVORS, ids=["heartbeats", "connection-reset"])
def test_an_error_that_names_this_worker_is_its_own(message: str, survivor: int) -> None:
    # The other worker reading the same report: the cluster names it as the one that failed.
    assert not is_peer_lost(unavailable(message), "worker", 1 - survivor)


def test_a_reset_in_a_collective_that_names_no_task_is_still_a_peer() -> None:
    message = "Collective ops is aborted by: Connection reset by peer [Op:CollectiveReduceV2]"
    assert is_peer_lost(unavailable(message), "worker", 0)


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
