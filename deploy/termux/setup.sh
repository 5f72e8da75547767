#!/data/data/com.termux/files/usr/bin/bash
# Android phone as an expert node (or coordinator), in Termux (F-Droid build).
#   bash setup.sh /path/to/moemesh-source
# Installs the toolchain, builds moemesh, and starts a node on boot with Termux:Boot.
set -euo pipefail
SRC=${1:-$HOME/moemesh}
pkg update -y
# clang/cmake/ninja build the native kernels (NEON path); numpy, grpcio and cryptography come
# prebuilt from Termux's repository; rust builds `tokenizers`, which has no Android wheel.
pkg install -y python clang cmake ninja rust python-numpy python-grpcio python-cryptography termux-services
python -m venv --system-site-packages "$HOME/.moemesh-venv"
# moemesh needs grpcio >= 1.85.1 (deploy/README.md says why); Termux shipped 1.83.0 in 2026-08.
# An older one is built from source against Termux's libraries, with the switches Termux's own
# python-grpcio recipe sets.
if ! "$HOME/.moemesh-venv/bin/python" -c 'import grpc, sys; sys.exit(tuple(map(int, grpc.__version__.split(".")[:2])) < (1, 85))'; then
  echo "Termux's grpcio is older than 1.85.1: building grpcio from source (about an hour)."
  pkg install -y abseil-cpp c-ares libre2 openssl zlib
  GRPC_PYTHON_BUILD_SYSTEM_OPENSSL=1 GRPC_PYTHON_BUILD_SYSTEM_ZLIB=1 GRPC_PYTHON_BUILD_SYSTEM_CARES=1 \
  GRPC_PYTHON_BUILD_SYSTEM_RE2=1 GRPC_PYTHON_BUILD_SYSTEM_ABSL=1 \
    "$HOME/.moemesh-venv/bin/pip" install --no-binary grpcio "grpcio>=1.85.1"
fi
"$HOME/.moemesh-venv/bin/pip" install "$SRC"
mkdir -p "$HOME/.termux/boot"
cat > "$HOME/.termux/boot/moemesh-node" <<'BOOT'
#!/data/data/com.termux/files/usr/bin/sh
termux-wake-lock   # keep the CPU awake while serving experts
exec "$HOME/.moemesh-venv/bin/moemesh" node serve --port 7070 --max-memory 3G >> "$HOME/moemesh-node.log" 2>&1
BOOT
chmod +x "$HOME/.termux/boot/moemesh-node"
echo "Installed. Pair with your coordinator first: ~/.moemesh-venv/bin/moemesh pair COORDINATOR_IP:7079 --code CODE"
echo "Then open the Termux:Boot app once; the node starts on every boot (log: ~/moemesh-node.log)."
echo "Start it now with: ~/.termux/boot/moemesh-node &"
