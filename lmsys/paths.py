"""The artifact layout: the one place that knows where each step reads and writes.

    data/demo/                         embedded demo competition (train.csv, test.csv, external_33k.jsonl, ut.parquet, truth.json)
    artifacts/<profile>/
      prepared/{train,test,external,ut}.parquet + report.json    validated canonical tables
      folds/folds.csv                                            id,fold (-1 = external, training only)
      tokenizer/                                                 tiny profile: BPE trained on the run's text
      post_pretrain/<model>/                                     step 1 adapters (+ score head)
      filter_scores/<model>.parquet                              step 2.5 scores (every training row, once)
      filtered/fold<k>/train_ids.csv + report.json               step 2.5
      teachers/<model>/fold<k>/                                  step 3 adapters, metrics.json
      logits/<model>/fold<k>.parquet                             step 4
      calibration/<model>.json, calibrated/<model>/fold<k>.parquet   step 4.5
      students/fold<k>/                                          step 5
      ensemble/                                                  step 6 merged model
      quantized/                                                 step 7
      predictions/{oof.csv, submission.csv}                      step 8/8.5
    reports/<profile>/                                           step 9 report, metrics, plots
"""
from __future__ import annotations

from pathlib import Path

from lmsys.config import ROOT


class Layout:
    """Paths of one profile's run under `root` (default: the repo)."""

    def __init__(self, profile: str, root: str | Path | None = None):
        self.root = Path(root) if root else ROOT
        self.profile = profile

    @classmethod
    def of(cls, cfg: dict) -> "Layout":
        """The layout of a resolved config: its profile, under its `root` (default: the repo)."""
        return cls(cfg["profile"], cfg.get("root"))

    # inputs
    @property
    def demo_dir(self) -> Path:
        return self.root / "data" / "demo"

    # artifacts
    @property
    def art(self) -> Path:
        return self.root / "artifacts" / self.profile

    @property
    def prepared(self) -> Path:
        return self.art / "prepared"

    @property
    def folds_csv(self) -> Path:
        return self.art / "folds" / "folds.csv"

    @property
    def tokenizer(self) -> Path:
        return self.art / "tokenizer"

    def post_pretrain(self, model: str) -> Path:
        return self.art / "post_pretrain" / model

    def filter_scores(self, model: str) -> Path:
        """Step 2.5's probabilities of every competition + external row under the post-pretrained `model`."""
        return self.art / "filter_scores" / f"{model}.parquet"

    def filtered(self, fold: int) -> Path:
        return self.art / "filtered" / f"fold{fold}"

    def teacher(self, model: str, fold: int) -> Path:
        return self.art / "teachers" / model / f"fold{fold}"

    def logits(self, model: str, fold: int) -> Path:
        return self.art / "logits" / model / f"fold{fold}.parquet"

    def calibration(self, model: str) -> Path:
        return self.art / "calibration" / f"{model}.json"

    def calibrated_logits(self, model: str, fold: int) -> Path:
        return self.art / "calibrated" / model / f"fold{fold}.parquet"

    def student(self, fold: int) -> Path:
        return self.art / "students" / f"fold{fold}"

    @property
    def ensemble(self) -> Path:
        return self.art / "ensemble"

    @property
    def quantized(self) -> Path:
        return self.art / "quantized"

    @property
    def predictions(self) -> Path:
        return self.art / "predictions"

    @property
    def submission(self) -> Path:
        return self.predictions / "submission.csv"

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.profile

    @property
    def last_run(self) -> Path:
        """JSON naming the final model and outputs of the last pipeline run of this profile."""
        return self.predictions / "last_run.json"
