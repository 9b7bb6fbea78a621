"""Distillation loss against a by-hand computation; info-gain weights and the EMA baseline."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmsys.distill import EmaBaseline, distill_loss, info_gain_weights, prior_probs


def by_hand(s, y, teachers, T, wc, wk, wcos, sw):
    """The recipe's loss written out per sample with plain tensor ops."""
    B = len(y)
    ps = torch.softmax(s / T, -1)
    per = []
    for i in range(B):
        ce = -torch.log_softmax(s[i], -1)[y[i]]
        tot = wc * ce
        for t in teachers:
            pt = torch.softmax(t[i] / T, -1)
            kl = (pt * (pt.log() - ps[i].log())).sum() * T * T
            cos = 1 - (pt @ ps[i]) / (pt.norm() * ps[i].norm())
            tot = tot + wk * kl + wcos * cos
        per.append(sw[i] * tot)
    return torch.stack(per).mean() / (wc + len(teachers) * (wk + wcos))


@pytest.mark.parametrize("T, wc, wk, wcos, weighted", [(1.0, 1, 1, 1, False), (2.0, 0.5, 2.0, 1.0, True)])
def test_matches_hand_computation(T, wc, wk, wcos, weighted):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 3, generator=g)
    y = torch.tensor([0, 1, 2, 2, 0])
    teachers = [torch.randn(5, 3, generator=g) * 2, torch.randn(5, 3, generator=g)]
    sw = torch.tensor([0.5, 2.0, 1.0, 0.0, 1.5]) if weighted else torch.ones(5)
    loss, parts = distill_loss(s, y, teachers, T=T, ce_weight=wc, kl_weight=wk, cos_weight=wcos,
                               sample_weight=sw if weighted else None)
    assert float(loss) == pytest.approx(float(by_hand(s, y, teachers, T, wc, wk, wcos, sw)), rel=1e-5)
    assert parts["ce"] == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-6)
    assert set(parts) == {"ce", "kl_0", "cos_0", "kl_1", "cos_1", "loss"}
    assert parts["kl_0"] > 0 and parts["cos_0"] > 0


def test_recipe_divides_by_five_and_teacher_equals_student():
    s = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    loss, parts = distill_loss(s, y, [s.clone(), s.clone()])
    assert parts["kl_0"] == pytest.approx(0, abs=1e-6) and parts["cos_1"] == pytest.approx(0, abs=1e-6)
    assert float(loss) == pytest.approx(parts["ce"] / 5, rel=1e-5)
    loss, _ = distill_loss(s, y, [])
    assert float(loss) == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-6)


def test_gradient_reaches_student_not_teacher():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    loss, _ = distill_loss(s, torch.tensor([0, 1, 2, 0]), [t])
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


def test_bad_arguments():
    s, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError):
        distill_loss(s, y, [torch.zeros(3, 3)])
    with pytest.raises(ValueError):
        distill_loss(s, y, [], T=0)
    with pytest.raises(ValueError):
        distill_loss(s, y, [s], sample_weight=torch.ones(3))


def test_argument_checks_name_what_is_wrong():
    """Each check on its own (one bad argument at a time), with its message."""
    s, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^student_logits must be \[B, 3\] and labels \[B\]; got \(2, 3\), \(3,\)$"):
        distill_loss(s, torch.zeros(3, dtype=torch.long), [s])
    with pytest.raises(ValueError, match=r"^student_logits must be \[B, 3\] and labels \[B\]; got \(2, 4\), \(2,\)$"):
        distill_loss(torch.zeros(2, 4), y, [])
    with pytest.raises(ValueError, match=r"^every teacher must be \[2, 3\]; got \[\(2, 3\), \(3, 3\)\]$"):
        distill_loss(s, y, [s, torch.zeros(3, 3)])
    for weights in ({"ce_weight": -1.0}, {"kl_weight": -1.0}, {"cos_weight": -1.0}):
        with pytest.raises(ValueError, match=r"^need T > 0 and weights >= 0; got T=1.0, ce="):
            distill_loss(s, y, [s], **weights)
    with pytest.raises(ValueError, match=r"^need T > 0 and weights >= 0; got T=0, ce=1.0, kl=1.0, cos=1.0$"):
        distill_loss(s, y, [s], T=0)
    with pytest.raises(ValueError, match=r"^all loss weights are zero$"):
        distill_loss(s, y, [s], ce_weight=0.0, kl_weight=0.0, cos_weight=0.0)
    with pytest.raises(ValueError, match=r"^sample_weight must be \[2\], got \(3,\)$"):
        distill_loss(s, y, [s], sample_weight=torch.ones(3))
    # a zero weight is allowed (only negative ones are refused): CE alone, or the teacher terms alone
    assert distill_loss(s, y, [s], kl_weight=0.0, cos_weight=0.0)[1]["loss"] == pytest.approx(np.log(3))
    assert distill_loss(s, y, [s], ce_weight=0.0)[1]["loss"] == pytest.approx(0.0, abs=1e-6)


def test_default_temperature_is_one():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.tensor([0, 1, 2, 0])
    assert distill_loss(s, y, [t])[1] == distill_loss(s, y, [t], T=1.0)[1]
    assert distill_loss(s, y, [t])[1] != distill_loss(s, y, [t], T=2.0)[1]


def test_info_gain_weights():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (200, 3))
    y = rng.integers(0, 3, 200)
    base = prior_probs(y)
    w = info_gain_weights(z, y, base)
    assert w.shape == (200,) and np.all(w > 0) and w.mean() == pytest.approx(1.0)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = np.log(p[np.arange(200), y]) - np.log(base[y])
    order = np.argsort(r)
    assert np.all(np.diff(w[order]) >= 0)               # monotone in r
    assert np.corrcoef(w, r)[0, 1] > 0.5
    # a per-row baseline equal to the teacher: no gain anywhere -> uniform weights
    assert np.allclose(info_gain_weights(z, y, p), 1.0)
    # extreme teacher: still positive and finite
    w = info_gain_weights(np.array([[200.0, -200, -200], [-200, 200, -200]]), np.array([1, 1]), base)
    assert np.all(w > 0) and np.all(np.isfinite(w))
    with pytest.raises(ValueError):
        info_gain_weights(z, y, base[:2])


def test_ema_baseline():
    b = EmaBaseline(4, prior=[2, 1, 1], decay=0.5)
    assert np.allclose(b([0, 3]), [[0.5, 0.25, 0.25]] * 2)
    b.update([1], [[0.0, 0.0, 1.0]])
    assert np.allclose(b([1]), [[0.25, 0.125, 0.625]]) and np.allclose(b([0]), [[0.5, 0.25, 0.25]])
    c = EmaBaseline(4, prior=[1, 1, 1])
    c.load_state_dict(b.state_dict())
    assert np.array_equal(c.probs, b.probs) and c.decay == 0.5
    assert np.allclose(EmaBaseline(2, [1, 1, 1]).probs.sum(1), 1)
    with pytest.raises(ValueError):
        EmaBaseline(2, [1, 1, 1], decay=1.0)


def test_ema_info_gain_weights_follow_the_student():
    from lmsys.distill import EmaInfoGainWeights
    z = np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])   # teacher right on every row
    y = np.array([0, 1, 2, 0])
    w = EmaInfoGainWeights(z, y, prior=[1, 1, 1], decay=0.5, tau=1.0)
    first = w.batch(np.arange(4))
    assert np.allclose(first, 1.0) and np.isclose(first.mean(), 1.0)      # same gain over a uniform prior
    # the student learns rows 0 and 1: their baseline rises, their gain and weight fall
    w.observe([0, 1], [[0.98, 0.01, 0.01], [0.01, 0.98, 0.01]])
    after = w.batch(np.arange(4))
    assert np.isclose(after.mean(), 1.0) and (after > 0).all()
    assert after[0] < 1 < after[2] and np.isclose(after[0], after[1]) and np.isclose(after[2], after[3])
    assert np.allclose(w.batch([2, 0]), after[[2, 0]])                       # a batch is a slice of the whole
    # the EMA state round-trips (training checkpoints) and the fingerprint names the configuration
    v = EmaInfoGainWeights(z, y, prior=[1, 1, 1], decay=0.5, tau=1.0)
    assert v.fingerprint() == w.fingerprint() != EmaInfoGainWeights(z, y, [1, 1, 1], decay=0.9).fingerprint()
    v.load_state_dict(w.state_dict())
    assert np.array_equal(v.batch(np.arange(4)), after)
    with pytest.raises(ValueError):
        EmaInfoGainWeights(z, y, [1, 1, 1], tau=0)
    with pytest.raises(ValueError):
        EmaInfoGainWeights(z[:3], y, [1, 1, 1])


def test_distill_step_weights_follow_params():
    from lmsys.config import load_config
    from lmsys.distill import EmaInfoGainWeights
    from lmsys.steps.student import sample_weights
    soft = np.random.default_rng(0).normal(size=(12, 2, 3))                  # [N, teachers, 3]
    y = np.arange(12) % 3
    cfg = load_config("tiny")
    assert sample_weights(cfg, soft, y) is None                              # off by default
    cfg["distill"]["info_gain_weights"] = True
    cfg["distill"]["info_gain_baseline"] = "prior"                          # (params.yaml's default is ema)
    fixed = sample_weights(cfg, soft, y)
    assert fixed.shape == (12,) and np.isclose(fixed.mean(), 1.0) and fixed.std() > 0
    cfg["distill"]["info_gain_baseline"] = "ema"
    ema = sample_weights(cfg, soft, y)
    assert isinstance(ema, EmaInfoGainWeights)
    assert np.allclose(ema.batch(np.arange(12)), fixed, atol=1e-5)           # before training: the prior baseline
    cfg["distill"]["info_gain_baseline"] = "teacher"
    with pytest.raises(ValueError, match="info_gain_baseline must be 'prior' or 'ema'"):
        sample_weights(cfg, soft, y)


# ---------------------------------------------------------------- exact values and messages (mutation testing)

def test_prior_probs_exact():
    assert prior_probs([0, 0, 1]).tolist() == [3 / 6, 2 / 6, 1 / 6]                      # add-one by default
    assert prior_probs([0, 0, 1], smoothing=0.5).tolist() == [2.5 / 4.5, 1.5 / 4.5, 0.5 / 4.5]
    assert prior_probs([0, 0], smoothing=0).tolist() == [1.0, 0.0, 0.0]                   # [3] even with classes unseen
    assert prior_probs(np.array([2.0, 1.0, 2.0])).tolist() == [1 / 6, 2 / 6, 3 / 6]      # float labels are read as ints
    assert prior_probs([0, 1, 2, 3]).tolist() == [2 / 6, 2 / 6, 2 / 6]                   # only classes 0..2 are counted
    assert prior_probs([1]).dtype == np.float64


def test_info_gain_weights_exact_and_messages():
    from lmsys.distill import _mean_one
    z = np.log(np.array([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]))
    y = np.array([0, 1, 0])
    base = np.array([0.25, 0.5, 0.25])
    r = np.log([0.5 / 0.25, 0.6 / 0.5, 0.1 / 0.25])
    np.testing.assert_allclose(info_gain_weights(z, y, base), 3 * np.exp(r) / np.exp(r).sum(), rtol=1e-12)
    np.testing.assert_allclose(info_gain_weights(z, y, base, tau=2.0), 3 * np.exp(r / 2) / np.exp(r / 2).sum(), rtol=1e-12)
    np.testing.assert_allclose(info_gain_weights(z, y, np.tile(base, (3, 1))), info_gain_weights(z, y, base), rtol=1e-12)
    # a zero baseline or teacher probability is clipped at 1e-15: finite weights
    w = info_gain_weights(np.array([[0.0, -1e4, 0.0], [0.0, 0.0, 0.0]]), np.array([1, 0]), np.array([0.0, 1.0, 0.0]))
    np.testing.assert_allclose(w, _mean_one(np.array([np.log(1e-15), np.log(1 / 3) - np.log(1e-15)]), 1.0), rtol=1e-9)
    np.testing.assert_allclose(_mean_one(np.array([0.0, np.log(3.0)]), 1.0), [0.5, 1.5])
    np.testing.assert_allclose(_mean_one(np.array([1000.0, 1000.0 + np.log(3.0)]), 1.0), [0.5, 1.5])   # no overflow
    for args, msg in [((z, y, base[:2]), r"^baseline_probs must be \[N, 3\] or \[3\] and tau > 0; got \(2,\), tau=1.0$"),
                      ((z, y, np.ones((2, 3))), r"^baseline_probs must be \[N, 3\] or \[3\] and tau > 0; got \(2, 3\), tau=1.0$"),
                      ((z, y, base, 0), r"^baseline_probs must be \[N, 3\] or \[3\] and tau > 0; got \(3, 3\), tau=0$"),
                      ((z, y, base, -1.0), r"tau=-1.0$"),
                      ((z[:2], y, base), r"^teacher_logits must be \[N, 3\] and labels \[N\] in 0..2; got \(2, 3\), \(3,\)$"),
                      ((z[:, :2], y, base), r"^teacher_logits must be \[N, 3\] and labels \[N\] in 0..2; got \(3, 2\), \(3,\)$"),
                      ((z, np.array([0, 1, 3]), base), r"got \(3, 3\), \(3,\)$"),
                      ((z, np.array([0, -1, 2]), base), r"got \(3, 3\), \(3,\)$"),
                      ((np.zeros((0, 3)), np.array([], int), base), r"got \(0, 3\), \(0,\)$")]:
        with pytest.raises(ValueError, match=msg):
            info_gain_weights(*args)


def test_ema_baseline_exact_and_messages():
    for decay in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^decay must be in \[0, 1\), got {decay}$"):
            EmaBaseline(2, [1, 1, 1], decay=decay)
    with pytest.raises(ValueError, match=r"^prior must be \[3\], got \(2,\)$"):
        EmaBaseline(2, [1, 1])
    b = EmaBaseline(3, [1, 1, 2], decay=0.0)                  # decay 0: the student's probabilities replace the row
    assert b.decay == 0.0 and b.probs.dtype == np.float64 and b.probs.shape == (3, 3)
    b.update(np.array([2, 0]), np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]], dtype=np.float32))
    np.testing.assert_allclose(b.probs, [[0.6, 0.3, 0.1], [0.25, 0.25, 0.5], [0.1, 0.2, 0.7]], rtol=1e-7)
    assert EmaBaseline(2, [1, 1, 1]).decay == 0.999
    s = b.state_dict()
    assert set(s) == {"decay", "probs"} and s["probs"] is not b.probs and np.array_equal(s["probs"], b.probs)
    s["probs"][0, 0] = 9.0
    assert b.probs[0, 0] == pytest.approx(0.6)                # a copy: the saved state does not move with training
    c = EmaBaseline(1, [1, 1, 1])
    state = {"decay": np.float32(0.25), "probs": [[0.2, 0.3, 0.5]]}
    c.load_state_dict(state)
    assert type(c.decay) is float and c.decay == 0.25 and c.probs.dtype == np.float64
    assert np.array_equal(c([0]), [[0.2, 0.3, 0.5]])


def test_ema_info_gain_weights_defaults_messages_and_edges():
    from lmsys.distill import EmaInfoGainWeights
    z, y = np.array([[2.0, 0, 0]]), np.array([0])
    w = EmaInfoGainWeights(z, y, prior=[1, 1, 1])            # one row: defaults decay 0.5, tau 1
    assert w.ema.decay == 0.5 and w.tau == 1.0 and len(w) == 1 and w.batch([0]).tolist() == [1.0]
    assert EmaInfoGainWeights(z, y, [1, 1, 1], decay=0.2, tau=3).ema.decay == 0.2
    assert EmaInfoGainWeights(z, y, [1, 1, 1], decay=0.2, tau=3).tau == 3.0
    for tau in (0, -2.5):
        with pytest.raises(ValueError, match=rf"^tau must be > 0, got {tau}$"):
            EmaInfoGainWeights(z, y, [1, 1, 1], tau=tau)
    zz = np.array([[2.0, 0, 0], [0, 0, 2.0]])
    yy = np.array([0, 2])
    e = EmaInfoGainWeights(zz, yy, prior=[1, 1, 0])          # a zero baseline probability (class 2): clipped, finite
    wb = e.batch([0, 1])
    assert np.all(np.isfinite(wb)) and wb[1] > wb[0]
    assert wb.tolist() == pytest.approx(info_gain_weights(zz, yy, np.array([0.5, 0.5, 0.0])).tolist())
    tau2 = EmaInfoGainWeights(zz, yy, prior=[1, 2, 1], tau=2.0)
    assert tau2.batch([0, 1]).tolist() == pytest.approx(info_gain_weights(zz, yy, np.array([0.25, 0.5, 0.25]), tau=2.0).tolist())
    assert tau2.fingerprint() != EmaInfoGainWeights(zz, yy, prior=[1, 2, 1], tau=1.0).fingerprint()
    assert tau2.fingerprint() != EmaInfoGainWeights(zz, yy, prior=[1, 1, 1], tau=2.0).fingerprint()
    assert tau2.fingerprint() != EmaInfoGainWeights(zz, np.array([0, 1]), prior=[1, 2, 1], tau=2.0).fingerprint()


def test_inputs_are_read_as_float64_and_int64():
    """float32 baselines / priors and float labels: the same weights as the float64 / int inputs."""
    from lmsys.distill import EmaInfoGainWeights
    z = np.log(np.array([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]))
    y = np.array([0, 1, 2])                          # three labels: three different baseline values
    base32 = np.array([0.3, 0.2, 0.5], dtype=np.float32)
    assert not np.array_equal(np.log(base32), np.log(base32.astype(np.float64)))   # (float32 math would show)
    assert np.array_equal(info_gain_weights(z, y, base32), info_gain_weights(z, y, base32.astype(np.float64)))
    assert np.array_equal(info_gain_weights(z, y.astype(np.float64), base32), info_gain_weights(z, y, base32))
    assert np.array_equal(info_gain_weights(z.astype(np.float32), y, base32),
                          info_gain_weights(z.astype(np.float32).astype(np.float64), y, base32))
    e = EmaInfoGainWeights(z, y.astype(np.float64), prior=np.array([1, 1, 2], dtype=np.float32))
    assert e.labels.dtype == np.int64 and e.ema.probs.dtype == np.float64
    assert EmaBaseline(2, np.array([1, 1, 3], dtype=np.float32)).probs.tolist() == [[0.2, 0.2, 0.6]] * 2
    b = EmaBaseline(1, [1, 1, 1], decay=0.5)
    b.load_state_dict({"decay": 0.5, "probs": np.array([[0.2, 0.3, 0.5]], dtype=np.float32)})   # a float32 state
    assert b.probs.dtype == np.float64
