"""Model helpers: loading, batches, loss and generation; GPU peak figures."""
