"""Traces (pars_fast.traces): rows, rotation, censoring, and reading them back."""

from __future__ import annotations

import json

import pytest

from pars_fast.traces import TraceConfig, TraceRow, TraceWriter, iter_trace_rows, label_of, trace_files


def row(i, reason="stop", tokens=10, ids=None):
    return TraceRow(f"r{i}", 1.0 + i, 2.0 + i, 5, tokens, reason, 0.5, 0.1, "default", prompt_token_ids=ids)


class WordTokenizer:
    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(f"w{t}" for t in x) for x in ids]


def test_rows_are_written_in_order_without_prompts_by_default(tmp_path):
    writer = TraceWriter(TraceConfig(path=str(tmp_path / "t.jsonl")), WordTokenizer())
    for i in range(5):
        writer.write(row(i, ids=[1, 2]))
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(5)]
    assert "prompt" not in rows[0] and "prompt_token_ids" not in rows[0]
    assert rows[0] == {"request_id": "r0", "arrival_time": 1.0, "finish_time": 2.0, "prompt_tokens": 5, "output_tokens": 10,
                       "finish_reason": "stop", "score": 0.5, "queue_wait_s": 0.1, "ranker": "default"}
    assert writer.stats()["rows"] == 5 and writer.stats()["errors"] == 0


def test_prompts_are_decoded_when_asked(tmp_path):
    writer = TraceWriter(TraceConfig(path=str(tmp_path / "t.jsonl"), prompts=True), WordTokenizer())
    writer.write(row(0, ids=[7, 8]))
    writer.write(row(1, ids=None))
    writer.close()
    rows = list(iter_trace_rows(tmp_path / "t.jsonl"))
    assert rows[0]["prompt"] == "w7 w8" and rows[1]["prompt"] is None


def test_rotation_keeps_backups_and_reads_oldest_first(tmp_path):
    line = len(json.dumps({**row(0).__dict__}).encode())
    config = TraceConfig(path=str(tmp_path / "t.jsonl"), max_bytes=3 * line, backups=2)
    writer = TraceWriter(config)
    for i in range(12):
        writer.write(row(i))
        writer.close() if i == 11 else None
    files = trace_files(tmp_path / "t.jsonl")
    assert [f.name for f in files] == ["t.jsonl.2", "t.jsonl.1", "t.jsonl"]
    ids = [r["request_id"] for r in iter_trace_rows(tmp_path / "t.jsonl")]
    assert ids == sorted(ids, key=lambda s: int(s[1:])) and ids[-1] == "r11"  # oldest first, newest last
    assert len(ids) < 12 and writer.rotations >= 2  # the oldest rotated out


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"request_id": "a", "finish_reason": "stop", "output_tokens": 3}) + "\n{\"request_id\": \"b\", \"fin")
    assert [r["request_id"] for r in iter_trace_rows(path)] == ["a"]


def test_label_of_applies_the_censoring_rules():
    assert label_of({"finish_reason": "stop", "output_tokens": 12}) == (12, True)
    assert label_of({"finish_reason": "length", "output_tokens": 64}) == (64, False)  # at least 64
    for reason in ("abort", "ignored", "error", "repetition", None):
        assert label_of({"finish_reason": reason, "output_tokens": 5}) is None
    assert label_of({"finish_reason": "stop", "output_tokens": -1}) is None


@pytest.mark.parametrize(
    "value,match",
    [({"path": ""}, "path"), ({"path": "x", "prompt": True}, "unknown key"), ({"path": "x", "max_bytes": 0}, "max_bytes"), (3, "expected a file path")],
)
def test_config_errors(value, match):
    with pytest.raises(ValueError, match=match):
        TraceConfig.parse(value, "trace")


def test_config_forms():
    assert TraceConfig.parse(None, "trace") is None and TraceConfig.parse(False, "trace") is None
    assert TraceConfig.parse("t.jsonl", "trace") == TraceConfig(path="t.jsonl")
    assert TraceConfig.parse(TraceConfig("x").to_dict(), "trace") == TraceConfig("x")
