"""espmed.runtimes: run exported artifacts with numpy + a backend (no torch)."""
