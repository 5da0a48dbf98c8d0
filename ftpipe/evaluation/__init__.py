"""What the evaluate and audit stages measure: task quality per data source (task_metrics), the side-by-side page
(side_by_side), general ability on held-out general text (general_text), the standard harness (harness), gates and
drift against the last release (gates, drift), and what the tuned model memorized (memorization, canaries,
pii_leaks)."""
