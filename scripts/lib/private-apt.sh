# shellcheck shell=bash
# Private apt: download Debian packages (and their dependency closure) without
# touching the system's apt state, sources or dpkg database.
#
# Usage (sourced):  private_apt_init DIR; private_apt_fetch DIR [apt-get args...]
# The .deb files land in DIR/archives. Nothing outside DIR is written.

private_apt_init() {
    local dir=$1
    mkdir -p "$dir/state/lists/partial" "$dir/archives/partial" "$dir/etc/sources.list.d" \
             "$dir/etc/preferences.d" "$dir/etc/trusted.gpg.d"
    : >"$dir/state/status"
    cat >"$dir/etc/sources.list" <<SOURCES
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
SOURCES
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
