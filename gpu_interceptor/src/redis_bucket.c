/* redis_bucket.c: see redis_bucket.h. No mutable state of its own. */
#include "redis_bucket.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "gpu_take_lua.h" /* generated: sair_take_lua[], sair_take_lua_sha1[] */

static int copy_part(char *dst, size_t dstlen, const char *src, size_t n)
{
    if (n >= dstlen) {
        return -1;
    }
    memcpy(dst, src, n);
    dst[n] = '\0';
    return 0;
}

int sair_redis_parse_url(const char *url, struct sair_redis_target *out, char *err,
                         size_t errlen)
{
    static const char scheme[] = "redis://";
    memset(out, 0, sizeof(*out));
    out->port = 6379;
    if (url == NULL || strncmp(url, scheme, sizeof(scheme) - 1) != 0) {
        /* Never echo the URL: it may carry a password. */
        snprintf(err, errlen, "SAIR_REDIS_URL must start with redis://");
        return -1;
    }
    const char *p = url + sizeof(scheme) - 1;
    const char *end = p + strcspn(p, "/?#");
    const char *at = memchr(p, '@', (size_t)(end - p));
    if (at != NULL) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (colon != NULL) {
            if (copy_part(out->username, sizeof(out->username), p, (size_t)(colon - p)) != 0 ||
                copy_part(out->password, sizeof(out->password), colon + 1,
                          (size_t)(at - colon - 1)) != 0) {
                snprintf(err, errlen, "credentials in SAIR_REDIS_URL are too long");
                return -1;
            }
        } else if (copy_part(out->password, sizeof(out->password), p, (size_t)(at - p)) != 0) {
            snprintf(err, errlen, "password in SAIR_REDIS_URL is too long");
            return -1;
        }
        p = at + 1;
    }
    const char *host_end = end;
    const char *colon = memchr(p, ':', (size_t)(end - p));
    if (colon != NULL) {
        char *num_end = NULL;
        long port = strtol(colon + 1, &num_end, 10);
        if (num_end != end || port <= 0 || port > 65535) {
            snprintf(err, errlen, "bad port in SAIR_REDIS_URL");
            return -1;
        }
        out->port = (int)port;
        host_end = colon;
    }
    if (host_end == p) {
        copy_part(out->host, sizeof(out->host), "127.0.0.1", 9);
    } else if (copy_part(out->host, sizeof(out->host), p, (size_t)(host_end - p)) != 0) {
        snprintf(err, errlen, "host in SAIR_REDIS_URL is too long");
        return -1;
    }
    if (*end == '/' && end[1] != '\0' && end[1] != '?' && end[1] != '#') {
        char *num_end = NULL;
        long db = strtol(end + 1, &num_end, 10);
        if ((*num_end != '\0' && *num_end != '?' && *num_end != '#') || db < 0 ||
            db > 1000000) {
            snprintf(err, errlen, "bad database number in SAIR_REDIS_URL");
            return -1;
        }
        out->db = (int)db;
    }
    return 0;
}

/* Run one command that must answer +OK. Returns 0, or -1 with err set. */
static int command_ok(redisContext *ctx, int argc, const char **argv, char *err, size_t errlen)
{
    redisReply *reply = redisCommandArgv(ctx, argc, argv, NULL);
    if (reply == NULL) {
        snprintf(err, errlen, "%s: %s", argv[0], ctx->errstr);
        return -1;
    }
    int rc = 0;
    if (reply->type == REDIS_REPLY_ERROR) {
        snprintf(err, errlen, "%s: %s", argv[0], reply->str);
        rc = -1;
    }
    freeReplyObject(reply);
    return rc;
}

redisContext *sair_redis_connect(const struct sair_redis_target *target, int timeout_ms,
                                 char *err, size_t errlen)
{
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    redisContext *ctx = redisConnectWithTimeout(target->host, target->port, tv);
    if (ctx == NULL) {
        snprintf(err, errlen, "connect %s:%d: out of memory", target->host, target->port);
        return NULL;
    }
    if (ctx->err != 0) {
        snprintf(err, errlen, "connect %s:%d: %s", target->host, target->port, ctx->errstr);
        redisFree(ctx);
        return NULL;
    }
    if (redisSetTimeout(ctx, tv) != REDIS_OK) {
        snprintf(err, errlen, "set timeout: %s", ctx->errstr);
        redisFree(ctx);
        return NULL;
    }
    if (target->password[0] != '\0') {
        const char *auth_user[] = {"AUTH", target->username, target->password};
        const char *auth_pass[] = {"AUTH", target->password};
        int rc = target->username[0] != '\0' ? command_ok(ctx, 3, auth_user, err, errlen)
                                             : command_ok(ctx, 2, auth_pass, err, errlen);
        if (rc != 0) {
            redisFree(ctx);
            return NULL;
        }
    }
    if (target->db != 0) {
        char db[16];
        snprintf(db, sizeof(db), "%d", target->db);
        const char *select[] = {"SELECT", db};
        if (command_ok(ctx, 2, select, err, errlen) != 0) {
            redisFree(ctx);
            return NULL;
        }
    }
    return ctx;
}

static int is_noscript(const redisReply *reply)
{
    return reply->type == REDIS_REPLY_ERROR && strncmp(reply->str, "NOSCRIPT", 8) == 0;
}

struct sair_take_result sair_redis_take(redisContext *ctx, const char *key, long long requested,
                                        char *err, size_t errlen)
{
    struct sair_take_result result = {.status = SAIR_TAKE_ERROR};
    char count[32];
    snprintf(count, sizeof(count), "%lld", requested);
    const char *evalsha[] = {"EVALSHA", sair_take_lua_sha1, "1", key, count};
    redisReply *reply = redisCommandArgv(ctx, 5, evalsha, NULL);
    if (reply != NULL && is_noscript(reply)) {
        /* The script cache is empty (new or restarted Redis): EVAL also loads it. */
        freeReplyObject(reply);
        const char *eval[] = {"EVAL", sair_take_lua, "1", key, count};
        reply = redisCommandArgv(ctx, 5, eval, NULL);
    }
    if (reply == NULL) {
        snprintf(err, errlen, "take: %s", ctx->errstr[0] ? ctx->errstr : "no reply");
        return result;
    }
    if (reply->type == REDIS_REPLY_ERROR) {
        snprintf(err, errlen, "take: %s", reply->str);
    } else if (reply->type != REDIS_REPLY_ARRAY || reply->elements != 2 ||
               reply->element[0]->type != REDIS_REPLY_INTEGER ||
               reply->element[1]->type != REDIS_REPLY_INTEGER) {
        snprintf(err, errlen, "take: unexpected reply type %d", reply->type);
    } else if (reply->element[0]->integer < 0) {
        result.status = SAIR_TAKE_UNCONFIGURED;
    } else {
        result.status = SAIR_TAKE_OK;
        result.granted = reply->element[0]->integer;
        result.rate_milli = reply->element[1]->integer;
    }
    freeReplyObject(reply);
    return result;
}
