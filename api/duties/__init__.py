"""Background duties of the API processes: leases and the loops that run under them."""
