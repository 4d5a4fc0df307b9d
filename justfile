# pg2ch tasks. On a fresh machine: `just demo`, `just test`.

set shell := ["bash", "-euo", "pipefail", "-c"]

# Install what the local services need and is missing (idempotent).
setup:
    scripts/setup.sh

# Start PostgreSQL, ClickHouse and a broker (compose, or local processes); env in target/stack.env.
up: setup
    scripts/stack.sh up

# Stop the services.
down:
    scripts/stack.sh down

# Seed 100,000 rows, move them with `run --once`, verify, report.
demo: setup
    scripts/demo.sh

# The whole test suite against real services.
test *ARGS: setup
    scripts/test.sh {{ARGS}}

# Criterion benchmarks.
bench: setup
    PG2CH_STACK_CHDB=off scripts/stack.sh up
    source target/stack.env && cargo bench
