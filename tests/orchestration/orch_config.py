"""Configuration shared by the orchestration tests (overrides of params.yaml)."""

# one teacher, two folds, small demo data, one epoch, 128-token texts: every step runs, in well under
# a minute on 2 idle cores
SMALL = {"folds.n_folds": 2, "models.teachers": ["llama"], "demo.rows": 200, "demo.test_rows": 40,
         "demo.external_rows": 40, "demo.ut_rows": 60, "train_teacher.epochs": 1, "distill.epochs": 1,
         "distill.max_steps": 8,
         "text.train_max_length": 128, "text.infer_max_length": 128, "text.prompt_tokens": 32}
# The caching tests' pipeline: SMALL with a post-pretraining and teacher training that do some real work
# (~20 s first run on 2 cores instead of ~8 s). Their rerun bound (<= 10% of the first run's wall) is
# about the work caching skips; a synchronous Prefect 3.9 flow run cannot return in under ~1 s whatever
# it does (its heartbeat thread, started with the flow, sleeps in 1 s steps and is joined at exit), so a
# first run under ~11 s could not meet the bound even with every task cached. Only the first run pays
# for this: the parameter and code reruns start downstream of the teachers.
CACHING = {**SMALL, "demo.ut_rows": 1000, "train_teacher.epochs": 6}
# SLURM on this one node: workers on the loopback interface, two 1-GPU jobs of 3 GB kept for the
# whole run (min_jobs = max_jobs: both folds get a warm worker), an early first checkpoint (the
# scancel test needs a window between the first checkpoint and the end of training)
SLURM = {**SMALL, "orchestration.runner": "slurm", "orchestration.slurm.interface": "lo",
         "orchestration.slurm.memory": "3GB", "orchestration.slurm.min_jobs": 2, "orchestration.slurm.max_jobs": 2,
         "orchestration.slurm.worker_wait_s": 240, "orchestration.retry_delay_s": 1,
         "train_teacher.checkpoint_every": 2}
