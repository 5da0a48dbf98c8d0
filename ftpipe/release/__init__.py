"""The release: report rendering and charts, model cards, the CycloneDX BOM, `python -m ftpipe.release.verify`."""
