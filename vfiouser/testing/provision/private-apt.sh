# shellcheck shell=bash
# Private apt: download Debian packages (and their dependency closure) without
# touching the system's apt state, sources or dpkg database.
#
# Usage (sourced):  private_apt_init DIR; private_apt_fetch DIR [apt-get args...]
# The .deb files land in DIR/archives. Nothing outside DIR is written.

# The Debian archive to download from: $VFIOUSER_DEBIAN_MIRROR, else the one this machine's
# own apt sources use for its Debian release (deb822 *.sources or one-line sources.list).
# The repository names no mirror: every machine (and CI) has its own.
debian_mirror() {
    if [ -n "${VFIOUSER_DEBIAN_MIRROR:-}" ]; then
        echo "${VFIOUSER_DEBIAN_MIRROR%/}"; return 0
    fi
    local etc=${VFIOUSER_APT_ETC:-/etc/apt} uri
    uri=$(
        {
            # deb822 stanzas: the URIs of a "deb" stanza whose suites are not security ones
            for f in "$etc"/sources.list.d/*.sources; do
                [ -f "$f" ] || continue
                awk 'BEGIN { RS = ""; FS = "\n" }
                     { types = ""; uris = ""; suites = ""
                       for (i = 1; i <= NF; i++) {
                           if ($i ~ /^Types:/) types = $i
                           if ($i ~ /^URIs:/) uris = $i
                           if ($i ~ /^Suites:/) suites = $i
                       }
                       if (types ~ /(^|[ \t])deb([ \t]|$)/ && suites !~ /-security/ && uris != "") {
                           sub(/^URIs:[ \t]*/, "", uris); split(uris, u, /[ \t]+/); print u[1]
                       } }' "$f"
            done
            # one-line format: deb [options] URI suite components
            for f in "$etc"/sources.list "$etc"/sources.list.d/*.list; do
                [ -f "$f" ] || continue
                awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                                   if ($(i + 1) !~ /-security/) print $i }' "$f"
            done
        } | grep -E '^https?://[^ ]+/debian/?$' | head -n 1
    )
    if [ -z "$uri" ]; then
        echo "no Debian archive found in $etc (sources.list or sources.list.d); set VFIOUSER_DEBIAN_MIRROR" \
             "to a Debian archive URL (the one that ends in /debian)" >&2
        return 1
    fi
    echo "${uri%/}"
}

# private_apt_init DIR [SUITE...]: suites default to trixie and trixie-backports.
private_apt_init() {
    local dir=$1 mirror suite
    shift
    [ $# -gt 0 ] || set -- trixie trixie-backports
    mirror=$(debian_mirror) || return 1
    mkdir -p "$dir/state/lists/partial" "$dir/archives/partial" "$dir/etc/sources.list.d" \
             "$dir/etc/preferences.d" "$dir/etc/trusted.gpg.d"
    : >"$dir/state/status"
    : >"$dir/etc/sources.list"
    for suite in "$@"; do
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" \
            >>"$dir/etc/sources.list"
    done
}

# The Debian release this machine runs (its packages match the system's libraries).
host_suite() {
    (. /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")
}

private_apt_get() {
    local dir=$1; shift
    apt-get \
        -o Dir::State="$dir/state" \
        -o Dir::State::status="$dir/state/status" \
        -o Dir::Cache="$dir" \
        -o Dir::Cache::archives="$dir/archives" \
        -o Dir::Etc::SourceList="$dir/etc/sources.list" \
        -o Dir::Etc::SourceParts="$dir/etc/sources.list.d" \
        -o Dir::Etc::Preferences="$dir/etc/preferences" \
        -o Dir::Etc::PreferencesParts="$dir/etc/preferences.d" \
        -o Dir::Etc::TrustedParts="$dir/etc/trusted.gpg.d" \
        -o APT::Architecture=amd64 \
        -o APT::Architectures=amd64 \
        -o APT::Install-Recommends=false \
        -o APT::Install-Suggests=false \
        -o Debug::NoLocking=1 \
        -o APT::Sandbox::User=root \
        -o Acquire::Retries=3 \
        "$@"
}

private_apt_cache() {
    local dir=$1; shift
    apt-cache \
        -o Dir::State="$dir/state" \
        -o Dir::State::status="$dir/state/status" \
        -o Dir::Cache="$dir" \
        -o Dir::Etc::SourceList="$dir/etc/sources.list" \
        -o Dir::Etc::SourceParts="$dir/etc/sources.list.d" \
        -o APT::Architecture=amd64 \
        "$@"
}
