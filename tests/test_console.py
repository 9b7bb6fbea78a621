"""What a user sees of `lmsys run`: task lines and the ETA (flows/console.py), the report artifact's
plots inlined (flows/pipeline.embed_images), metrics that an identical rerun writes identically
(lmsys.metrics.rounded), and a git revision that the run's own outputs do not make dirty."""
from __future__ import annotations

import base64
import io
import json
import subprocess

from flows.console import Progress, previous_seconds
from flows.pipeline import embed_images
from lmsys.revision import git_rev
from lmsys.metrics import rounded


def test_progress_prints_one_line_per_task_and_eta_from_the_previous_run(tmp_path):
    out = io.StringIO()
    prev = tmp_path / "flow_run.json"
    prev.write_text(json.dumps({"records": [{"task": "a", "state": "Completed", "seconds": 10.0},
                                            {"task": "b", "state": "Completed", "seconds": 30.0},
                                            {"task": "c", "state": "Cached", "seconds": 0.1}]}))
    expected = previous_seconds(prev)
    assert expected == {"a": 10.0, "b": 30.0}                    # cache hits say nothing of the work
    p = Progress(["a", "b"], expected, stream=out)
    p.task_done("a", "Completed", 9.5)
    assert p.eta_s() == 30.0                                      # b's time in the previous run
    p.report()
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["a", "Completed", "9.5", "s"]
    assert lines[1].startswith("[1/2 tasks, 50%]") and lines[1].endswith("ETA 30 s")
    p.task_done("b", "Cached", 0.0)
    p.report()
    assert out.getvalue().splitlines()[-1].startswith("[2/2 tasks, 100%]")
    assert "ETA" not in out.getvalue().splitlines()[-1]


def test_eta_without_a_previous_run_uses_the_mean_task_time():
    p = Progress(["a", "b", "c"], {}, stream=io.StringIO())
    p.t0 -= 20.0                                                  # 20 s elapsed, one task done
    p.task_done("a", "Completed", 20.0)
    assert 39.0 < p.eta_s() < 42.0                                # two tasks left at ~20 s each


def test_report_images_become_data_uris(tmp_path):
    png = b"\x89PNG\r\n\x1a\nfake"
    (tmp_path / "reliability.png").write_bytes(png)
    md = "# r\n\n![reliability](reliability.png)\n\n![missing](nope.png)\n"
    out = embed_images(md, tmp_path)
    assert f"![reliability](data:image/png;base64,{base64.b64encode(png).decode()})" in out
    assert "![missing](nope.png)" in out                          # left as it was, not dropped


def test_rounded_metrics_are_stable_in_the_last_digits():
    a = {"x": 0.8361234567891, "y": [1.0000000001, 2], "z": {"w": 3.5}, "s": "t"}
    b = {"x": 0.8361234567893, "y": [1.0000000004, 2], "z": {"w": 3.5}, "s": "t"}
    assert json.dumps(rounded(a)) == json.dumps(rounded(b))
    assert rounded(a)["x"] == 0.836123


def test_git_rev_is_not_dirtied_by_the_runs_own_outputs(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    rev = git_rev(tmp_path)
    assert len(rev) == 40
    (tmp_path / "reports" / "metrics.json").write_text('{"a": 1}')   # what a run writes
    assert git_rev(tmp_path) == rev
    (tmp_path / "code.py").write_text("x = 2\n")                      # an edit of the code
    assert git_rev(tmp_path) == rev + "+dirty"


def test_quiet_console_drops_gptqmodel_banner_but_keeps_its_warnings():
    """A worker of the quiet console imports gptqmodel (as peft does when it builds LoRA layers): no
    banner, no GIL advice on stdout/stderr; a warning through gptqmodel's logger still shows."""
    import subprocess
    import sys

    from pinned import pinned_import
    pinned_import("gptqmodel", "gptqmodel")
    code = ("from lmsys.console import quiet_console; quiet_console()\n"
            "import gptqmodel\n"
            "from gptqmodel.utils.logger import setup_logger\n"
            "setup_logger().warning('a gptqmodel warning')\n")
    loud = subprocess.run([sys.executable, "-c", "import gptqmodel"], capture_output=True, text=True, timeout=300)
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "GPT-QModel" in loud.stdout + loud.stderr          # the banner this test is about
    out = quiet.stdout + quiet.stderr
    assert "GPT-QModel" not in out and "GIL is enabled" not in out, out
    assert "a gptqmodel warning" in out, out


def test_step_commands_are_quiet_as_dvc_repro_runs_them(tmp_path):
    """`dvc repro` runs each stage as its step command: the stack's known noise (torchao's failed CUDA
    library loads, torch's pytree deprecations) and progress bars (stderr is no terminal) stay off its
    log; --verbose (-v) brings the bars and the INFO lines back; an error still prints."""
    import os
    import subprocess
    import sys
    root = str(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"} | {"HF_HUB_OFFLINE": "1"}

    def step(*args):
        r = subprocess.run([sys.executable, "-m", "lmsys.cli", *args, "--root", root], capture_output=True, text=True,
                           timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return r
    for args in (("step", "demo-data"), ("prepare",), ("tokenizer",)):
        step(*args)
    quiet = step("post-pretrain", "--model", "llama")
    assert "torchao" not in quiet.stderr and "pytree" not in quiet.stderr and "it/s" not in quiet.stderr, quiet.stderr
    assert quiet.stderr.strip() == "", quiet.stderr
    loud = step("-v", "post-pretrain", "--model", "qwen")
    assert "post-pretrain qwen" in loud.stderr                        # its progress bar
    bad = subprocess.run([sys.executable, "-m", "lmsys.cli", "post-pretrain", "--model", "nobody", "--root", root],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.startswith("error:"), bad.stderr
