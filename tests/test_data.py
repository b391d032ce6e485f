"""Data loaders: ShareGPT streaming (truncated file), JSONL, HumanEval, splits, checks."""

import json

import pytest

from pars_fast.data import (
    DatasetError,
    Sample,
    check_rankable,
    iter_sharegpt_pairs,
    load_dataset,
    load_humaneval,
    load_jsonl,
    load_sharegpt,
    save_jsonl,
    sharegpt_path,
    sharegpt_split,
    train_test_split,
)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("PARS_FAST_HOME", str(tmp_path / "home"))


def _conv(*turns):
    return {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_streams_truncated_file_up_to_premature_eof(tmp_path):
    convs = [
        _conv(("human", "hi"), ("gpt", "hello there"), ("human", "again"), ("gpt", "sure")),
        _conv(("gpt", "starts with gpt"), ("human", "q"), ("gpt", "a")),
        _conv(("human", "   "), ("gpt", "empty prompt is skipped")),
        _conv(("human", "last complete"), ("gpt", "yes")),
        _conv(("human", "cut off"), ("gpt", "this one is truncated")),
    ]
    text = json.dumps(convs)
    cut = text.index("this one is truncated") + 5  # mid-string, like the shipped file
    path = tmp_path / "sharegpt.json"
    path.write_text(text[:cut])
    assert list(iter_sharegpt_pairs(path=path)) == [("hi", "hello there"), ("last complete", "yes")]
    assert list(iter_sharegpt_pairs(all_turns=True, path=path)) == [
        ("hi", "hello there"),
        ("again", "sure"),
        ("q", "a"),
        ("last complete", "yes"),
    ]
    # Later turns: every pair after position 0, so never a first-turn pair.
    assert list(iter_sharegpt_pairs(turns="later", path=path)) == [("again", "sure"), ("q", "a")]
    with pytest.raises(ValueError, match="turns"):
        list(iter_sharegpt_pairs(turns="middle", path=path))


def test_sharegpt_later_is_a_seeded_cached_sample_without_empty_responses(monkeypatch):
    import pars_fast.data as data

    pairs = [(f"later prompt {i}", "" if i % 7 == 0 else "word " * (i % 13 + 1)) for i in range(300)]
    calls = []

    def fake_pairs(turns=None, **_):
        calls.append(turns)
        return iter(pairs)

    monkeypatch.setattr(data, "iter_sharegpt_pairs", fake_pairs)
    got = data.sharegpt_later(n=50)
    assert calls == ["later"] and len(got) == 50
    assert all(s.response_len > 0 and s.response_chars is not None for s in got)
    order = [int(s.prompt.split()[-1]) for s in got]
    assert order == sorted(order)  # file order
    assert data.sharegpt_later(n=50) == got and calls == ["later"]  # from the cache
    assert data.sharegpt_later(n=50, seed=8) != got


def test_malformed_sharegpt_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"conversations": [}]')
    with pytest.raises(DatasetError, match="malformed"):
        list(iter_sharegpt_pairs(path=path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        list(iter_sharegpt_pairs(path=tmp_path / "nope.json"))


def test_shipped_sharegpt_file_counts():
    # The package ships a truncated file: 11,135 human->gpt first turns, 7 of them empty.
    assert sharegpt_path().exists()
    assert sum(1 for _ in iter_sharegpt_pairs()) == 11128


def test_load_sharegpt_limit_and_lengths(minilm_dir):
    samples = load_sharegpt(limit=5)
    assert len(samples) == 5
    assert all(isinstance(s, Sample) and s.response_len > 0 for s in samples)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    first = next(iter_sharegpt_pairs())
    assert samples[0].prompt == first[0]
    assert samples[0].response_len == len(tok(first[1], add_special_tokens=False)["input_ids"])


def test_sharegpt_split_is_deterministic_and_cached():
    from pars_fast.paths import home

    train, test = sharegpt_split()
    assert (len(train), len(test)) == (9977, 1108)  # 11,128 pairs minus 43 zero-token answers
    assert list(home().joinpath("data").glob("sharegpt-first-*.jsonl"))
    train2, test2 = sharegpt_split()  # from the cache
    assert train2 == train and test2 == test
    assert all(s.response_len > 0 and s.prompt.strip() for s in train + test)


def test_sharegpt_test_split_is_the_same_prompts_under_another_tokenizer():
    """Llama 3 counts a response MiniLM gives no token (43 more pairs): a permutation of
    that longer list put 970 of its 1,113 "test" prompts in the rankers' training split,
    so the simulator scored a ranker on what it was trained on (Kendall tau 0.67 instead
    of 0.41). The split now follows the prompts, whatever the tokenizer."""
    from pars_fast.sim.workload import served_tokenizer

    train, test = sharegpt_split()
    train3, test3 = sharegpt_split(tokenizer=served_tokenizer("meta-llama/Meta-Llama-3.1-8B"))
    assert len(train3) + len(test3) > len(train) + len(test)  # the lists differ: the case that leaked
    train_prompts, test_prompts = {s.prompt for s in train}, {s.prompt for s in test}
    assert not {s.prompt for s in test3} & train_prompts
    assert {s.prompt for s in test3} <= test_prompts
    # Every reference test pair but those whose prompt text is also a training prompt (123: "hi", ...).
    assert len(test3) == sum(s.prompt not in train_prompts for s in test) > 0.85 * len(test)
    assert not {s.prompt for s in train3} & {s.prompt for s in test3}


def test_sharegpt_val_is_the_slice_training_holds_out():
    """`sharegpt-val`, where scheduler settings are chosen: the validation slice `pars-fast
    train` holds out of its fits, none of it test, and the same prompts under Llama 3."""
    from pars_fast.sim.workload import served_tokenizer
    from pars_fast.training.config import split_validation

    train, test = sharegpt_split()
    fit, held = split_validation(train)
    val = load_dataset("sharegpt-val")
    val_prompts, fit_prompts = {s.prompt for s in val}, {s.prompt for s in fit}
    assert val == [s for s in held if s.prompt not in fit_prompts] and len(val) > 0.9 * len(held)
    assert not val_prompts & fit_prompts
    assert len(val_prompts & {s.prompt for s in test}) < 0.02 * len(val)  # openers the test split shares
    val3 = load_dataset("sharegpt-val", tokenizer=served_tokenizer("meta-llama/Meta-Llama-3.1-8B"))
    assert {s.prompt for s in val3} == val_prompts


def test_jsonl_both_formats(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "response_len": 12})
        + "\n\n"
        + json.dumps({"prompt": "b", "response": "one two three"})
        + "\n"
    )
    samples = load_jsonl(path)
    assert samples[0] == Sample("a", 12)
    assert samples[1].prompt == "b" and samples[1].response_len == 3
    assert load_dataset(str(path)) == samples


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"response_len": 3}', "'prompt' must be a string"),
        ('{"prompt": "x"}', "needs 'response_len'"),
        ('{"prompt": "x", "response_len": -1}', "non-negative integer"),
        ('{"prompt": "x", "response_len": true}', "non-negative integer"),
        ('{"prompt": "x", "response_len": 2.5}', "non-negative integer"),
        ('{"prompt": "x", "response": 5}', "'response' must be a string"),
    ],
)
def test_jsonl_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "response_len": 1}) + "\n" + line + "\n")
    with pytest.raises(DatasetError, match=message) as info:
        load_jsonl(path)
    assert f"{path}:2" in str(info.value)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_save_jsonl_round_trip_with_odd_unicode(tmp_path):
    samples = [Sample("emoji 🚀 and \u202eRTL", 5), Sample("", 0), Sample("line\nbreak", 7)]
    path = save_jsonl(samples, tmp_path / "x.jsonl")
    assert load_jsonl(path) == samples


def test_humaneval():
    samples = load_humaneval()
    assert len(samples) == 164
    assert all(s.prompt.strip() and s.response_len > 0 for s in samples)
    assert load_dataset("humaneval") == samples


def test_train_test_split_deterministic_disjoint_complete():
    samples = [Sample(f"p{i}", i) for i in range(1000)]
    train, test = train_test_split(samples)
    assert (len(train), len(test)) == (900, 100)
    assert sorted(train + test, key=lambda s: s.response_len) == samples
    assert train_test_split(samples) == (train, test)
    assert train_test_split(samples, seed=7)[1] != test
    with pytest.raises(ValueError, match="test_frac"):
        train_test_split(samples, test_frac=1.0)
    with pytest.raises(DatasetError, match="at least 2"):
        train_test_split(samples[:1])


def test_check_rankable_errors():
    with pytest.raises(DatasetError, match="empty"):
        check_rankable([])
    with pytest.raises(DatasetError, match="one distinct response length"):
        check_rankable([Sample("a", 5), Sample("b", 5)])
    with pytest.raises(DatasetError, match="no valid pair for delta=0.2"):
        check_rankable([Sample("a", 100), Sample("b", 95), Sample("c", 90)])
    check_rankable([Sample("a", 100), Sample("b", 80)])  # exactly delta: usable


def test_unknown_dataset_spec():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="unknown ShareGPT split"):
        load_dataset("sharegpt-dev")
