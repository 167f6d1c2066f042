#!/usr/bin/env bash
# Idempotent set-up of cytonet in ./.venv (Debian 12, Python 3.11). Usage: bash tools/install.sh [--test]
#   --test   also install the test extras and the system packages the test suite uses (SLURM, munge: root only)
# torch is installed first and pinned through a constraints file for everything else, so pip never resolves
# an unpinned torch (which would pull gigabytes of CUDA wheels). Honoured:
#   CYTONET_TORCH   pip requirement for torch (default torch==2.13.0; e.g. "torch==2.13.0+cu126")
#   PIP_INDEX_URL / PIP_EXTRA_INDEX_URL   as usual for pip (e.g. a CUDA wheel index)
#   an already-installed torch in .venv is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    *) echo "install.sh: unknown option $arg (valid: --test)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
VENV=.venv
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian ships python3 without ensurepip; python3-venv adds it.
    rm -rf "$VENV"
    echo "install.sh: '$PY -m venv' failed; installing python3-venv" >&2
    as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv \
      || { echo "install.sh: cannot create a virtual environment: install python3-venv" >&2; exit 1; }
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q ${CYTONET_TORCH:-torch==2.13.0}
fi
TORCH_VERSION=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$TORCH_VERSION" > "$VENV/constraints.txt"

EXTRAS=""
[ "$WITH_TEST" = 1 ] && EXTRAS="[test]"
STAMP="$VENV/.cytonet-install-$(cat setup.cfg pyproject.toml "$VENV/constraints.txt" | sha1sum | cut -c1-16)${EXTRAS:+-test}"
if [ "$WITH_TEST" = 1 ]; then
  # The SLURM tests bring up a real single-machine cluster (tools/slurm-local/up.sh): slurmctld + slurmd + munge,
  # and slurmdbd + mariadb for sacct, which submitit needs. Root only; elsewhere those tests skip with the reason.
  SLURM_PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
  missing=""
  for p in $SLURM_PKGS; do   # dpkg -s succeeds for removed-but-not-purged packages; dpkg-query does not
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "install.sh: installing Debian packages for the SLURM tests:$missing" >&2
      # The packages' postinst scripts try to start services; policy-rc.d may refuse, which is fine.
      if ! { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
               apt-get install -y -qq --no-install-recommends $missing >/tmp/cytonet-apt.log 2>&1; }; then
        echo "install.sh: WARNING: apt-get failed (see /tmp/cytonet-apt.log); the SLURM tests will skip" >&2
      fi
    else
      echo "install.sh: WARNING: not root: cannot install$missing; the SLURM tests will skip" >&2
    fi
  fi
fi

if [ ! -f "$STAMP" ]; then
  "$VPY" -m pip install -q -c "$VENV/constraints.txt" -e ".$EXTRAS"
  touch "$STAMP"
fi
"$VPY" -c "import torch, cytonet; print(f'cytonet {cytonet.__version__} ready (torch {torch.__version__})')"
