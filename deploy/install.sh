#!/usr/bin/env bash
# Install cardagent on a Debian 12 device (run as root):
#
#   deploy/install.sh [WHEEL]        WHEEL: a cardagent-*.whl (`python3 -m pip wheel . --no-deps`);
#                                    without it, the source tree this script is in is installed
#
# What it does (idempotent; never overwrites a configuration file or the data directory):
#   1. Debian packages: python3-venv, pcscd (+ polkit), and what pyscard needs to build
#   2. the system user `cardagent` (no login, no home), in group dialout (serial readers)
#   3. a virtual environment in /opt/cardagent with the wheel: /opt/cardagent/bin/cardagent,
#      cardsync (cardhost is the clearing host's: install the `host` extra elsewhere)
#   4. /etc/cardagent (0750 root:cardagent): profile.toml (the shipped production example, as a
#      starting point), dialects/, cardsync.env and frontend-pos.env (samples)
#   5. /var/lib/cardagent (0750 cardagent:cardagent): the data directory, with the profile in
#      force (profile.toml, seeded from /etc/cardagent once; the technician's console replaces
#      it and keeps the previous one) and the dialects/ it names
#   6. the systemd units (cardagent, cardsync, cardagent-frontend@) and the polkit rule that
#      lets the cardagent user use pcscd
# Then it prints the steps left to the device builder (provision, configure, doctor, enable).
set -euo pipefail

PREFIX=${PREFIX:-/opt/cardagent}
ETC=${ETC:-/etc/cardagent}
DATA=${DATA:-/var/lib/cardagent}
USER_NAME=cardagent
here=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (it creates a user, /opt, /etc and /var/lib entries)" >&2
  exit 1
fi

echo "== Debian packages"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  python3 python3-venv python3-dev gcc swig libpcsclite-dev pcscd polkitd >/dev/null

echo "== user $USER_NAME"
if ! id "$USER_NAME" >/dev/null 2>&1; then
  useradd --system --user-group --home-dir "$DATA" --no-create-home \
    --shell /usr/sbin/nologin "$USER_NAME"
fi
usermod -aG dialout "$USER_NAME"

echo "== software in $PREFIX"
[ -x "$PREFIX/bin/python" ] || python3 -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install -q --upgrade pip
if [ $# -ge 1 ]; then
  "$PREFIX/bin/python" -m pip install -q --upgrade "$1"
else
  "$PREFIX/bin/python" -m pip install -q --upgrade "$here/.."
fi
share="$PREFIX/share/cardagent"

echo "== configuration in $ETC"
install -d -m 0750 -o root -g "$USER_NAME" "$ETC" "$ETC/dialects"
install -m 0644 "$share"/firmware_profiles/dialects/*.toml "$ETC/dialects/"
if [ ! -e "$ETC/profile.toml" ]; then
  install -m 0640 -o root -g "$USER_NAME" "$share/firmware_profiles/production-example.toml" \
    "$ETC/profile.toml"
fi
for sample in "$share"/deploy/etc/cardagent/*; do
  target="$ETC/$(basename "$sample")"
  [ -e "$target" ] || install -m 0640 -o root -g "$USER_NAME" "$sample" "$target"
done

echo "== data directory $DATA"
install -d -m 0750 -o "$USER_NAME" -g "$USER_NAME" "$DATA" "$DATA/dialects"
install -m 0640 -o "$USER_NAME" -g "$USER_NAME" "$share"/firmware_profiles/dialects/*.toml "$DATA/dialects/"
if [ ! -e "$DATA/profile.toml" ]; then
  install -m 0640 -o "$USER_NAME" -g "$USER_NAME" "$ETC/profile.toml" "$DATA/profile.toml"
fi

echo "== systemd units and the polkit rule for pcscd"
install -m 0644 "$share"/deploy/systemd/*.service /etc/systemd/system/
install -d -m 0755 /etc/polkit-1/rules.d
install -m 0644 "$share"/deploy/polkit/*.rules /etc/polkit-1/rules.d/
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi

cat <<STEPS

Installed. Left to do on this device:
  1. put the city's firmware profile in force: edit $DATA/profile.toml, or paste it through the
     technician's console (`profile load`); check it: $PREFIX/bin/cardagent profile $DATA/profile.toml
  2. provision the identity and device key (once):
       runuser -u $USER_NAME -- $PREFIX/bin/cardagent provision --data-dir $DATA --terminal-id ID
  3. put the host's root public key in $ETC/host-root.pub (0640 root:$USER_NAME) and the
     enrolment code in $DATA/enrolment.code (the console's `provision code CODE` does it);
     edit $ETC/cardsync.env
  4. check the machine:  runuser -u $USER_NAME -- $PREFIX/bin/cardagent doctor
  5. start:              systemctl enable --now pcscd.socket cardagent cardsync
     watch:              systemctl status cardagent; journalctl -u cardagent -o cat
STEPS
