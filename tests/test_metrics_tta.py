"""Metrics agree with sklearn, ECE separates calibrated from overconfident, plots/report are written,
TTA symmetrisation is exactly swap-equivariant."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from lmsys.metrics import (accuracy, ece, log_loss, plot_confusion, plot_fold_losses, plot_reliability,
                           read_labels, softmax, summarize, write_report)
from lmsys.tta import swap_probs, symmetrize

PNG = b"\x89PNG\r\n\x1a\n"


def sample(n, seed, sharpen=1.0):
    """Labels drawn from softmax(z); the returned probabilities are softmax(sharpen * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, 3))
    y = (rng.random(n)[:, None] > softmax(z).cumsum(1)).sum(1)
    return softmax(sharpen * z), y


def test_log_loss_matches_sklearn():
    p, y = sample(500, 0)
    assert log_loss(p, y) == pytest.approx(sk_log_loss(y, p, labels=[0, 1, 2]), rel=1e-12)
    rest = log_loss(p[1:], y[1:]) * (len(y) - 1)
    p[0] = [1.0, 0.0, 0.0]
    y[0] = 1                                   # clipped at 1e-15 (Kaggle), not infinite
    assert log_loss(p, y) == pytest.approx((rest - np.log(1e-15)) / len(y), rel=1e-12)
    with pytest.raises(ValueError):
        log_loss(p, np.full(len(y), 3))


def test_accuracy_softmax_summary():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    assert accuracy(p, np.array([0, 2, 0])) == pytest.approx(2 / 3)
    assert np.allclose(softmax(np.array([[1000.0, 1000.0, 1000.0]])), 1 / 3)
    s = summarize(p, np.array([0, 2, 0]))
    assert s["n"] == 3 and set(s) >= {"log_loss", "accuracy", "ece"}


def test_ece_small_when_calibrated_large_when_overconfident():
    p, y = sample(20000, 1)
    assert ece(p, y) < 0.02
    p_over, y = sample(20000, 1, sharpen=3.0)
    assert ece(p_over, y) > 0.1


def test_plots_and_report(tmp_path):
    p, y = sample(300, 2)
    paths = [plot_reliability(p, y, tmp_path / "img" / "reliability.png"),
             plot_fold_losses({0: 0.9, 1: 0.95, 2: 0.88}, tmp_path / "img" / "folds.png"),
             plot_confusion(p, y, tmp_path / "img" / "confusion.png")]
    for path in paths:
        assert path.read_bytes()[:8] == PNG
    assert not list(tmp_path.glob("img/*.tmp"))
    rep = write_report(tmp_path, {"metrics": summarize(p, y), "folds": {"fold 0": {"log_loss": 0.9}, "fold 1": {"log_loss": 0.95}},
                                  "plots": paths, "notes": "free text"})
    text = rep.read_text()
    assert rep == tmp_path / "report.md"
    assert "](img/reliability.png)" in text and "](img/confusion.png)" in text
    assert "| log_loss |" in text and "| fold 1 | 0.9500 |" in text and "free text" in text


def test_read_labels(tmp_path):
    pd.DataFrame({"id": ["007", "8"], "label": [2, 0]}).to_csv(tmp_path / "a.csv", index=False)
    s = read_labels(tmp_path / "a.csv")
    assert s.to_dict() == {"007": 2, "8": 0}
    w = pd.DataFrame({"id": [1, 2, 3], "winner_model_a": [0, 1, 0], "winner_model_b": [1, 0, 0], "winner_tie": [0, 0, 1]})
    w.to_csv(tmp_path / "b.csv", index=False)
    assert read_labels(tmp_path / "b.csv").tolist() == [1, 0, 2]
    w.loc[2, "winner_model_a"] = 1
    w.to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(ValueError, match="row 2"):
        read_labels(tmp_path / "c.csv")
    pd.DataFrame({"id": [1, 2], "label": [0, 4]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ValueError, match="row 1"):
        read_labels(tmp_path / "d.csv")
    pd.DataFrame({"id": [1], "winner_model_a": [1]}).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(ValueError, match="winner_model_b"):
        read_labels(tmp_path / "e.csv")


def test_tta_swap_equivariance_exact():
    rng = np.random.default_rng(3)
    p_x, p_swapped = softmax(rng.normal(size=(64, 3))), softmax(rng.normal(size=(64, 3)))
    out = symmetrize(p_x, p_swapped)
    # scoring the swapped test set: the roles of the two runs exchange
    out_sw = symmetrize(p_swapped, p_x)
    assert np.array_equal(out_sw, swap_probs(out))
    assert np.array_equal(out_sw[:, 2], out[:, 2])
    assert np.allclose(out.sum(1), 1)
    assert np.array_equal(swap_probs(swap_probs(p_x)), p_x)
    assert np.array_equal(swap_probs(p_x)[:, 0], p_x[:, 1])


def test_tta_symmetric_model_unchanged():
    p = softmax(np.random.default_rng(4).normal(size=(32, 3)))
    assert np.array_equal(symmetrize(p, swap_probs(p)), p)
    with pytest.raises(ValueError):
        symmetrize(p, p[:5])


def test_tta_batches_dtypes_and_errors():
    """swap_probs works on any leading axes; symmetrize computes in float64 whatever it is given;
    both name the bad shape."""
    rng = np.random.default_rng(3)
    batch = rng.dirichlet([1, 1, 1], size=(2, 4))                      # [2, 4, 3]
    np.testing.assert_array_equal(swap_probs(batch), batch[..., [1, 0, 2]])
    p32 = rng.dirichlet([1, 1, 1], size=5).astype(np.float32)
    out = symmetrize(p32, p32[::-1])
    a, b = p32.astype(np.float64), p32[::-1].astype(np.float64)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, (a + b[:, [1, 0, 2]]) / 2)
    with pytest.raises(ValueError, match=r"^expected 3 columns \(A, B, tie\), got shape \(2, 4\)$"):
        swap_probs(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"^shape mismatch: \(2, 3\) vs \(3, 3\)$"):
        symmetrize(np.zeros((2, 3)), np.zeros((3, 3)))


def test_metric_input_checks_name_what_is_wrong():
    p = np.full((2, 3), 1 / 3)
    for probs, labels, msg in [
            (np.zeros((2, 4)), [0, 1], r"^probs must be \[N, 3\], got shape \(2, 4\)$"),
            (np.zeros(3), [0], r"^probs must be \[N, 3\], got shape \(3,\)$"),
            (p, [0, 1, 2], r"^labels must be \[2\], got shape \(3,\)$"),
            (np.zeros((0, 3)), [], r"^no rows$"),
            (np.array([[np.nan, 0.5, 0.5], [1 / 3] * 3]), [0, 1], r"^probs contain NaN or inf$"),
            (np.array([[np.inf, 0.5, 0.5], [1 / 3] * 3]), [0, 1], r"^probs contain NaN or inf$"),
            (p, [0, 5], r"^labels must be 0, 1 or 2; got \[5\]$"),
            (p, [-1, 3], r"^labels must be 0, 1 or 2; got \[-1, 3\]$")]:
        for fn in (log_loss, accuracy, ece, summarize):
            with pytest.raises(ValueError, match=msg):
                fn(probs, labels)
    with pytest.raises(ValueError, match=r"^n_bins must be >= 1, got 0$"):
        ece(p, [0, 1], n_bins=0)


def test_ece_and_summary_exact_on_a_small_case():
    """Three rows, 2 bins: confidences 0.7 (right), 0.7 (wrong), 0.4 (right) -> bin (0, .5]: 1 row,
    |1 - 0.4|; bin (.5, 1]: 2 rows, |0.5 - 0.7|: ECE = (0.6 + 2 * 0.2) / 3."""
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    y = np.array([0, 0, 1])
    assert ece(p, y, n_bins=2) == pytest.approx((0.6 + 2 * 0.2) / 3, abs=1e-12)
    assert ece(np.array([[0.5, 0.25, 0.25]]), [0], n_bins=2) == pytest.approx(0.5)   # 0.5 sits in bin (0, .5]
    s = summarize(p, y, n_bins=2)
    assert s == pytest.approx({"n": 3, "log_loss": -np.mean(np.log([0.7, 0.1, 0.4])), "accuracy": 2 / 3,
                               "ece": (0.6 + 2 * 0.2) / 3, "mean_winner_model_a": 1.1 / 3,
                               "mean_winner_model_b": 0.8 / 3, "mean_winner_tie": 1.1 / 3}, abs=1e-12)
    assert isinstance(s["n"], int)
    np.testing.assert_allclose(softmax(np.log([[1.0, 2.0, 5.0]])), [[0.125, 0.25, 0.625]], rtol=1e-12)


def test_read_labels_messages_and_index(tmp_path):
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "noid.csv", index=False)
    with pytest.raises(ValueError, match=r"noid.csv: no `id` column \(columns: \['x'\]\)$"):
        read_labels(tmp_path / "noid.csv")
    pd.DataFrame({"id": [1, 2], "label": [0, "x"]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ValueError, match=r"d.csv: row 1: label 'x' is not 0, 1 or 2$"):
        read_labels(tmp_path / "d.csv")
    w = pd.DataFrame({"id": [1, 2], "winner_model_a": [0, 1], "winner_model_b": [1, 1], "winner_tie": [0, 0]})
    w.to_csv(tmp_path / "w.csv", index=False)
    with pytest.raises(ValueError, match=r"w.csv: row 1: winner columns \[1, 1, 0\] must be 0/1 with exactly one 1$"):
        read_labels(tmp_path / "w.csv")
    pd.DataFrame({"id": [1], "winner_model_a": [1]}).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(ValueError, match=r"e.csv: needs `label` or the winner columns \(missing \['winner_model_b', 'winner_tie'\]\)$"):
        read_labels(tmp_path / "e.csv")
    pd.DataFrame({"id": ["a", "b", "a"], "label": [0, 1, 2]}).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(ValueError, match=r"dup.csv: row 2: duplicated id 'a'$"):
        read_labels(tmp_path / "dup.csv")
    pd.DataFrame({"id": ["x", "y"], "label": [1.0, 2.0]}).to_csv(tmp_path / "f.csv", index=False)
    s = read_labels(tmp_path / "f.csv")
    assert s.dtype == np.int64 and s.name == "label" and s.index.name == "id" and s.to_dict() == {"x": 1, "y": 2}
