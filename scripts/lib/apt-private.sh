# SPDX-License-Identifier: GPL-2.0-or-later
#
# A private apt configuration (sources, lists and cache under one directory),
# sourced by configure and scripts/guest/build-image.sh.  It reaches
# bookworm-backports and trixie's source packages without changing the
# system's apt sources; packages installed through it still go into the
# system's dpkg database as usual.

# apt_private DIR PROGRAM ARGS...: run apt-get/apt-cache on DIR's configuration.
apt_private() {
    _ap_dir=$1
    _ap_prog=$2
    shift 2
    set -- -o "Dir::Etc::sourcelist=$_ap_dir/sources.list" \
        -o "Dir::Etc::sourceparts=$_ap_dir/sources.list.d" \
        -o "Dir::State::Lists=$_ap_dir/lists" \
        -o "Dir::Cache=$_ap_dir/cache" "$@"
    # As root, apt drops to the _apt user to download, which cannot write
    # into a private directory under $HOME; download as root instead.
    [ "$(id -u)" = 0 ] && set -- -o APT::Sandbox::User=root "$@"
    "$_ap_prog" "$@"
}

# apt_private_dirs DIR: create the directory layout apt expects.
apt_private_dirs() {
    mkdir -p "$1/lists/partial" "$1/cache/archives/partial" "$1/sources.list.d"
}

# apt_private_host DIR: the system's own sources, plus bookworm-backports on
# bookworm (where meson >= 1.5, python3-pycotap and qemu-system-data 10 live).
apt_private_host() {
    apt_private_dirs "$1"
    rm -f "$1/sources.list.d/"*
    if [ -f /etc/apt/sources.list ]; then
        cp /etc/apt/sources.list "$1/sources.list"
    else
        : >"$1/sources.list"
    fi
    for _ap_f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$_ap_f" ] && ln -s "$_ap_f" "$1/sources.list.d/"
    done
    if [ "$(host_codename)" = bookworm ] &&
        ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        cat >"$1/sources.list.d/qdedup-bookworm-backports.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
}

# apt_private_src DIR SUITE: only SUITE's source packages.
apt_private_src() {
    apt_private_dirs "$1"
    rm -f "$1/sources.list.d/"*
    echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $2 main" \
        >"$1/sources.list"
}

# apt_private_update DIR MAX_AGE_MIN: refresh the lists when missing or older.
apt_private_update() {
    if [ -z "$(find "$1/lists" -maxdepth 1 -name '*Release' -mmin "-$2" 2>/dev/null)" ]; then
        apt_private "$1" apt-get -q update
    fi
}

host_codename() {
    (. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-unknown}")
}
