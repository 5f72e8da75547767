#!/data/data/com.termux/files/usr/bin/bash
# Android phone as an expert node (or coordinator), in Termux (F-Droid build).
#   bash setup.sh /path/to/moemesh-source
# Installs the toolchain, builds moemesh, and starts a node on boot with Termux:Boot.
set -euo pipefail
SRC=${1:-$HOME/moemesh}
pkg update -y
# clang/cmake/ninja build the native kernels (NEON path); numpy and grpcio come prebuilt from
# Termux's repository (building grpcio on a phone takes an hour).
pkg install -y python clang cmake ninja python-numpy python-grpcio termux-services
python -m venv --system-site-packages "$HOME/.moemesh-venv"
"$HOME/.moemesh-venv/bin/pip" install "$SRC"
mkdir -p "$HOME/.termux/boot"
cat > "$HOME/.termux/boot/moemesh-node" <<'BOOT'
#!/data/data/com.termux/files/usr/bin/sh
termux-wake-lock   # keep the CPU awake while serving experts
exec "$HOME/.moemesh-venv/bin/moemesh" node serve --port 7070 --max-memory 3G >> "$HOME/moemesh-node.log" 2>&1
BOOT
chmod +x "$HOME/.termux/boot/moemesh-node"
echo "Installed. Open the Termux:Boot app once; the node starts on every boot (log: ~/moemesh-node.log)."
echo "Start it now with: ~/.termux/boot/moemesh-node &"
