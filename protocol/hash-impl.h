/* SPDX-License-Identifier: GPL-2.0-or-later */
/* The builds of qd_hash_page between which hash.c chooses at run time. */
#ifndef QDEDUP_HASH_IMPL_H
#define QDEDUP_HASH_IMPL_H

#include "qdedup/protocol.h"

QdHash qd_hash_page_generic(const void *page);
QdHash qd_hash_page_avx2(const void *page);

#endif
