"""lmsys-pipeline: the LMSYS Arena preference recipe as plain step functions (no Prefect, no DVC here)."""
__version__ = "0.1.0"
