"""The client's models without a gateway: how streamed events fold into an Execution, display updates included."""

from __future__ import annotations

from typing import Any

from kernelhub.client import Execution, Result
from kernelhub.client.models import ExecutionStream


def feed_all(stream: ExecutionStream, events: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    calls = []
    for event in events:
        calls.extend(stream.feed({"execution_id": "ex1", **event}))
    return calls


def test_events_fold_into_the_execution_and_name_callbacks() -> None:
    seen: list[Any] = []
    stream = ExecutionStream(on_stdout=seen.append, on_result=seen.append)
    calls = feed_all(stream, [
        {"type": "start"}, {"type": "stdout", "text": "a"}, {"type": "stderr", "text": "e"},
        {"type": "stdout", "text": "b"}, {"type": "result", "is_main_result": True, "data": {"text/plain": "42"}},
    ])
    ex = stream.execution
    assert (ex.id, ex.status, ex.stdout, ex.stderr, ex.text) == ("ex1", "running", "ab", "e", "42")
    assert [arg for _, arg in calls] == ["a", "b", ex.results[0]] and not stream.done


def test_update_replaces_the_result_with_its_display_id() -> None:
    results: list[Result] = []
    stream = ExecutionStream(on_result=results.append)  # feed() names the calls; the transport makes them
    calls = feed_all(stream, [
        {"type": "result", "is_main_result": False, "display_id": "d1", "data": {"text/plain": "0%"},
         "metadata": {"k": 1}},
        {"type": "result", "is_main_result": False, "data": {"text/plain": "other"}},
        {"type": "update", "display_id": "d1", "data": {"text/plain": "50%"}},
        {"type": "update", "display_id": "d1", "data": {"text/plain": "100%", "text/html": "<b>done</b>"},
         "metadata": {"k": 2}},
        {"type": "update", "display_id": "elsewhere", "data": {"text/plain": "not ours"}},
        {"type": "update", "display_id": "d1"},  # malformed: no data
    ])
    ex = stream.execution
    assert len(ex.results) == 2, "an update is never appended"
    updated, other = ex.results
    assert updated.display_id == "d1" and updated.data == {"text/plain": "100%", "text/html": "<b>done</b>"}
    assert updated.metadata == {"k": 2} and other.text == "other" and other.display_id is None
    # on_result is named for the two results only, never for an update.
    assert [(callback, r.display_id) for callback, r in calls] == [(results.append, "d1"), (results.append, None)]


def test_update_without_metadata_keeps_the_results_metadata() -> None:
    stream = ExecutionStream()
    feed_all(stream, [{"type": "result", "display_id": "d", "data": {"text/plain": "1"}, "metadata": {"m": 1}},
                      {"type": "update", "display_id": "d", "data": {"text/plain": "2"}}])
    assert stream.execution.results[0].metadata == {"m": 1} and stream.execution.results[0].text == "2"


def test_end_event_and_execution_dicts_carry_display_ids() -> None:
    stream = ExecutionStream()
    final = {"id": "ex1", "status": "ok", "results": [{"is_main_result": False, "display_id": "d9",
                                                        "data": {"text/plain": "x"}}]}
    feed_all(stream, [{"type": "start"}, {"type": "end", "execution": final}])
    assert stream.done and stream.execution.results[0].display_id == "d9"
    assert Execution.from_dict(final).results[0].display_id == "d9"
    assert Result.from_dict({"data": {}, "display_id": 5}).display_id is None
