/*
 * c-ares probes: each call sets up its own channel (one fixed server, no
 * system configuration) or parses into its own buffers, and returns what the
 * library said, so a fix in the parsing of a sort list or an address shows.
 */
#include <ares.h>
#include <windows.h>

#include "../probe.h"

static INIT_ONCE g_once = INIT_ONCE_STATIC_INIT;

/* ares_library_init is not thread-safe: run it once, from whichever thread is first. */
static BOOL CALLBACK library_init(PINIT_ONCE once, PVOID parameter, PVOID *context)
{
    (void)once;
    (void)parameter;
    (void)context;
    return ares_library_init(ARES_LIB_INIT_ALL) == ARES_SUCCESS;
}

static int channel(ares_channel *out)
{
    struct ares_options options;
    struct in_addr server;

    if (!InitOnceExecuteOnce(&g_once, library_init, NULL, NULL))
        return ARES_ENOTINITIALIZED;
    memset(&options, 0, sizeof options);
    server.s_addr = htonl(0x7f000001);
    options.servers = &server;
    options.nservers = 1;
    options.lookups = (char *)"b";
    return ares_init_options(out, &options, ARES_OPT_SERVERS | ARES_OPT_LOOKUPS);
}

/* CVE-2022-4904: sort list entries longer than the parser's stack buffers. */
PROBE ares_sortlist_long(void)
{
    static const char *const lists[] = {
        "111.111.111.111*/16",
        "111.111.111.111/255.255.255.240*",
        "130.155.160.0/255.255.240.0 130.155.0.0",
    };
    ares_channel ch;
    uint32_t h = FNV_START;
    int status = channel(&ch);
    size_t i;

    if (status != ARES_SUCCESS)
        return pack(9, (uint32_t)status);
    for (i = 0; i < sizeof lists / sizeof *lists; i++) {
        int rc = ares_set_sortlist(ch, lists[i]);
        h = fnv(h, &rc, sizeof rc);
    }
    ares_destroy(ch);
    return pack(0, h);
}

/* CVE-2023-31130: IPv6 text that ends in ":00/2" underflows the parser's buffer
 * (ares_inet_pton calls the unexported ares_inet_net_pton). */
PROBE ares_pton_v6(void)
{
    static const char *const inputs[] = {"0::00:00:00/2", "::1/128", "fe80::1:2:3:4/64", "1:2:3:4:5:6:7:8/99"};
    struct {
        unsigned char before[32], value[16], after[32];
    } area;
    uint32_t h = FNV_START;
    size_t i;

    for (i = 0; i < sizeof inputs / sizeof *inputs; i++) {
        int rc;
        memset(&area, 0xa5, sizeof area);
        rc = ares_inet_pton(AF_INET6, inputs[i], area.value);
        h = fnv(h, &rc, sizeof rc);
        h = fnv(h, &area, sizeof area);
    }
    return pack(0, h);
}

/* A query built and parsed back: unchanged by every fix, a sanity line. */
PROBE ares_query_roundtrip(void)
{
    unsigned char *query = NULL;
    int length = 0;
    char *name = NULL;
    long used = 0;
    uint32_t h = FNV_START;
    int rc = ares_create_query("www.example.org", 1, 1, 0x1234, 1, &query, &length, 0);

    if (rc != ARES_SUCCESS)
        return pack(1, (uint32_t)rc);
    h = fnv(h, query, (size_t)length);
    rc = ares_expand_name(query + 12, query, length, &name, &used);
    if (rc == ARES_SUCCESS)
        h = fnv_str(h, name);
    ares_free_string(name);
    ares_free_string(query);
    return pack(rc, h);
}
