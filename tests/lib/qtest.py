# SPDX-License-Identifier: GPL-2.0-or-later
"""The qtest protocol (QEMU's -qtest unix:PATH): guest memory and I/O ports
from the test, with no guest."""

import socket


class QTest:
    def __init__(self, path):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)

    def accept(self):
        self.listener.settimeout(60)
        self.conn, _ = self.listener.accept()
        self.f = self.conn.makefile("rw")

    def cmd(self, line):
        self.f.write(line + "\n")
        self.f.flush()
        while True:
            reply = self.f.readline().strip()
            if not reply.startswith("IRQ"):
                return reply

    def write(self, addr, data):
        return self.cmd(f"write {addr:#x} {len(data):#x} 0x{data.hex()}")

    def read(self, addr, size):
        reply = self.cmd(f"read {addr:#x} {size:#x}")
        return bytes.fromhex(reply.split()[1][2:])

    def outl(self, port, value):
        return self.cmd(f"outl {port:#x} {value:#x}")

    def outb(self, port, value):
        return self.cmd(f"outb {port:#x} {value:#x}")
