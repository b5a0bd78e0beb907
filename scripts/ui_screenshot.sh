#!/usr/bin/env bash
# Headless-Chromium screenshot of the Prefect UI: the browser check that a run is visible.
#
#   scripts/ui_screenshot.sh [URL] [OUT.png]
#     URL  default http://127.0.0.1:4200/runs   (start the server first: `trimpi ui` or `make ui`)
#     OUT  default reports/prefect-ui.png
#
# Needs Debian's `chromium`; when it is missing the script installs it with apt-get
# (as root, or through sudo). Chromium runs with --no-sandbox because CI containers run as
# root; it only ever loads the local UI URL. The UI is a single-page app that fetches its data
# after load, so the script gives it a virtual-time budget before capturing.
set -euo pipefail
URL="${1:-http://127.0.0.1:4200/runs}"
OUT="${2:-reports/prefect-ui.png}"
BUDGET_MS="${UI_SCREENSHOT_BUDGET_MS:-20000}"
SIZE="${UI_SCREENSHOT_SIZE:-1440,900}"   # width,height of the window (a long artifact page needs more height)

browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
  echo "ui_screenshot: installing Debian's chromium (apt-get) ..." >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  browser="$(command -v chromium)"
fi

api="$(python3 -c 'import sys,urllib.parse as u; p=u.urlsplit(sys.argv[1]); print(f"{p.scheme}://{p.netloc}/api/health")' "$URL")"
if ! curl -fsS --max-time 5 "$api" >/dev/null 2>&1 && \
   ! python3 -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$api" 2>/dev/null; then
  echo "ui_screenshot: no Prefect server answering at $api (start it with: trimpi ui)" >&2
  exit 2
fi

mkdir -p "$(dirname "$OUT")"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$browser" --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage --hide-scrollbars \
  --no-first-run --no-default-browser-check --user-data-dir="$profile" \
  --window-size="$SIZE" --virtual-time-budget="$BUDGET_MS" --screenshot="$OUT" "$URL" >/dev/null 2>&1 || true
if [ ! -s "$OUT" ]; then
  echo "ui_screenshot: chromium produced no screenshot at $OUT" >&2
  exit 1
fi
echo "ui_screenshot: $URL -> $OUT"
