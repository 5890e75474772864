# SPDX-License-Identifier: GPL-2.0-or-later
"""Line plots as PNG with gnuplot, for the demo and the benchmarks."""

import os
import subprocess


def line_plot(png, title, xlabel, ylabel, series):
    """SERIES: {name: [(x, y), ...]}, one line each.  True if PNG was drawn."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    data = png + ".dat"
    with open(data, "w") as f:
        for name, points in series.items():
            f.write(f'"{name}"\n')
            for x, y in points:
                f.write(f"{x:.1f} {y:.2f}\n")
            f.write("\n\n")
    script = (f'set terminal png size 1000,560; set output "{png}"\n'
              f'set title "{title}"; set xlabel "{xlabel}"; set ylabel "{ylabel}"\n'
              'set key left top; set grid\n'
              f'plot for [i=0:{len(series) - 1}] "{data}" index i using 1:2 with lines '
              'linewidth 2 title columnheader(1)\n')
    ok = subprocess.run(["gnuplot"], input=script, text=True).returncode == 0
    os.unlink(data)
    return ok and os.path.exists(png)
