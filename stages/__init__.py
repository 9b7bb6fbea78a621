"""The DVC side of the pipeline: dvc.yaml generated from the recipe table (lmsys.steps.recipe), the
counterpart of tasks/ (the Prefect side); the lineage a flow run records in dvc.lock; `lmsys data add`."""
