#!/usr/bin/env python3
"""Demo stand-in for the campaign sender. Only --dry-run is implemented: it never sends."""
import argparse
import sys
import time

parser = argparse.ArgumentParser()
mode = parser.add_mutually_exclusive_group(required=True)
mode.add_argument("--dry-run", action="store_true")
mode.add_argument("--send", action="store_true")
parser.add_argument("--company", required=True)
parser.add_argument("--message", required=True)
parser.add_argument("--delay", type=float, default=1.0)
args = parser.parse_args()

if args.send:
    print("this demo script does not send SMS; use your real send_campaign.py", file=sys.stderr)
    sys.exit(3)

recipients = ["+15550000001", "+15550000002", "+15550000003"]
print(f"dry run for {args.company}: {len(recipients)} recipients", flush=True)
for number in recipients:
    text = args.message.replace("{company}", args.company)
    print(f"would send to {number}: {text}", flush=True)
    time.sleep(min(args.delay, 1.0))
print("dry run finished, nothing was sent", flush=True)
