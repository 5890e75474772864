/* SPDX-License-Identifier: GPL-2.0-or-later */
#ifndef QDEDUP_TOOLS_TOP_H
#define QDEDUP_TOOLS_TOP_H

/*
 * The live dashboard: the broker at CONTROL and the QEMUs whose QMP sockets
 * are QMP_PATHS, every INTERVAL_MS until Ctrl-C or ITERATIONS samples
 * (0: no limit); every sample also appended to CSV_PATH if not NULL.
 */
int ctl_top(const char *control, char **qmp_paths, int interval_ms, int iterations,
            const char *csv_path);

#endif
