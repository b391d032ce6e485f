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


def _trace_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(i, prompt, tokens, reason):
    return {"request_id": f"r{i}", "arrival_time": 1.0, "finish_time": 2.0, "prompt_tokens": 7, "output_tokens": tokens,
            "finish_reason": reason, "score": None, "queue_wait_s": 0.1, "ranker": "default", "prompt": prompt}


def test_trace_samples_carry_the_censoring(tmp_path):
    from pars_fast.data import load_dataset, load_jsonl, load_trace_samples, save_jsonl

    path = _trace_rows(tmp_path / "trace.jsonl", [
        _row(0, "short question?", 12, "stop"),
        _row(1, "write an essay", 64, "length"),  # cut at max_tokens: at least 64
        _row(2, "aborted one", 3, "abort"),  # no label
        _row(3, "", 5, "stop"),  # no prompt text
        _row(4, "another", 40, "stop"),
    ])
    samples = load_trace_samples(path)
    assert [(s.prompt, s.response_len, s.censored) for s in samples] == [
        ("short question?", 12, False), ("write an essay", 64, True), ("another", 40, False)]
    # load_jsonl (and so `pars-fast train --data trace.jsonl`) recognizes a trace.
    assert load_jsonl(path) == samples and load_dataset(str(path)) == samples
    # A plain JSONL keeps the flag through a round trip.
    assert load_jsonl(save_jsonl(samples, tmp_path / "plain.jsonl")) == samples


def test_is_trace_reads_the_first_row_only(tmp_path):
    from pars_fast.traces import is_trace

    assert is_trace(_trace_rows(tmp_path / "t.jsonl", [_row(0, "p", 3, "stop")]))
    assert not is_trace(_trace_rows(tmp_path / "plain.jsonl", [{"prompt": "p", "response_len": 3}]))
    (tmp_path / "bad.jsonl").write_text("\n{not json\n")
    assert not is_trace(tmp_path / "bad.jsonl")


def test_traces_imports_nothing_from_pars_fast():
    """traces.py is the bottom of the data stack: pars_fast.data reads traces, never the reverse.
    Checked on the source, lazy imports inside functions included (they once made a cycle)."""
    import ast
    import inspect

    import pars_fast.traces

    tree = ast.parse(inspect.getsource(pars_fast.traces))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert [m for m in imported if m and m.split(".")[0] == "pars_fast"] == []


def test_a_trace_without_prompts_says_how_to_write_one(tmp_path):
    from pars_fast.data import DatasetError, load_jsonl

    rows = [dict(_row(i, "x", 10 + i, "stop")) for i in range(3)]
    for r in rows:
        del r["prompt"]
    path = _trace_rows(tmp_path / "trace.jsonl", rows)
    with pytest.raises(DatasetError, match='"prompts": true'):
        load_jsonl(path)


def test_pars_fast_train_trains_on_a_trace(tmp_path, minilm_dir, monkeypatch):
    """`pars-fast train --data trace.jsonl`: censored rows are used only where their order is known."""
    import numpy as np

    monkeypatch.setenv("PARS_FAST_HOME", str(tmp_path / "home"))
    from pars_fast.cli import main
    from pars_fast.ranker import Ranker

    rng = np.random.default_rng(0)
    kinds = [("answer yes or no: is {} good?", 5, "stop"), ("summarize {} in two sentences", 40, "stop"),
             ("write a long essay about {}", 64, "length")]  # essays are all cut at max_tokens=64
    topics = ["tea", "chess", "rivers", "jazz", "rome", "bees", "clouds", "maps", "salt", "ink"]
    rows = [_row(i, t.format(topics[i % 10]) + f" ({i})", int(n + rng.integers(0, 4)) if r == "stop" else n, r)
            for i, (t, n, r) in enumerate(kinds[i % 3] for i in range(60))]
    path = _trace_rows(tmp_path / "trace.jsonl", rows)
    out = tmp_path / "ranker"
    assert main(["train", "--data", str(path), "--mode", "head", "--epochs", "40", "--no-progress", "--out", str(out)]) == 0
    ranker = Ranker.load(out, backend="torch", device="cpu")
    scores = ranker.score(["answer yes or no: is wine good?", "write a long essay about wine"])
    assert scores[1] > scores[0]  # learned from the trace, censored essays included
