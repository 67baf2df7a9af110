# shellcheck shell=bash
# Private apt (download Debian packages without touching the system): the functions live in
# vfiouser/testing/provision/private-apt.sh, which ships with the package; this sources them.
# shellcheck source=../../vfiouser/testing/provision/private-apt.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../vfiouser/testing/provision/private-apt.sh"
