"""The SAM seam: a hardware PSAM over a reader slot, or a software SAM (test keys only)."""
