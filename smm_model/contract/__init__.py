"""The site-server contract, the one place both sides read: protocol objects, wire names, run-folder format, label facts, aggregate statistics, strict JSON and atomic writes."""
