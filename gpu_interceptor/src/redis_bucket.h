/*
 * redis_bucket.h: the shim's Redis side, stateless: parse SAIR_REDIS_URL, connect with a
 * timeout, and take tokens with the stage bucket's Lua script (schemas/lua/gpu_take.lua,
 * compiled in by the Makefile: EVALSHA first, EVAL when Redis answers NOSCRIPT).
 *
 * Only the refill thread calls these; the caller owns the redisContext.
 */
#ifndef SAIR_REDIS_BUCKET_H
#define SAIR_REDIS_BUCKET_H

#include <stddef.h>

#include <hiredis/hiredis.h>

struct sair_redis_target {
    char host[256];
    int port;
    int db;
    char username[128]; /* empty: none */
    char password[256]; /* empty: no AUTH */
};

enum sair_take_status {
    SAIR_TAKE_OK = 0,           /* granted and rate_milli are set */
    SAIR_TAKE_UNCONFIGURED = 1, /* the script returned {-1, 0}: no such bucket */
    SAIR_TAKE_ERROR = 2,        /* connection or protocol error: the context is unusable */
};

struct sair_take_result {
    enum sair_take_status status;
    long long granted;
    long long rate_milli;
};

/* redis://[[user]:password@]host[:port][/db]. Returns 0, or -1 with a reason in err. */
int sair_redis_parse_url(const char *url, struct sair_redis_target *out, char *err,
                         size_t errlen);

/* A connected context (AUTH and SELECT done), or NULL with a reason in err. */
redisContext *sair_redis_connect(const struct sair_redis_target *target, int timeout_ms,
                                 char *err, size_t errlen);

/* Take up to `requested` tokens from bucket `key`. On SAIR_TAKE_ERROR, err says why. */
struct sair_take_result sair_redis_take(redisContext *ctx, const char *key, long long requested,
                                        char *err, size_t errlen);

#endif /* SAIR_REDIS_BUCKET_H */
