#!/usr/bin/env python3
"""Demo stand-in that fails on purpose, to show how a failure reaches the jobs table."""
import sys
import time

print("parsing quality leads", flush=True)
for step in range(1, 4):
    time.sleep(0.7)
    print(f"parsed page {step}", flush=True)
print("quality_leads.csv: row 1207 has 3 columns, expected 9", file=sys.stderr, flush=True)
sys.exit(2)
