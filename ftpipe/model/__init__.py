"""Model helpers: loading, batches, loss and generation (modeling); a training step, its batches and its
throughput (training); checkpoints, their retention and the run fingerprint (checkpoints); GPU peaks (gpu)."""
