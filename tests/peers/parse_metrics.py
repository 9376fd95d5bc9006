#!/usr/bin/env python3
"""Reads an OpenMetrics scrape on stdin with the Prometheus client library's own parser (which
raises on anything malformed) and prints its samples as JSON: {name: [[labels, value], ...]}."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.setdefault(s.name, []).append([s.labels, s.value])
print(json.dumps(out))
