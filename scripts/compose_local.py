#!/usr/bin/env python3
"""Writes docker-compose.yml with docker-compose.local.yml's substitutions
applied, key by key per service (a key given there replaces the key here,
as Compose's own override rules do for image, command and healthcheck),
to the path given. podman-compose 1.0.3 appends list values of an override
file instead of replacing them, hence this merge.

Usage: compose_local.py OUT
"""
import subprocess
import sys

import yaml

# The broker's image, as scripts/podman.sh builds it.
image = subprocess.run(["scripts/nisshi_version.sh", "--image"], stdout=subprocess.PIPE, text=True)
if image.returncode != 0:
    sys.exit(f"compose_local.py: scripts/nisshi_version.sh failed (exit {image.returncode})")
broker_image = image.stdout.strip()

with open("docker-compose.yml") as f:
    base = yaml.safe_load(f)
with open("docker-compose.local.yml") as f:
    local = yaml.safe_load(f)
for name, overrides in local.get("services", {}).items():
    if overrides.get("image") == "localhost/pg2ch/nisshi":
        overrides["image"] = broker_image
    base["services"][name].update(overrides)
with open(sys.argv[1], "w") as f:
    yaml.safe_dump(base, f, sort_keys=False)
