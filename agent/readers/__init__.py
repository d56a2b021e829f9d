"""Reader drivers: the I/O seam between the agent and contactless readers / SAM slots."""
