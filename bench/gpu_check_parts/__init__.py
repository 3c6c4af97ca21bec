"""The parts of bench/gpu_check.py: each measures one path and returns rows for the table."""
