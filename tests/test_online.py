"""The online learner (pars_fast.online): prequential judging, the blend, censoring, memory."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pars_fast.online import OnlineConfig, OnlineLearner, _similarities, known_pair_accuracies, known_pair_accuracy


def brute_force_accuracy(pred, length, exact, delta):
    """Pair by pair: i is known longer than j when j is exact and i is delta longer."""
    right = total = 0.0
    for i, j in itertools.permutations(range(len(pred)), 2):
        if exact[j] and length[i] > length[j] and (length[i] - length[j]) >= delta * length[i]:
            total += 1
            right += 1.0 if pred[i] > pred[j] else 0.5 if pred[i] == pred[j] else 0.0
    return (right / total if total else math.nan), int(total)


@pytest.mark.parametrize("seed", range(5))
def test_known_pair_accuracy_matches_pair_by_pair_count(seed):
    rng = np.random.default_rng(seed)
    n = 40
    length = rng.integers(1, 200, n).astype(float)
    pred = np.round(rng.normal(size=n), 1)  # rounded: ties happen
    exact = rng.random(n) > 0.3
    got = known_pair_accuracy(pred, length, exact, 0.2)
    want = brute_force_accuracy(pred, length, exact, 0.2)
    assert got[1] == want[1] and got[0] == pytest.approx(want[0])


def test_known_pair_accuracy_of_a_perfect_and_a_reversed_order():
    length = np.array([10.0, 20, 40, 80])
    exact = np.ones(4, dtype=bool)
    assert known_pair_accuracy(length, length, exact, 0.2) == (1.0, 6)
    assert known_pair_accuracy(-length, length, exact, 0.2) == (0.0, 6)
    # A censored ("at least") label is never the known-shorter one of a pair.
    all_censored = np.zeros(4, dtype=bool)
    assert math.isnan(known_pair_accuracy(length, length, all_censored, 0.2)[0])


@pytest.mark.parametrize("m", [1, 2, 7, 63, 64, 65, 127, 129, 256])
@pytest.mark.parametrize("delta", [0.0, 0.2])
@pytest.mark.parametrize("ties", [True, False])
def test_known_pair_accuracies_equal_the_pair_matrix_bit_for_bit(m, delta, ties):
    rng = np.random.default_rng(m)
    length = rng.integers(0, 60, m).astype(float)  # few values (0 too): ties in length
    exact = rng.random(m) > 0.3
    preds = rng.normal(size=(14, m))
    if ties:
        preds = np.round(preds, 1)
        preds[0] = preds[1]  # and two identical predictors
    got, n = known_pair_accuracies(preds, length, exact, delta)
    for row, acc in zip(preds, got):
        want, want_n = known_pair_accuracy(row, length, exact, delta)
        assert want_n == n
        assert (math.isnan(want) and math.isnan(acc)) or acc == want  # ==: counts are exact in float64


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_known_pair_accuracies_of_non_finite_predictions_match_the_reference():
    length = np.array([10.0, 20, 40, 80, 160])
    exact = np.ones(5, dtype=bool)
    preds = np.array([[1.0, np.nan, 3, 4, 5], [np.inf, np.inf, -np.inf, 0, 1]])
    got, _ = known_pair_accuracies(preds, length, exact, 0.2)
    assert got.tolist() == [known_pair_accuracy(row, length, exact, 0.2)[0] for row in preds]


def _stream(n, seed, base_quality):
    """Requests whose log length is 0.8 * log(prompt tokens) + noise; the base ranker sees
    the true log length with weight ``base_quality`` (0: pure noise)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(5, 2000, n)
    y = 0.8 * np.log1p(prompt) + rng.normal(0, 0.4, n)
    lengths = np.maximum(1, np.expm1(y)).astype(int)
    base = base_quality * y + (1 - base_quality) * rng.normal(0, 1, n)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    return prompt, lengths, base, emb


def _run(learner, prompt, lengths, base, emb, capped=None):
    finals, onlines = [], []
    for i in range(len(prompt)):
        f, o = learner.score(base[i : i + 1], emb[i : i + 1], prompt[i : i + 1])
        finals.append(f[0])
        onlines.append(o[0])
        learner.observe(base[i], o[0], f[0], emb[i], int(prompt[i]), int(lengths[i]), bool(capped[i]) if capped is not None else False)
    return np.array(finals), np.array(onlines)


def test_no_weight_until_judged_enough_and_then_exactly_the_base_scores():
    learner = OnlineLearner(OnlineConfig(min_observations=50), dim=8)
    prompt, lengths, base, emb = _stream(49, 0, base_quality=0.0)
    finals, _ = _run(learner, prompt, lengths, base, emb)
    assert learner.weight == 0.0
    np.testing.assert_array_equal(finals, base)  # w = 0: the ranker's own scores, untouched


def test_blend_follows_merit():
    # A useless base ranker: the learner takes over (prompt length predicts the length here).
    weak = OnlineLearner(OnlineConfig(), dim=8)
    prompt, lengths, base, emb = _stream(400, 1, base_quality=0.0)
    finals, onlines = _run(weak, prompt, lengths, base, emb)
    assert weak.weight > 0.9
    s = weak.stats()
    assert s["accuracy_online"] > s["accuracy_base"] + 0.15 and s["observed"] == 400 and s["memory"] == 400
    second = slice(200, None)
    assert known_pair_accuracy(finals[second], lengths[second].astype(float), np.ones(200, bool), 0.2)[0] > 0.7
    # A near-perfect base ranker: the learner's weight stays small.
    strong = OnlineLearner(OnlineConfig(), dim=8)
    prompt, lengths, base, emb = _stream(400, 2, base_quality=1.0)
    _run(strong, prompt, lengths, base, emb)
    assert strong.weight < 0.3 and strong.stats()["accuracy_base"] > strong.stats()["accuracy_online"]


def test_censored_labels_only_push_predictions_up():
    config = OnlineConfig(min_observations=10)
    prompt, lengths, base, emb = _stream(300, 3, base_quality=0.0)
    exact = OnlineLearner(config, dim=8)
    _run(exact, prompt, lengths, base, emb)
    # The same stream, but every other request was cut at 5 tokens by max_tokens.
    capped = np.arange(300) % 2 == 0
    cut = np.where(capped, np.minimum(lengths, 5), lengths)
    censored = OnlineLearner(config, dim=8)
    _run(censored, prompt, cut, base, emb, capped=capped)
    assert censored.stats()["censored"] == 150
    # Learning "at least 5" as "exactly 5" would drag predictions down; as a lower bound it cannot.
    naive = OnlineLearner(config, dim=8)
    _run(naive, prompt, cut, base, emb)
    probe = np.array([1500])
    assert censored.predict(None, probe)[0] > naive.predict(None, probe)[0]
    assert abs(censored.predict(None, probe)[0] - exact.predict(None, probe)[0]) < abs(
        naive.predict(None, probe)[0] - exact.predict(None, probe)[0]
    )
    # trust_length_caps: a cap is an exact label (replays of recorded lengths).
    trusting = OnlineLearner(OnlineConfig(min_observations=10, trust_length_caps=True), dim=8)
    _run(trusting, prompt, cut, base, emb, capped=capped)
    assert trusting.stats()["censored"] == 0


def test_knn_memory_recalls_similar_prompts():
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(2, 16)).astype(np.float32)
    learner = OnlineLearner(OnlineConfig(k=8), dim=16)
    for i in range(200):  # cluster 0 answers short, cluster 1 long; prompt length says nothing
        c = i % 2
        e = centers[c] + 0.1 * rng.normal(size=16).astype(np.float32)
        learner.observe(0.0, 0.0, 0.0, e, 100, 10 if c == 0 else 500, False)
    near0 = centers[0] + 0.1 * rng.normal(size=16).astype(np.float32)
    near1 = centers[1] + 0.1 * rng.normal(size=16).astype(np.float32)
    pred = learner.predict(np.stack([near0, near1]), np.array([100, 100]))
    assert pred[0] == pytest.approx(math.log1p(10), abs=0.3) and pred[1] == pytest.approx(math.log1p(500), abs=0.3)


def test_memory_is_bounded_and_reset_forgets():
    learner = OnlineLearner(OnlineConfig(memory=64), dim=8)
    prompt, lengths, base, emb = _stream(200, 5, base_quality=0.0)
    _run(learner, prompt, lengths, base, emb)
    assert learner.stats()["memory"] == 64 and learner._emb.shape == (64, 8)
    learner.reset()
    s = learner.stats()
    assert s["memory"] == 0 and s["observed"] == 0 and s["weight"] == 0 and s["resets"] == 1
    assert learner.predict(emb[:1], prompt[:1])[0] == 0.0


def test_deterministic():
    prompt, lengths, base, emb = _stream(150, 6, base_quality=0.3)
    a = _run(OnlineLearner(OnlineConfig(), dim=8), prompt, lengths, base, emb)
    b = _run(OnlineLearner(OnlineConfig(), dim=8), prompt, lengths, base, emb)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


class _PairMatrixLearner(OnlineLearner):
    """The learner as it was: the blend weight chosen with one pair matrix per predictor,
    from the judged requests in arrival order."""

    def _update_weight(self):
        c = self.config
        m = min(self._num_judged, c.window)
        if m < c.min_observations:
            self.weight = 0.0
            return
        arr = np.roll(self._judged[:m], -(self._num_judged % c.window) if self._num_judged > c.window else 0, axis=0)
        length, exact = arr[:, 3], arr[:, 4].astype(bool)
        for col, name in ((0, "base"), (1, "online"), (2, "blend")):
            self.accuracy[name], self.known_pairs = known_pair_accuracy(arr[:, col], length, exact, c.delta)
        if self.known_pairs == 0:
            return
        best_w, best_acc = 0.0, -1.0
        for w in (i / 10 for i in range(11)):
            acc = known_pair_accuracy(self._blend(arr[:, 0], arr[:, 1], w), length, exact, c.delta)[0]
            if acc > best_acc + 1e-9:
                best_w, best_acc = w, acc
        self.weight = best_w if self._weight_updates == 0 else 0.5 * (self.weight + best_w)
        self._weight_updates += 1


@pytest.mark.parametrize("seed", range(4))
def test_the_one_pass_weight_update_chooses_what_the_pair_matrices_chose(seed):
    """Random streams (ties, censoring, a window that wraps): every score, weight and
    accuracy of the learner equals the one-pair-matrix-per-predictor computation's."""
    rng = np.random.default_rng(seed)
    config = OnlineConfig(window=int(rng.choice([40, 64, 100])), min_observations=int(rng.choice([8, 32])), memory=128)
    prompt, lengths, base, emb = _stream(400, 10 + seed, base_quality=float(rng.uniform(0, 1)))
    base = np.round(base, 1)  # ties in the base scores
    capped = rng.random(400) < 0.2
    new, old = OnlineLearner(config, dim=8), _PairMatrixLearner(config, dim=8)
    for i in range(400):
        for learner in (new, old):
            f, o = learner.score(base[i : i + 1], emb[i : i + 1], prompt[i : i + 1])
            learner.observe(base[i], o[0], f[0], emb[i], int(prompt[i]), int(lengths[i]), bool(capped[i]))
        assert new.weight == old.weight and new.known_pairs == old.known_pairs
        assert new.stats() == old.stats()
        assert np.array_equal(new.predict(emb[i : i + 1], prompt[i : i + 1]), old.predict(emb[i : i + 1], prompt[i : i + 1]))
    assert 0 < new.weight < 1 and new.known_pairs > 0  # the blend was exercised, not stuck at an end


@pytest.mark.parametrize("n", [1, 3, 32])
def test_similarities_are_the_matrix_product(n):
    rng = np.random.default_rng(n)
    memory = rng.normal(size=(257, 384)).astype(np.float32)
    memory /= np.linalg.norm(memory, axis=1, keepdims=True)
    q = memory[rng.integers(0, 257, n)] + 0.1 * rng.normal(size=(n, 384)).astype(np.float32)
    got = _similarities(q, memory)
    assert got.shape == (n, 257) and got.dtype == np.float32
    # fp32 dot products of length 384 in another summation order: ~1e-7 relative apart
    np.testing.assert_allclose(got, q @ memory.T, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "value,match",
    [
        ({"memroy": 1}, "unknown key"),
        ({"memory": 0}, "positive integer"),
        ({"temperature": -1}, "number > 0"),
        ({"cpu_fraction": 0}, "cpu_fraction"),
        ({"enabled": "yes"}, "true or false"),
        ("on", "expected true, false or an object"),
    ],
)
def test_config_errors(value, match):
    with pytest.raises(ValueError, match=match):
        OnlineConfig.parse(value, "online")


def test_config_forms():
    assert OnlineConfig.parse(False, "online").enabled is False
    assert OnlineConfig.parse({"memory": 10}, "online").memory == 10
    assert OnlineConfig.parse(OnlineConfig().to_dict(), "online") == OnlineConfig()


def test_stream_eval_learns_code_lengths_a_chat_ranker_cannot_rank(minilm_dir, tmp_path, capsys):
    """`pars-fast eval --online`: HumanEval through a MiniLM ranker whose head knows nothing.
    The blend learns, from the stream itself, what prompt length says about solution length."""
    import json

    from pars_fast.cli import main
    from pars_fast.ranker import Ranker

    folder = Ranker.from_backbone(minilm_dir, device="cpu", seed=0).save(tmp_path / "untrained")
    assert main(["eval", "--online", "--ranker", str(folder), "--data", "humaneval", "--backend", "torch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    second = out["second_half"]
    assert out["n"] == 164 and out["learner"]["observed"] == 164 and out["data"] == "humaneval"
    assert out["learner"]["weight"] > 0.8
    assert second["blend"] > 0.25 and second["blend"] > second["frozen"] + 0.15
