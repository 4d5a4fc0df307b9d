#!/usr/bin/env python3
"""Writes docker-compose.yml with docker-compose.local.yml's substitutions
applied, key by key per service (a key given there replaces the key here,
as Compose's own override rules do for image, command and healthcheck),
to the path given. podman-compose 1.0.3 appends list values of an override
file instead of replacing them, hence this merge.

Usage: compose_local.py OUT
"""
import re
import sys

import yaml

# The broker's image is tagged with the vendored nisshi's version, as
# scripts/podman.sh builds it (0.8.1-pg2ch.N for 0.8.1+pg2ch.N).
with open("vendor/nisshi/Cargo.toml") as f:
    nisshi = re.search(r'^version = "(0\.8\.1\+pg2ch\.[0-9]+)"$', f.read(), re.M)
if not nisshi:
    sys.exit("compose_local.py: no 0.8.1+pg2ch.N version in vendor/nisshi/Cargo.toml")
broker_image = "localhost/pg2ch/nisshi:" + nisshi.group(1).replace("+", "-")

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
