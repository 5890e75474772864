# SPDX-License-Identifier: GPL-2.0-or-later
# idle: a booted guest that does nothing until it is powered off from the
# host (or qdedup.seconds=S pass).
ready
sleep "$(param seconds 86400)"
