#!/usr/bin/env bash
# Try the newest releases of the test oracles (requirements/test.in) in a scratch venv, beside the same torch, and
# report which versions would change and whether the test suite still passes. Nothing in .venv or the lock changes,
# unless --lock is given and the suite passes: then requirements/test.txt is rewritten from the scratch venv, for a
# commit of its own ("tests: upgrade the oracles to ...").
#
#     bash scripts/test_upgrade.sh            # make test-upgrade
#     bash scripts/test_upgrade.sh --lock     # make test-lock
set -uo pipefail
cd "$(dirname "$0")/.."

LOCK_IT=0
[ "${1:-}" = "--lock" ] && LOCK_IT=1
VENV=${UPGRADE_VENV:-.venv-upgrade}
TORCH=${TORCH:-torch==2.13.0}
PY=${PYTHON:-python3}

rm -rf "$VENV"
"$PY" -m venv "$VENV" || exit 1
pip() { "$VENV/bin/pip" "$@"; }
pip install -q --upgrade pip || exit 1
[ -n "$TORCH" ] && { pip install -q "$TORCH" || exit 1; }
"$VENV/bin/python" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$VENV/constraints.txt"

# test.in: packages installed with their dependencies first; after the "# Installed without" line, with --no-deps.
WITH_DEPS=$(awk '/^# Installed without/ {exit} !/^#/ && NF' requirements/test.in)
NO_DEPS=$(awk 'found && !/^#/ && NF; /^# Installed without/ {found=1}' requirements/test.in)
# shellcheck disable=SC2086
pip install -q -c "$VENV/constraints.txt" -e . $WITH_DEPS || { echo "test-upgrade: the newest oracles do not install together" >&2; exit 1; }
# shellcheck disable=SC2086
pip install -q -c "$VENV/constraints.txt" --no-deps $NO_DEPS || exit 1

NEW="$VENV/test.txt"
pip freeze --exclude-editable | grep -v -e '^torch==' -e '^minigen' | sort -f > "$NEW"
echo "== versions that would change (- locked, + newest) =="
diff <(grep -v '^#' requirements/test.txt | sort -f) "$NEW" | grep '^[<>]' | sed 's/^</-/; s/^>/+/' || echo "(none)"

echo "== test suite with the newest oracles =="
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider
rc=$?
if [ "$rc" -ne 0 ]; then
  echo "test-upgrade: the suite FAILS with the newest oracles (exit $rc); the lock stays as it is" >&2
  exit "$rc"
fi
echo "test-upgrade: the suite passes with the newest oracles"
if [ "$LOCK_IT" = 1 ]; then
  { sed -n '1,/^[^#]/p' requirements/test.txt | grep '^#'; cat "$NEW"; } > requirements/test.txt.new
  mv requirements/test.txt.new requirements/test.txt
  echo "wrote requirements/test.txt: commit it on its own"
fi
