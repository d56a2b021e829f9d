"""Card products: sans-I/O protocol machines (CPU purse; M1 purse)."""
