"""Configuration shared by the orchestration tests (overrides of params.yaml)."""

# one teacher, two folds, small demo data, one epoch, 128-token texts: every step runs, in well under
# a minute on 2 idle cores
SMALL = {"folds.n_folds": 2, "models.teachers": ["llama"], "demo.rows": 200, "demo.test_rows": 40,
         "demo.external_rows": 40, "demo.ut_rows": 60, "train_teacher.epochs": 1, "distill.epochs": 1,
         "distill.max_steps": 8,
         "text.train_max_length": 128, "text.infer_max_length": 128, "text.prompt_tokens": 32,
         "orchestration.local_workers": 1}      # tasks in the flow's process: the tests count and time them there
# SLURM on this one node: workers on the loopback interface, two 1-GPU jobs of 3 GB kept for the
# whole run (min_jobs = max_jobs: both folds get a warm worker), an early first checkpoint (the
# scancel test needs a window between the first checkpoint and the end of training)
SLURM = {**SMALL, "orchestration.runner": "slurm", "orchestration.slurm.interface": "lo",
         "orchestration.slurm.memory": "3GB", "orchestration.slurm.min_jobs": 2, "orchestration.slurm.max_jobs": 2,
         "orchestration.slurm.worker_wait_s": 240, "orchestration.retry_delay_s": 1,
         "train_teacher.checkpoint_every": 2}
# SLURM routing: one 1-GPU job (adaptive, min = max = 1) and one CPU-only job (no --gres, no GPU
# resource; orchestration.slurm.cpu_jobs) on the 2-CPU node: GPU steps must all run in the GPU job
ROUTING = {**SLURM, "orchestration.slurm.min_jobs": 1, "orchestration.slurm.max_jobs": 1,
           "orchestration.slurm.cpu_jobs": 1}
