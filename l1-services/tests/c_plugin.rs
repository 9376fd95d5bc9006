//! A native service written in C against `sdk/include/spanvmm_service.h`: proves the header
//! and the host agree without the Rust SDK in between.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

const SOURCE: &str = r#"
#include <stdio.h>
#include <string.h>
#include "spanvmm_service.h"

/* The host table and the structs appended to ABI version 1 have the sizes the Rust side uses. */
_Static_assert(sizeof(spanvmm_host) == 312, "spanvmm_host layout");
_Static_assert(sizeof(spanvmm_layer_options) == 64, "spanvmm_layer_options layout");
_Static_assert(sizeof(spanvmm_job_status) == 24, "spanvmm_job_status layout");
_Static_assert(sizeof(spanvmm_migration_status) == 72, "spanvmm_migration_status layout");

static const spanvmm_host *host;
static uint64_t writes;

static void put(const spanvmm_sink *s, const char *text) {
    s->put(s->ctx, (const uint8_t *)text, strlen(text));
}

uint32_t spanvmm_service_abi_version(void) { return SPANVMM_SERVICE_ABI_VERSION; }

int32_t spanvmm_service_describe(const spanvmm_sink *out) {
    put(out, "{\"name\":\"c-counter\",\"version\":\"1.0.0\",\"abi_version\":1,"
             "\"events\":[\"port-write\",\"port-read\"],\"ports\":[{\"base\":1808,\"len\":1}],"
             "\"capabilities\":[\"memory-read\"],\"tick_period_ms\":0}");
    return SPANVMM_OK;
}

int32_t spanvmm_service_attach(const spanvmm_host *h, const uint8_t *cfg, size_t len,
                               const spanvmm_sink *err) {
    (void)cfg;
    if (h->abi_version != SPANVMM_SERVICE_ABI_VERSION || h->size < sizeof(spanvmm_host)) {
        put(err, "unexpected host table");
        return SPANVMM_ERR;
    }
    host = h;
    const char *msg = "c-counter attached";
    host->log(host->ctx, SPANVMM_LOG_INFO, (const uint8_t *)msg, strlen(msg));
    return len == 3 && memcmp(cfg, "bad", 3) == 0 ? (put(err, "bad config"), SPANVMM_ERR)
                                                     : SPANVMM_OK;
}

int32_t spanvmm_service_on_event(const spanvmm_event *ev, spanvmm_event_reply *reply) {
    if (ev->kind == SPANVMM_EVENT_PORT_WRITE) {
        writes += ev->value;
    } else if (ev->kind == SPANVMM_EVENT_PORT_READ) {
        reply->has_value = 1;
        reply->value = writes;
    }
    return SPANVMM_OK;
}

int32_t spanvmm_service_detach(const spanvmm_sink *state) {
    state->put(state->ctx, (const uint8_t *)&writes, sizeof writes);
    host = NULL;
    return SPANVMM_OK;
}

int32_t spanvmm_service_resume_from(const uint8_t *state, size_t len, const spanvmm_sink *err) {
    if (len != sizeof writes) { put(err, "state must be 8 bytes"); return SPANVMM_ERR; }
    memcpy(&writes, state, len);
    return SPANVMM_OK;
}

static int32_t peek(const spanvmm_sink *out) {
    uint8_t b[4];
    char msg[256] = "", text[64];
    int32_t r = host->read_memory(host->ctx, 0x1000, b, sizeof b, out);
    if (r != SPANVMM_OK) return r;
    spanvmm_vm_info info;
    host->vm_info(host->ctx, &info);
    snprintf(text, sizeof text, "{\"bytes\":\"%.4s\",\"mem\":%llu,\"denied\":\"", (char *)b,
             (unsigned long long)info.mem_bytes);
    /* Not granted: the error text goes to our own sink. */
    struct { char buf[200]; size_t n; } e = {{0}, 0};
    spanvmm_sink es = {&e, 0};
    void collect(void *ctx, const uint8_t *d, size_t n);
    es.put = collect;
    r = host->write_memory(host->ctx, 0, b, 1, &es);
    snprintf(msg, sizeof msg, "%s%.*s\"}", text, r == SPANVMM_ERR ? (int)e.n : 0, e.buf);
    put(out, msg);
    return SPANVMM_OK;
}

void collect(void *ctx, const uint8_t *d, size_t n) {
    struct { char buf[200]; size_t n; } *e = ctx;
    for (size_t i = 0; i < n && e->n < sizeof e->buf - 1; i++) {
        char c = (char)d[i];
        e->buf[e->n++] = c == '"' ? '\'' : c;
    }
}

int32_t spanvmm_service_call(const uint8_t *m, size_t mlen, const uint8_t *a, size_t alen,
                             const spanvmm_sink *out) {
    (void)a; (void)alen;
    char text[32];
    if (mlen == 5 && memcmp(m, "count", 5) == 0) {
        snprintf(text, sizeof text, "%llu", (unsigned long long)writes);
        put(out, text);
        return SPANVMM_OK;
    }
    if (mlen == 4 && memcmp(m, "peek", 4) == 0) return peek(out);
    put(out, "unknown method");
    return SPANVMM_ERR;
}
"#;

fn build() -> Option<PathBuf> {
    let dir = std::env::temp_dir().join(format!("spanvmm-l1-c-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("counter.c");
    std::fs::write(&src, SOURCE).unwrap();
    let so = dir.join("libc-counter.so");
    let include = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sdk/include");
    let out = Command::new("cc")
        .args(["-std=gnu11", "-Wall", "-Werror", "-shared", "-fPIC", "-o"])
        .arg(&so)
        .arg("-I")
        .arg(&include)
        .arg(&src)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(so),
        Ok(o) => panic!("cc failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            let no_cc = Err(format!("no C compiler ({e})"));
            assert!(!netlab::can_run(
                "a_c_service_built_from_the_header_works",
                no_cc
            ));
            None
        }
    }
}

#[test]
fn a_c_service_built_from_the_header_works() {
    let Some(so) = build() else { return };
    let (ram, m) = manager();
    ram.write(0x1000, b"SPAN").unwrap();
    let err = m.attach(&so, "bad").unwrap_err();
    assert!(err.to_string().contains("bad config"), "{err}");
    let info = m.attach(&so, "").unwrap();
    assert_eq!(info.name, "c-counter");
    assert!(m.on_port_write(0x710, &[5]));
    assert!(m.on_port_write(0x710, &[6, 0]));
    let mut d = [0u8; 2];
    assert!(m.on_port_read(0x710, &mut d));
    assert_eq!(u16::from_le_bytes(d), 11);
    assert_eq!(m.call("c-counter", "count", "").unwrap(), "11");
    let peek = json(&m.call("c-counter", "peek", "").unwrap());
    assert_eq!(peek["bytes"], "SPAN");
    assert_eq!(peek["mem"], 16 << 20);
    assert!(
        peek["denied"].as_str().unwrap().contains("memory-write"),
        "{peek}"
    );
    // Replace by itself (a fresh load): the count survives through detach/resume-from.
    m.detach("c-counter")
        .map(|s| assert_eq!(s, 11u64.to_ne_bytes()))
        .unwrap();
    m.attach(&so, "").unwrap();
    assert!(m.on_port_write(0x710, &[1]));
    let state = m.detach("c-counter").unwrap();
    assert_eq!(state, 1u64.to_ne_bytes());
    std::fs::remove_dir_all(so.parent().unwrap()).unwrap();
}
