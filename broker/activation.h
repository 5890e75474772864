/* SPDX-License-Identifier: GPL-2.0-or-later */
#ifndef QDEDUP_BROKER_ACTIVATION_H
#define QDEDUP_BROKER_ACTIVATION_H

/*
 * The listening socket of TYPE that systemd passed under NAME
 * (LISTEN_FDNAMES), made non-blocking and close-on-exec; -1 if none.
 */
int activation_take(const char *name, int type);

#endif
