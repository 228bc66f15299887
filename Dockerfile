# syntax=docker/dockerfile:1
#
# The supaworker image: the worker binary, Python 3 with a virtual environment for the job
# scripts, and the scripts themselves, copied from ./scripts-repo (see scripts-repo/README.md).
#
#   docker build -t supaworker .
#   docker run --rm --env-file .env supaworker check
#
# Both stages use Debian 12 "bookworm": a binary built on a newer glibc than the runtime
# image has fails at start with "version `GLIBC_2.xx' not found".

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the crates.io downloads and the target folder between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p supaworker \
    && cp target/release/supaworker /usr/local/bin/supaworker

FROM debian:bookworm-slim AS runtime
# python3-venv provides `python3 -m venv`; tini reaps the orphaned grandchildren of jobs
# when the worker is PID 1 in plain docker (on fly.io, fly's own init is PID 1).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 supaworker \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin supaworker
COPY --from=build /usr/local/bin/supaworker /usr/local/bin/supaworker
# Fails the build when the binary cannot run on this image (a glibc mismatch, for example).
RUN /usr/local/bin/supaworker --version

WORKDIR /app
COPY --chown=10001:10001 scripts-repo/ /app/
RUN chown 10001:10001 /app
USER 10001:10001
RUN python3 -m venv /app/.venv \
    && if [ -f /app/requirements.txt ]; then \
         /app/.venv/bin/pip install --no-cache-dir --disable-pip-version-check -r /app/requirements.txt; \
       fi

ENV HOME=/app \
    SUPAWORKER_SCRIPTS_DIR=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    TINI_SUBREAPER=1
# Exec form, so the signal reaches tini, which forwards it to the worker; a shell wrapper
# would swallow it. TINI_SUBREAPER lets tini reap orphans also where it is not PID 1.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/supaworker"]
CMD ["run"]
