#!/usr/bin/env python3
"""Demo stand-in for the lead pipeline's SMS list builder: prints progress for a few seconds."""
import argparse
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--include-unknown-phone-type", action="store_true")
args = parser.parse_args()

print(f"job {os.environ.get('SUPAWORKER_JOB_ID')}: building the SMS list", flush=True)
print(f"include unknown phone types: {args.include_unknown_phone_type}", flush=True)
for step in range(1, 5):
    time.sleep(0.8)
    print(f"scanned {step * 250} leads", flush=True)
print("wrote sms_list.csv with 812 numbers", flush=True)
