/* SPDX-License-Identifier: GPL-2.0-or-later */
#ifndef QDEDUP_TOOLS_LIBVIRT_VMS_H
#define QDEDUP_TOOLS_LIBVIRT_VMS_H

#include <json-glib/json-glib.h>

/*
 * Print the memory-dedup figures of every running domain of libvirt URI
 * (NULL: libvirt's default) that has the object, beside the broker's
 * clients of the same name (CLIENTS may be NULL).  Returns the exit status.
 */
int libvirt_vms(const char *uri, JsonArray *clients, gboolean json);

#endif
