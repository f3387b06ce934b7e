"""Chapter 3, section 3.6: the failure-mode measurements and the controls that show each test can fire."""

import math

import numpy as np
import pytest
import torch

from fastmem.attractors import AttractorConfig, AttractorLayer
from fastmem.errors import ParameterError
from fastmem.failure_modes import (Ratio, StatelessLayer, UnstableLayer, churn_ratio, effect_summary, snap_back,
                                   state_direction, stateless_share, stream_effect, switch_summary, topic_switch)

SEED_LIKE = AttractorConfig(layer=1, n_attractors=4)
STILL = SEED_LIKE.with_(decay=0.0, pull=0.0)  # forgets nothing, never moves
FOLLOWING = AttractorConfig(layer=1, n_attractors=1, pull=1.0, decay=1.0)  # its state is the last window


def _windows(n_passes=4, low=5, high=1000, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (1, length), generator=generator) for _ in range(n_passes)]


def _topic(n_passes, seed, low=5):
    """Windows of one "topic": 32 tokens drawn from 35 ids, so that its windows' activations are alike
    (on the tiny random model, windows over the whole vocabulary are nearly orthogonal)."""
    return _windows(n_passes, low, low + 35, 32, seed)


def test_stream_effect_is_zero_without_feedback_and_fresh_cosine_sees_history(tiny_neox):
    model, _, _ = tiny_neox
    windows = _windows(4)
    noop = stream_effect(model, AttractorConfig(layer=1, n_attractors=4, feedback_strength=0.0), windows)
    assert np.all(noop["kl"] == 0) and np.all(noop["answer_changes"] == 0) and len(noop["kl"]) == 3
    np.testing.assert_allclose(noop["nll"], noop["plain_nll"])
    acting = stream_effect(model, AttractorConfig(layer=1, n_attractors=4, feedback_strength=4.0), windows)
    assert np.all(acting["kl"] > 0)
    # a layer that forgets nothing keeps its history's attractors: its feedback differs from a fresh layer's
    kept = stream_effect(model, AttractorConfig(layer=1, n_attractors=4, decay=0.0, pull=0.0), windows, fresh=True)
    assert len(kept["fresh_cosine"]) == 3 and kept["fresh_cosine"].max() < 0.99
    # pull = 1 replaces the one attractor by this pass's activation, so the feedback's direction
    # depends on this pass alone, as a fresh layer's does (windows that share most tokens keep the
    # similarity positive, so that neither feedback is zero)
    similar = [windows[0].clone() for _ in range(4)]
    for i, x in enumerate(similar):
        x[0, i] = 7
    forgetting = stream_effect(model, AttractorConfig(layer=1, n_attractors=1, decay=1.0, pull=1.0), similar,
                               fresh=True)
    np.testing.assert_allclose(forgetting["fresh_cosine"], 1.0, atol=1e-5)


def test_effect_summary_reads_a_stream_effect(tiny_neox):
    model, _, _ = tiny_neox
    effect = stream_effect(model, AttractorConfig(layer=1, n_attractors=4, feedback_strength=0.0), _windows(5))
    row = effect_summary(effect, n_boot=50, seed=0)
    assert row["KL"] == 0 and row["answer changes"] == 0 and row["loss change %"] == 0
    assert row["KL 95% CI"] == "[0.0e+00, 0.0e+00]"


def test_state_direction_is_the_feedback_normalised_over_attractors(tiny_neox):
    model, _, _ = tiny_neox
    for gate in (None, 0.05):
        layer = AttractorLayer(model, SEED_LIKE.with_(gate_threshold=gate, feedback_strength=0.3))
        with torch.no_grad(), layer:
            for x in _topic(3, seed=0):
                model(x)
        weight = layer.feedback_weights()
        direction = state_direction(layer)
        assert direction.shape == (1, model.config.hidden_size)
        torch.testing.assert_close(0.3 * weight.sum(1, keepdim=True) * direction, layer.feedback)


# ---------------------------------------------------------------------------- heavy decay -> stateless
def test_stateless_layer_reads_one_and_a_layer_that_keeps_its_history_does_not(tiny_neox):
    model, _, _ = tiny_neox
    windows = _topic(6, seed=0)
    stateless = stream_effect(model, STILL, windows, fresh=True, layer_class=StatelessLayer)
    np.testing.assert_allclose(stateless["fresh_cosine"], 1.0, atol=1e-5)
    assert np.all(stateless["kl"] == 0), "reset before every pass, its feedback never reaches the model"
    kept = stream_effect(model, STILL, windows, fresh=True)
    assert len(kept["fresh_cosine"]) == 5 and kept["fresh_cosine"].max() < 0.99
    share = stateless_share(stateless["fresh_cosine"], kept["fresh_cosine"], stateless["fresh_cosine"], n_boot=200)
    assert share.value == share.low == share.high == 1.0


def test_stateless_share_on_synthetic_cosines():
    rng = np.random.default_rng(0)
    none, stateless = rng.uniform(0.1, 0.4, 20), rng.uniform(0.95, 1.0, 20)
    assert stateless_share(stateless, none, stateless, n_boot=200) == Ratio(1.0, 1.0, 1.0)
    assert stateless_share(none, none, stateless, n_boot=200) == Ratio(0.0, 0.0, 0.0)
    half = stateless_share((none + stateless) / 2, none, stateless, n_boot=200)
    assert math.isclose(half.value, 0.5) and half.low <= 0.5 <= half.high
    same = stateless_share(none, none, none, n_boot=200)  # the references coincide: no scale, no crash
    assert all(math.isnan(v) for v in (same.value, same.low, same.high))
    with pytest.raises(ParameterError):
        stateless_share(none, none, stateless[:5])


# ---------------------------------------------------------------------------- too many attractors -> unstable
def test_unstable_layer_churns_more_than_the_seed_like_layer(tiny_neox):
    model, _, _ = tiny_neox
    windows = _topic(12, seed=0)
    seed_like = stream_effect(model, SEED_LIKE, windows)
    unstable = stream_effect(model, SEED_LIKE, windows, layer_class=UnstableLayer)
    for effect in (seed_like, unstable):
        assert effect["churn"].shape == effect["drift"].shape == (11,)
    ratio = churn_ratio(unstable, seed_like, n_boot=500, seed=0)
    assert ratio.low > 2, ratio
    assert ratio.low <= ratio.value <= ratio.high


def test_churn_and_drift_of_a_state_that_holds_still(tiny_neox):
    model, _, _ = tiny_neox
    windows = _topic(5, seed=1)
    # one attractor that never moves: the normalised direction is that attractor on every pass
    one = stream_effect(model, STILL.with_(n_attractors=1), windows)
    np.testing.assert_allclose(one["churn"], 0.0, atol=1e-6)
    # with several, the weights follow each pass's similarity, so the direction may turn while no attractor moves
    several = stream_effect(model, STILL, windows)
    assert several["churn"].shape == (4,) and np.all(np.isfinite(several["churn"]))
    assert np.all((several["churn"] >= -1e-6) & (several["churn"] <= 2))
    np.testing.assert_allclose(several["drift"], 0.0, atol=1e-6)
    assert np.all(stream_effect(model, FOLLOWING, windows)["drift"] > 1e-3), "pull = 1 moves the attractor"


def test_churn_ratio_on_known_churn():
    churn = np.random.default_rng(0).uniform(0.1, 0.5, 12)
    for n_passes in (5, 12):  # the paired bootstrap over passes, then the moving-block bootstrap
        ratio = churn_ratio({"churn": 3 * churn[:n_passes]}, {"churn": churn[:n_passes]}, n_boot=200)
        assert all(math.isclose(v, 3.0) for v in (ratio.value, ratio.low, ratio.high)), (n_passes, ratio)
    with pytest.raises(ParameterError):
        churn_ratio({"churn": churn}, {"churn": churn[:5]})


# ---------------------------------------------------------------------------- snap-back
def test_switch_summary_on_known_tracks():
    assert switch_summary([1, 1, 1, 0.5, -0.5, -1], 3) == {"lag": 2, "old_share": 1 / 3, "snapped": 0.0,
                                                           "crossed": 1.0}
    assert switch_summary([1, 1, -0.2, 0.3, -1], 2) == {"lag": 1, "old_share": 1 / 3, "snapped": 1.0,
                                                        "crossed": 1.0}
    never = switch_summary([1, 1, 0.9, 0.8], 2)
    assert never["lag"] == 3 and never["crossed"] == 0.0  # never crossed: censored at passes after + 1


def test_snap_back_on_known_tracks():
    snapped, stays, never = [1, 1, -1, 1], [1, 1, -1, -1], [1, 1, 0.5, 0.2]
    result = snap_back([np.array(t, float) for t in (snapped, stays, never)], n_before=2)
    assert (result.n_pairs, result.n_crossed, result.n_snapped, result.share) == (3, 2, 1, 0.5)
    assert 0 < result.low < 0.5 < result.high < 1
    assert snap_back([np.array(snapped, float)], 2).share == 1.0
    assert snap_back([np.array(stays, float)], 2).share == 0.0
    none = snap_back([np.array(never, float)], 2)
    assert none.n_crossed == 0 and math.isnan(none.share) and (none.low, none.high) == (0.0, 1.0)


def test_topic_switch_follows_the_topics(tiny_neox):
    model, _, _ = tiny_neox
    a, b = _windows(3, seed=1), _windows(3, seed=2)
    positions = topic_switch(model, AttractorConfig(layer=1, n_attractors=2, pull=1.0, decay=1.0), a, b)
    assert positions.shape == (6,) and np.all(np.isfinite(positions))


def test_a_following_layer_snaps_back_when_the_text_returns(tiny_neox):
    """Positive control: topics A (ids 5..39) and B (ids 600..634), then A again; a layer whose state is
    its last window crosses to B during B and comes back during the return."""
    model, _, _ = tiny_neox
    tracks = []
    for pair in range(4):
        a, b, back = _topic(3, pair), _topic(3, pair + 10, low=600), _topic(3, pair + 20)
        track = topic_switch(model, FOLLOWING, a, b, back)
        assert track.shape == (9,) and np.all(track[:3] > 0) and track[-1] > 0, track
        assert switch_summary(track, 3)["lag"] <= 3, "crossed to B while reading B"
        tracks.append(track)
    result = snap_back(tracks, n_before=3)
    assert result.n_crossed == result.n_snapped == 4 and result.share == 1.0
