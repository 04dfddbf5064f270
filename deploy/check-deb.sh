#!/usr/bin/env bash
# Inspect a built ferry .deb: the binary, the conffile, the systemd unit and the maintainer
# scripts must be there.
#
#   deploy/check-deb.sh path/to/ferry_*.deb
set -euo pipefail
deb="${1:?usage: deploy/check-deb.sh FILE.deb}"
contents=$(dpkg-deb -c "$deb")
info=$(dpkg-deb -I "$deb")
fail=0
need() { if ! grep -q -- "$2" <<<"$1"; then echo "MISSING in $deb: $3"; fail=1; fi; }
need "$contents" './usr/bin/ferry$' "the binary /usr/bin/ferry"
need "$contents" './etc/ferry/ferry.toml$' "the config /etc/ferry/ferry.toml"
need "$contents" 'systemd/system/ferry.service$' "the systemd unit"
need "$contents" './usr/share/doc/ferry/ferry.example.toml$' "the documented example config"
need "$info" ' conffiles' "the conffiles control file"
need "$info" ' postinst' "the postinst script"
need "$info" ' postrm' "the postrm script"
need "$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles 2>/dev/null || true)" '/etc/ferry/ferry.toml' "/etc/ferry/ferry.toml marked as a conffile"
need "$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./postinst)" 'deb-systemd-helper\|systemctl' "the systemd hooks in postinst"
echo "$info" | sed -n 's/^ \(Package\|Version\|Architecture\|Installed-Size\|Depends\):/\1:/p'
[ "$fail" = 0 ] && echo "$deb: binary, conffile, unit and maintainer scripts present"
exit "$fail"
