#!/usr/bin/env bash
# Create the work pool and register the deployments of prefect.yaml on the server at PREFECT_API_URL.
#   GDP_HOME=/opt/gdp GDP_ARCHIVE_URI=s3://archive/scans GDP_ARCHIVE_OUTPUT_URI=s3://archive/restored \
#   PREFECT_API_URL=http://127.0.0.1:4200/api bash deployments/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PREFECT=${PREFECT:-.venv/bin/prefect}
export GDP_HOME=${GDP_HOME:-$PWD}
: "${GDP_ARCHIVE_URI:?set GDP_ARCHIVE_URI to the archive prefix of the nightly deployment}"
: "${GDP_ARCHIVE_OUTPUT_URI:?set GDP_ARCHIVE_OUTPUT_URI to where the nightly deployment writes}"
"$PREFECT" work-pool inspect gpu-pool >/dev/null 2>&1 || "$PREFECT" work-pool create gpu-pool --type process
"$PREFECT" --no-prompt deploy --all
