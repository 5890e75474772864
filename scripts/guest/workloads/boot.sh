# SPDX-License-Identifier: GPL-2.0-or-later
# boot: reach userspace, print the marker, power off.
ready
