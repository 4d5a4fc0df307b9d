#!/usr/bin/env python3
"""Writes docker-compose.yml with docker-compose.local.yml's substitutions
applied, key by key per service (a key given there replaces the key here,
as Compose's own override rules do for image, command and healthcheck),
to the path given. podman-compose 1.0.3 appends list values of an override
file instead of replacing them, hence this merge.

Usage: compose_local.py OUT
"""
import sys

import yaml

with open("docker-compose.yml") as f:
    base = yaml.safe_load(f)
with open("docker-compose.local.yml") as f:
    local = yaml.safe_load(f)
for name, overrides in local.get("services", {}).items():
    base["services"][name].update(overrides)
with open(sys.argv[1], "w") as f:
    yaml.safe_dump(base, f, sort_keys=False)
