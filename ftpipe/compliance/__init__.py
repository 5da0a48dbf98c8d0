"""The license gate: licenses concluded from declarations, and what ftpipe knows of each license."""
