"""The common frame of every stage: errors, atomic I/O and hashes, params, paths, provenance, the stage frame."""
