"""Training: the loop, its optimizer and schedule, checkpoints and the run report."""
