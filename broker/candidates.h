/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Candidates of one trust domain: hashes of pages that have no identical
 * twin yet (KSM's "unstable tree").  Remembering a hash costs 16 bytes and
 * no pool page; only when a second, different page (another client, or
 * another page of the same one) looks up the same hash is content asked for.
 *
 * Two generations: entries not seen again within one to two lifetimes are
 * dropped wholesale at rotation, as KSM rebuilds its unstable tree each
 * pass, so pages that changed or left do not pile up.
 *
 * Against a hostile client: entries are keyed by the broker's keyed hash
 * (keyed.h), not by hash bits a client picks, and each user's clients may
 * place at most CandBudget.max entries per generation (so at most twice
 * that in the tables); past it, their new hashes are simply not remembered.
 */
#ifndef QDEDUP_BROKER_CANDIDATES_H
#define QDEDUP_BROKER_CANDIDATES_H

#include <stdint.h>

#include "qdedup/protocol.h"

typedef struct CandEntry {
    uint64_t key;           /* from the hash; 0 = empty */
    uint32_t owner;         /* client id */
    uint32_t cookie;        /* folded page cookie */
} CandEntry;

typedef struct CandGen {
    CandEntry *cells;
    uint64_t mask, count;
} CandGen;

typedef struct Candidates {
    CandGen cur, prev;
    uint64_t gen;           /* generations started */
    uint64_t probes;        /* cells looked at, for the stats */
} Candidates;

/*
 * What one user's clients placed in the current generation, over all its
 * domains (generations turn together, broker_rotate_candidates).
 */
typedef struct CandBudget {
    uint64_t gen;           /* the generation counted */
    uint64_t placed;
    uint64_t max;           /* 0 = no limit */
    uint64_t refused;       /* hashes not remembered because of max */
} CandBudget;

typedef enum CandResult {
    CAND_NEW,       /* first sighting: remembered */
    CAND_SEEN,      /* the same page again (same owner and cookie) */
    CAND_MATCH,     /* a different page has this hash */
    CAND_OVER,      /* not remembered: the client's budget is spent */
} CandResult;

void candidates_init(Candidates *c);
void candidates_destroy(Candidates *c);
/* kh: the keyed hash of the page hash (keyed.h); gen: the broker's generation. */
CandResult candidates_check(Candidates *c, uint64_t kh, uint32_t owner, uint64_t cookie,
                            CandBudget *budget, uint64_t gen);
/* Drop the hash (it is in the stable index now). */
void candidates_forget(Candidates *c, uint64_t kh);
/* Start a new generation; the one before the current is dropped. */
void candidates_rotate(Candidates *c);
uint64_t candidates_count(const Candidates *c);

/* Start fetching the cell a check of kh will look at first. */
static inline void candidates_prefetch(const Candidates *c, uint64_t kh)
{
    __builtin_prefetch(&c->cur.cells[kh & c->cur.mask]);
}
uint64_t candidates_bytes(const Candidates *c);

#endif
