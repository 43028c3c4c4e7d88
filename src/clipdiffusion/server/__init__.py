"""HTTP API (AUTOMATIC1111-compatible subset plus our own routes) and the web page."""
