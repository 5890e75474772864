/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Reading the members of JSON replies (the broker's, QMP's) for display. */
#ifndef QDEDUP_TOOLS_FIELDS_H
#define QDEDUP_TOOLS_FIELDS_H

#include <json-glib/json-glib.h>

/* Member M of O as an integer; 0 when O or M is missing. */
static inline gint64 num(JsonObject *o, const char *m)
{
    return o ? json_object_get_int_member_with_default(o, m, 0) : 0;
}

static inline const char *str(JsonObject *o, const char *m)
{
    return json_object_get_string_member_with_default(o, m, "");
}

static inline double mib(gint64 bytes)
{
    return bytes / 1048576.0;
}

#endif
