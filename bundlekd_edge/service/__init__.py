"""`bkd-edge serve` (a loaded student behind HTTP) and its client."""
