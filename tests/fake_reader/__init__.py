"""In-process simulators of the CPU purse card, the PSAM and the reader (cpu-purse.md §7, §8)."""
