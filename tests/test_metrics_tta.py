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
            (p, [-1, 3], r"^labels must be 0, 1 or 2; got \[-1, 3\]$"),
            (p, [1, 5], r"^labels must be 0, 1 or 2; got \[5\]$")]:
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
    w = pd.DataFrame({"id": [1, 2, 3], "winner_model_a": [0, 1, "x"], "winner_model_b": [1, 0, 0], "winner_tie": [0, 0, 1]})
    w.to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(ValueError, match=r"x.csv: row 2: winner columns \['x', (np.int64\()?0\)?, (np.int64\()?1\)?\] must be 0/1 with exactly one 1$"):
        read_labels(tmp_path / "x.csv")
    w = pd.DataFrame({"id": [1, 2], "winner_model_a": [0, 2], "winner_model_b": [1, 0], "winner_tie": [0, 0]})
    w.to_csv(tmp_path / "v.csv", index=False)
    with pytest.raises(ValueError, match=r"v.csv: row 1: winner columns \[2, 0, 0\] must be 0/1 with exactly one 1$"):
        read_labels(tmp_path / "v.csv")
    pd.DataFrame({"id": [1], "winner_model_a": [1]}).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(ValueError, match=r"e.csv: needs `label` or the winner columns \(missing \['winner_model_b', 'winner_tie'\]\)$"):
        read_labels(tmp_path / "e.csv")
    pd.DataFrame({"id": ["a", "b", "a"], "label": [0, 1, 2]}).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(ValueError, match=r"dup.csv: row 2: duplicated id 'a'$"):
        read_labels(tmp_path / "dup.csv")
    pd.DataFrame({"id": ["x", "y"], "label": [1.0, 2.0]}).to_csv(tmp_path / "f.csv", index=False)
    s = read_labels(tmp_path / "f.csv")
    assert s.dtype == np.int64 and s.name == "label" and s.index.name == "id" and s.to_dict() == {"x": 1, "y": 2}


# ---------------------------------------------------------------- what the plots and the report contain
# (the Figure each plot function draws, captured at lmsys.metrics._save; the report's text exactly)

@pytest.fixture
def figures(monkeypatch):
    """Figures passed to lmsys.metrics._save (still written), in call order."""
    import lmsys.metrics
    seen, save = [], lmsys.metrics._save

    def capture(fig, path):
        seen.append(fig)
        return save(fig, path)
    monkeypatch.setattr(lmsys.metrics, "_save", capture)
    return seen


def _legend(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_reliability_plot_draws_the_bins(tmp_path, figures):
    from matplotlib.colors import to_rgba
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3], [0.9, 0.05, 0.05]])
    y = np.array([0, 0, 1, 0])          # 2 bins: (0, .5]: row 2 (right); (.5, 1]: rows 0, 1, 3 (2 right)
    out = plot_reliability(p, y, tmp_path / "r.png", n_bins=2)
    assert out == tmp_path / "r.png" and out.read_bytes()[:8] == PNG
    (fig,) = figures
    assert tuple(fig.get_size_inches()) == (4.5, 4.5)
    (ax,) = fig.axes
    diag, line = ax.lines
    assert list(diag.get_xdata()) == [0, 1] and list(diag.get_ydata()) == [0, 1] and diag.get_linestyle() == "--"
    assert to_rgba(diag.get_color()) == to_rgba("grey")
    np.testing.assert_allclose(line.get_xdata(), [0.4, (0.7 + 0.7 + 0.9) / 3])
    np.testing.assert_allclose(line.get_ydata(), [1.0, 2 / 3])
    assert line.get_marker() == "o" and line.get_linestyle() == "-" and to_rgba(line.get_color()) == to_rgba("C3")
    bars = ax.patches
    assert len(bars) == 2
    np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in bars], [0.25, 0.75])
    np.testing.assert_allclose([b.get_width() for b in bars], [0.5, 0.5])
    np.testing.assert_allclose([b.get_height() for b in bars], [1.0, 2 / 3])
    assert bars[0].get_alpha() == 0.6 and tuple(bars[0].get_edgecolor()) == (0.0, 0.0, 0.0, 0.6)   # black edges
    assert ax.get_xlabel() == "confidence (top label)" and ax.get_ylabel() == "accuracy"
    assert ax.get_xlim() == (0, 1) and ax.get_ylim() == (0, 1)
    assert ax.get_title() == f"reliability, ECE={ece(p, y, 2):.4f}"
    assert _legend(ax) == ["perfect", "(confidence, accuracy)", "accuracy"]
    assert ax.get_legend()._loc == 2                                     # upper left
    assert ax.get_legend().get_texts()[0].get_fontsize() == 8
    figures.clear()
    plot_reliability(p, y, tmp_path / "r15.png")                         # default 15 bins: 3 used
    assert len(figures[0].axes[0].patches) == 3
    np.testing.assert_allclose([b.get_width() for b in figures[0].axes[0].patches], [1 / 15] * 3)


def test_fold_losses_plot_draws_each_fold_and_the_mean(tmp_path, figures):
    from matplotlib.colors import to_rgba
    out = plot_fold_losses({0: 0.9, "f1": 0.95, 2: 0.88}, tmp_path / "f.png")
    assert out == tmp_path / "f.png" and out.read_bytes()[:8] == PNG
    (fig,) = figures
    np.testing.assert_allclose(fig.get_size_inches(), (4.4, 3.5))        # max(4, 0.8 * 3 + 2)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "f1", "2"]
    np.testing.assert_allclose([b.get_height() for b in ax.patches], [0.9, 0.95, 0.88])
    assert all(to_rgba(b.get_facecolor()) == to_rgba("C0") for b in ax.patches)
    (mean,) = ax.lines
    np.testing.assert_allclose(mean.get_ydata(), [0.91, 0.91])
    assert mean.get_linestyle() == "--" and to_rgba(mean.get_color()) == to_rgba("C3")
    assert _legend(ax) == ["mean 0.9100"] and ax.get_legend().get_texts()[0].get_fontsize() == 8
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("fold", "log loss", "validation log loss per fold")
    figures.clear()
    plot_fold_losses({k: 1.0 for k in range(8)}, tmp_path / "g.png")
    np.testing.assert_allclose(figures[0].get_size_inches(), (8.4, 3.5))
    figures.clear()
    plot_fold_losses({0: 1.0}, tmp_path / "h.png")
    np.testing.assert_allclose(figures[0].get_size_inches(), (4, 3.5))
    with pytest.raises(ValueError, match=r"^no fold losses to plot$"):
        plot_fold_losses({}, tmp_path / "e.png")


def test_confusion_plot_counts_and_fractions(tmp_path, figures):
    p = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    y = np.array([0, 0, 0, 1, 2])       # predicted 0, 0, 1, 2, 0
    out = plot_confusion(p, y, tmp_path / "c.png")
    assert out == tmp_path / "c.png" and out.read_bytes()[:8] == PNG
    (fig,) = figures
    np.testing.assert_allclose(fig.get_size_inches(), (4, 3.6))
    (ax,) = fig.axes
    (im,) = ax.images
    np.testing.assert_allclose(im.get_array(), [[2 / 3, 1 / 3, 0], [0, 0, 1], [1, 0, 0]])
    assert im.get_cmap().name == "Blues" and im.get_clim() == (0, 1)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert len(texts) == 9
    assert texts[(0, 0)].get_text() == "2\n0.67" and texts[(0, 1)].get_text() == "1\n0.33"
    assert texts[(1, 2)].get_text() == "1\n1.00" and texts[(2, 2)].get_text() == "0\n0.00"
    assert texts[(0, 0)].get_color() == "white" and texts[(0, 1)].get_color() == "black"
    assert texts[(1, 1)].get_color() == "black" and texts[(2, 0)].get_color() == "white"
    assert all(t.get_ha() == "center" and t.get_va() == "center" and t.get_fontsize() == 8 for t in ax.texts)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "B", "tie"] == [t.get_text() for t in ax.get_yticklabels()]
    assert list(ax.get_xticks()) == [0, 1, 2] == list(ax.get_yticks())
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("predicted", "true", "confusion (argmax)")
    figures.clear()
    half = np.array([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])
    plot_confusion(half, np.array([0, 0]), tmp_path / "h.png")          # a fraction of exactly 0.5: black
    t = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in figures[0].axes[0].texts}
    assert t[(0, 0)].get_text() == "1\n0.50" and t[(0, 0)].get_color() == "black"
    assert figures[0].axes[0].images[0].get_clim() == (0, 1)            # fixed scale, not the data's (0, 0.5)
    figures.clear()
    y9 = np.repeat([0, 1, 2], 4)                                        # every (true, predicted) pair present
    p9 = np.eye(3)[[0, 0, 1, 2, 1, 1, 0, 2, 2, 2, 0, 1]] * 0.5 + 0.5 / 3
    plot_confusion(p9, y9, tmp_path / "n.png")
    assert figures[0].axes[0].images[0].get_array().min() > 0
    assert figures[0].axes[0].images[0].get_clim() == (0, 1)
    with pytest.raises(ValueError, match=r"^labels must be \[2\]"):
        plot_confusion(half, np.array([0]), tmp_path / "x.png")


def test_plot_files_are_png_at_100_dpi(tmp_path):
    from PIL import Image
    p, y = sample(50, 5)
    with Image.open(plot_reliability(p, y, tmp_path / "r.png")) as im:
        assert im.format == "PNG"
        assert im.info.get("dpi", (100, 100))[0] == pytest.approx(100, abs=0.5)
        w, h = im.size
    assert 300 < w < 450 and 300 < h < 450                               # 4.5 in at 100 dpi, tight bbox
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_rounded_and_report_text_exact(tmp_path):
    from lmsys.metrics import rounded
    obj = {"a": 0.123456789, "b": [np.float32(0.5), (1.23456789, "x")], "c": {"d": np.float64(2 / 3)}, "n": 3, "s": "t"}
    assert rounded(obj) == {"a": 0.123457, "b": [0.5, [1.234568, "x"]], "c": {"d": 0.666667}, "n": 3, "s": "t"}
    assert rounded(obj, 2) == {"a": 0.12, "b": [0.5, [1.23, "x"]], "c": {"d": 0.67}, "n": 3, "s": "t"}
    assert type(rounded(np.float32(0.25))) is float and rounded(True) is True and rounded(None) is None
    (tmp_path / "img").mkdir()
    img = tmp_path / "img" / "plot.png"
    img.write_bytes(PNG)
    rep = write_report(tmp_path / "out", {
        "metrics": {"log_loss": 0.98765, "n": 3, "name": "m"},
        "folds": {"fold 0": {"log_loss": 0.9, "acc": np.float32(0.5)}, "fold 1": {"log_loss": 0.95}},
        "plots": [img, "after the plot"],
        "notes": "free *markdown*"}, title="T")
    assert rep == tmp_path / "out" / "report.md"
    assert rep.read_text() == (
        "# T\n\n"
        "## metrics\n\n| metric | value |\n|---|---|\n| log_loss | 0.9877 |\n| n | 3 |\n| name | m |\n\n"
        "## folds\n\n| | log_loss | acc |\n|---|---|---|\n| fold 0 | 0.9000 | 0.5000 |\n| fold 1 | 0.9500 |  |\n\n"
        "## plots\n\n![plot](../img/plot.png)\n\nafter the plot\n\n"
        "## notes\n\nfree *markdown*\n")
    assert write_report(tmp_path / "out2", {}).read_text() == "# Evaluation report\n"
    with pytest.raises(TypeError, match=r"^report item of type int: use str, dict, Path or a list of them$"):
        write_report(tmp_path / "out3", {"bad": 3})
    assert not (tmp_path / "out3" / "report.md").exists()


def test_log_loss_bounds_and_reliability_bins_exact():
    from lmsys.metrics import reliability_bins
    p = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert log_loss(p, [0, 1]) == pytest.approx(-np.log(1 - 1e-15), abs=1e-18)   # upper clip 1 - 1e-15
    assert log_loss(p, [1, 0]) == pytest.approx(-np.log(1e-15), rel=1e-12)
    assert log_loss(p, np.array([0.0, 1.0])) == log_loss(p, [0, 1])                 # float labels accepted
    assert accuracy(p, [0, 0]) == 0.5
    q = np.array([[0.34, 0.33, 0.33], [0.5, 0.3, 0.2], [0.51, 0.3, 0.19], [1.0, 0.0, 0.0], [0.2, 0.2, 0.6]])
    count, conf, acc = reliability_bins(q, [0, 1, 0, 0, 2], 2)
    np.testing.assert_array_equal(count, [2, 3])                        # 0.34, 0.5 | 0.51, 1.0, 0.6
    np.testing.assert_allclose(conf, [0.42, (0.51 + 1.0 + 0.6) / 3])
    np.testing.assert_allclose(acc, [0.5, 1.0])
    count, conf, acc = reliability_bins(q, [0, 1, 0, 0, 2], 4)          # an empty bin: zeros, no NaN
    np.testing.assert_array_equal(count, [0, 2, 2, 1])
    np.testing.assert_allclose(conf, [0, 0.42, 0.555, 1.0])
    np.testing.assert_allclose(acc, [0, 0.5, 1, 1])
    assert count.dtype == np.float64 and len(reliability_bins(q, [0] * 5, 1)[0]) == 1
    assert ece(q, [0, 1, 0, 0, 2], n_bins=1) == pytest.approx(abs(4 / 5 - q.max(1).mean()))
    s = summarize(q, [0, 1, 0, 0, 2], n_bins=1)
    assert s["ece"] == pytest.approx(abs(4 / 5 - q.max(1).mean())) and s["n"] == 5
    assert summarize(q, [0, 1, 0, 0, 2])["ece"] == pytest.approx(ece(q, [0, 1, 0, 0, 2], 15))
    np.testing.assert_allclose(softmax(np.array([[0.0, np.log(3.0)], [1e4, 0.0]])), [[0.25, 0.75], [1.0, 0.0]])
    np.testing.assert_allclose(softmax(np.array([0.0, np.log(3.0)])), [0.25, 0.75])           # one row, 1-D
    p32, y32 = q.astype(np.float32), np.array([0, 1, 0, 0, 2])
    assert log_loss(p32, y32) == log_loss(p32.astype(np.float64), y32)                        # probabilities read as float64
    z32 = np.array([[0.3, -1.2, 2.5]], dtype=np.float32)
    assert np.array_equal(softmax(z32), softmax(z32.astype(np.float64)))                       # computed in float64
    p, y = sample(2000, 9)
    assert ece(p, y) == ece(p, y, 15) != ece(p, y, 16)                                           # 15 bins by default


def test_row_losses_and_paired_bootstrap():
    from lmsys.metrics import paired_bootstrap, row_losses
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.ones(3), 50)
    y = rng.integers(0, 3, 50)
    r = row_losses(p, y)
    assert r.shape == (50,) and r.mean() == pytest.approx(log_loss(p, y), abs=1e-12)
    assert r[7] == pytest.approx(-np.log(p[7, y[7]]))
    same = paired_bootstrap(r, r)
    assert (same["mean"], same["lo"], same["hi"], same["n"]) == (0.0, 0.0, 0.0, 50)
    shifted = paired_bootstrap(r + 0.25, r)                  # a constant gap has no spread
    assert shifted["lo"] == pytest.approx(0.25) and shifted["hi"] == pytest.approx(0.25)
    gap = rng.normal(0.1, 1.0, 50)
    noisy = paired_bootstrap(r + gap, r, n_boot=4000, seed=1)
    assert noisy["mean"] == pytest.approx(gap.mean()) and noisy["lo"] < noisy["mean"] < noisy["hi"]
    assert noisy["hi"] - noisy["lo"] == pytest.approx(2 * 1.96 * gap.std() / np.sqrt(50), rel=0.15)   # ~ normal theory
    half = paired_bootstrap(r + gap, r, n_boot=4000, seed=1, level=0.5)
    assert noisy["lo"] < half["lo"] < half["hi"] < noisy["hi"]
    with pytest.raises(ValueError, match="equal 1-d"):
        paired_bootstrap(r[None, :], r[None, :])
