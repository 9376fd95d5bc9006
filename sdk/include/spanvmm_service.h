/*
 * spanvmm native service C ABI, version 1 (spanvmm:service@0.1.0).
 *
 * A native service is a shared object exporting the seven functions declared at the end of
 * this file. Native services run inside the VMM process: they are TRUSTED code, with no
 * sandbox, no deadline and no memory limit (see docs/plugin-guide.md). Rust authors do not use
 * this header: spanvmm_sdk::export_service! generates the same symbols. The spanvmm_host table
 * below is generated from the host-call table in sdk/src/hostif.rs (a test fails when this file
 * differs); the other types are mirrored by sdk/src/abi.rs and size-checked by its tests.
 *
 * Rules
 * - The host calls spanvmm_service_abi_version() first and refuses the object unless it returns
 *   SPANVMM_SERVICE_ABI_VERSION; it then requires every other symbol.
 * - The host serializes calls into one service; they may come from different threads (port
 *   events come from vCPU threads: keep on_event short and never block in it).
 * - Bytes travel through sinks: the receiver passes a spanvmm_sink and the sender calls
 *   put(ctx, data, len), possibly several times (the data is appended). Nothing allocated by one
 *   side is freed by the other.
 * - Every int32_t result is SPANVMM_OK, SPANVMM_ERR (a message went to the sink) or
 *   SPANVMM_FATAL (the service is broken; the host detaches it).
 * - The spanvmm_host table passed to attach stays valid until detach returns. Host functions
 *   may only be called from inside a call the host made into the service, on that thread.
 * - Lists of u64 (dirty bitmap, hashes, zero bitmap, search results) arrive in the sink as
 *   native-endian uint64_t values.
 */
#ifndef SPANVMM_SERVICE_H
#define SPANVMM_SERVICE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SPANVMM_SERVICE_ABI_VERSION 1u

#define SPANVMM_OK 0
#define SPANVMM_ERR 1
#define SPANVMM_FATAL 2

typedef struct spanvmm_sink {
    void *ctx;
    void (*put)(void *ctx, const uint8_t *data, size_t len);
} spanvmm_sink;

/* spanvmm_event.kind */
#define SPANVMM_EVENT_PORT_WRITE 0u /* port, size, value = value written */
#define SPANVMM_EVENT_PORT_READ 1u  /* port, size; answer in the reply */
#define SPANVMM_EVENT_LIFECYCLE 2u  /* value = SPANVMM_LIFECYCLE_* */
#define SPANVMM_EVENT_TICK 3u       /* value = host monotonic time, ns */
#define SPANVMM_EVENT_MMIO_WRITE 4u /* addr, size, value = value stored */
#define SPANVMM_EVENT_MMIO_READ 5u  /* addr, size; answer in the reply */
#define SPANVMM_EVENT_NET_FRAMES 6u /* value = host time, ns; frames, frames_len, dropped */

#define SPANVMM_NET_RX 0u /* spanvmm_net_frame.direction: network to guest */
#define SPANVMM_NET_TX 1u /* guest to network */

/* One frame a virtio-net device moved, headers only. Addresses: IPv6, or IPv4-mapped
 * (::ffff:a.b.c.d), zero when not IP; ports and flags zero when not TCP/UDP. */
typedef struct spanvmm_net_frame {
    uint8_t src[16];
    uint8_t dst[16];
    uint32_t len; /* bytes of the Ethernet frame */
    uint16_t ethertype;
    uint16_t src_port;
    uint16_t dst_port;
    uint8_t protocol;  /* IP protocol, 0 when not IP */
    uint8_t tcp_flags; /* FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10 */
    uint8_t direction; /* SPANVMM_NET_RX or SPANVMM_NET_TX */
    uint8_t reserved[3];
} spanvmm_net_frame;

#define SPANVMM_LIFECYCLE_PAUSED 0u
#define SPANVMM_LIFECYCLE_RESUMED 1u
#define SPANVMM_LIFECYCLE_MIGRATED 2u
#define SPANVMM_LIFECYCLE_RESTORED 3u
#define SPANVMM_LIFECYCLE_SHUTDOWN 4u

typedef struct spanvmm_event {
    uint32_t kind;
    uint16_t port;
    uint8_t size;     /* access width in bytes: 1, 2 or 4 (MMIO: up to 8) */
    uint8_t reserved; /* 0 */
    uint64_t value;
    uint64_t addr; /* guest-physical address of MMIO events */
    /* net-frames events only (valid during the call): */
    const spanvmm_net_frame *frames;
    size_t frames_len;
    uint64_t dropped; /* frames not recorded since the previous batch */
} spanvmm_event;

typedef struct spanvmm_event_reply {
    uint32_t has_value; /* 1: a port or MMIO read returns `value`; 0: all-ones */
    uint32_t reserved;
    uint64_t value;
} spanvmm_event_reply;

typedef struct spanvmm_vm_info {
    uint64_t mem_bytes;
    uint32_t vcpus;
    uint32_t tsc_khz;
} spanvmm_vm_info;

typedef struct spanvmm_vcpu_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
    uint64_t cr0, cr2, cr3, cr4, efer;
    uint8_t cpl;
} spanvmm_vcpu_regs;

typedef struct spanvmm_translation {
    uint64_t gpa;
    uint64_t page_size; /* 4096, 2 MiB or 1 GiB */
    uint8_t present, writable, user, executable;
    uint32_t reserved;
} spanvmm_translation;

/* spanvmm_host.snapshot_begin: strings are UTF-8 pointer + length; a null pointer is "none" */
typedef struct spanvmm_layer_options {
    const uint8_t *dir;
    size_t dir_len;
    const uint8_t *parent; /* parent layer directory (incremental), or NULL (full layer) */
    size_t parent_len;
    const uint8_t *key_file; /* or NULL: not encrypted */
    size_t key_file_len;
    uint64_t expires_in_s; /* when has_expiry is 1 */
    uint32_t has_expiry;
    uint32_t reserved; /* 0 */
} spanvmm_layer_options;

typedef struct spanvmm_job_status {
    uint32_t pending; /* batches and commits queued, not yet done */
    uint32_t rounds;
    uint64_t bytes_written;
    uint8_t copied;    /* 1: every batch queued before the commit is written */
    uint8_t committed; /* 1: the layer is complete and valid */
    uint8_t failed;    /* 1: the job failed; its message went to the job_error sink */
    uint8_t reserved[5];
} spanvmm_job_status;

/* spanvmm_migration_status.phase */
#define SPANVMM_MIGRATION_PRECOPY 0u
#define SPANVMM_MIGRATION_POSTCOPY 1u
#define SPANVMM_MIGRATION_RECOVERING 2u
#define SPANVMM_MIGRATION_COMPLETED 3u
#define SPANVMM_MIGRATION_FAILED 4u
/* spanvmm_host.migration_switch_over modes */
#define SPANVMM_SWITCH_STOP_AND_COPY 0u
#define SPANVMM_SWITCH_POSTCOPY 1u

typedef struct spanvmm_migration_status {
    uint32_t phase;
    uint32_t reserved;
    uint64_t pages_total, pages_pending, pages_sent, bytes_sent, rate_bytes_per_sec;
    uint64_t pages_needed, remote_faults, elapsed_ms;
} spanvmm_migration_status;

/* spanvmm_host.log levels */
#define SPANVMM_LOG_ERROR 0u
#define SPANVMM_LOG_WARN 1u
#define SPANVMM_LOG_INFO 2u
#define SPANVMM_LOG_DEBUG 3u
#define SPANVMM_LOG_TRACE 4u

/* ---- generated from sdk/src/hostif.rs (the host-call table): do not edit by hand ---- */
/* What the VMM offers. Each call checks the capabilities the manifest asked for. */
typedef struct spanvmm_host {
    uint32_t abi_version; /* SPANVMM_SERVICE_ABI_VERSION */
    uint32_t size;        /* sizeof(spanvmm_host); later minor versions append fields */
    void *ctx;            /* first argument of every function below */
    /* host#vm-info: The VM's shape. */
    void (*vm_info)(void *ctx, spanvmm_vm_info *out);
    /* host#pause: Stops all vCPUs. */
    int32_t (*pause)(void *ctx, const spanvmm_sink *err);
    /* host#resume: Restarts all vCPUs. */
    int32_t (*resume)(void *ctx, const spanvmm_sink *err);
    /* host#vcpu-regs: One vCPU's registers. */
    int32_t (*vcpu_regs)(void *ctx, uint32_t index, spanvmm_vcpu_regs *out,
                         const spanvmm_sink *err);
    /* host#read-memory: len <= 1 MiB; the host writes straight into buf. */
    int32_t (*read_memory)(void *ctx, uint64_t gpa, uint8_t *buf, size_t len,
                           const spanvmm_sink *err);
    /* host#write-memory: Writes len (<= 1 MiB) bytes at gpa. */
    int32_t (*write_memory)(void *ctx, uint64_t gpa, const uint8_t *data, size_t len,
                            const spanvmm_sink *err);
    /* host#translate: Guest page-table walk. */
    int32_t (*translate)(void *ctx, uint64_t cr3, uint64_t gva, spanvmm_translation *out,
                         const spanvmm_sink *err);
    /* host#dirty-bitmap: u64 words to out (or the error message). */
    int32_t (*dirty_bitmap)(void *ctx, const spanvmm_sink *out);
    /* host#hash-pages: u64 words to out (or the error message). */
    int32_t (*hash_pages)(void *ctx, uint64_t first, uint32_t count, const spanvmm_sink *out);
    /* host#zero-scan: u64 words to out (or the error message). */
    int32_t (*zero_scan)(void *ctx, uint64_t first, uint32_t count, const spanvmm_sink *out);
    /* host#search-memory: u64 addresses to out (or the error message). */
    int32_t (*search_memory)(void *ctx, uint64_t start, uint64_t len, const uint8_t *pattern,
                             size_t pattern_len, uint32_t max_results, const spanvmm_sink *out);
    /* host#claim-ports: Only during attach. */
    int32_t (*claim_ports)(void *ctx, uint16_t base, uint16_t len, const spanvmm_sink *err);
    /* host#log: level: SPANVMM_LOG_*. */
    void (*log)(void *ctx, uint32_t level, const uint8_t *msg, size_t len);
    /* host#metric: A named metric. */
    void (*metric)(void *ctx, const uint8_t *name, size_t len, double value);
    /* host#notify: A notification (kind, JSON detail). */
    void (*notify)(void *ctx, const uint8_t *kind, size_t kind_len, const uint8_t *detail,
                   size_t detail_len);
    /* host#now-ns: Host monotonic time, ns. */
    uint64_t (*now_ns)(void *ctx);
    /* host#claim-mmio: Appended: only during attach; outside guest RAM. */
    int32_t (*claim_mmio)(void *ctx, uint64_t base, uint64_t len, const spanvmm_sink *err);
    /* snapshot#begin: Appended: the snapshot engine (wit/snapshot.wit). Opens a layer. */
    int32_t (*snapshot_begin)(void *ctx, const spanvmm_layer_options *opts, uint32_t *job,
                              const spanvmm_sink *err);
    /* snapshot#write-pages: words == 0: every page. */
    int32_t (*snapshot_write_pages)(void *ctx, uint32_t job, const uint64_t *bitmap, size_t words,
                                    const spanvmm_sink *err);
    /* snapshot#commit: Captures the VM state (paused VM) and queues the state file. */
    int32_t (*snapshot_commit)(void *ctx, uint32_t job, const spanvmm_sink *err);
    /* snapshot#status: The layer id to layer_id; when out->failed, the job's failure to job_error. */
    int32_t (*snapshot_status)(void *ctx, uint32_t job, spanvmm_job_status *out,
                               const spanvmm_sink *layer_id, const spanvmm_sink *job_error,
                               const spanvmm_sink *err);
    /* snapshot#close: Drops a job. */
    void (*snapshot_close)(void *ctx, uint32_t job);
    /* snapshot#merge: Merges the chain ending in top into a full layer in out; key_file NULL: plain. */
    int32_t (*snapshot_merge)(void *ctx, const uint8_t *top, size_t top_len, const uint8_t *out,
                              size_t out_len, const uint8_t *key_file, size_t key_file_len,
                              uint32_t *job, const spanvmm_sink *err);
    /* snapshot#remove: Deletes the layer in dir (retention of layers a merge superseded). */
    int32_t (*snapshot_remove)(void *ctx, const uint8_t *dir, size_t dir_len,
                               const spanvmm_sink *err);
    /* migration#harvest-dirty: Appended: the migration engine (wit/migration.wit). u64 words to out. */
    int32_t (*migration_harvest_dirty)(void *ctx, const spanvmm_sink *out);
    /* migration#queue-pages: How many pages were not queued already goes to queued. */
    int32_t (*migration_queue_pages)(void *ctx, const uint64_t *bitmap, size_t words,
                                     uint32_t round, uint64_t *queued, const spanvmm_sink *err);
    /* migration#queue-range: urgent != 0: before everything but faults. */
    int32_t (*migration_queue_range)(void *ctx, uint64_t first, uint64_t count, uint32_t urgent,
                                     uint32_t round, const spanvmm_sink *err);
    /* migration#switch-over: mode: SPANVMM_SWITCH_*. */
    int32_t (*migration_switch_over)(void *ctx, uint32_t mode, const spanvmm_sink *err);
    /* migration#take-faults: u64 words to out. */
    int32_t (*migration_take_faults)(void *ctx, const spanvmm_sink *out);
    /* migration#progress: When the migration failed, the reason to failure. */
    int32_t (*migration_progress)(void *ctx, spanvmm_migration_status *out,
                                  const spanvmm_sink *failure, const spanvmm_sink *err);
    /* migration#set-encoding: Appended: CloudNet's page encodings (redundancy, deltas: 0 or 1). */
    int32_t (*migration_set_encoding)(void *ctx, uint32_t redundancy, uint32_t deltas,
                                      uint64_t cache_bytes, uint32_t blocks,
                                      const spanvmm_sink *err);
    /* migration#set-scatter: Appended: Scatter-Gather (config: JSON text, see wit/migration.wit). */
    int32_t (*migration_set_scatter)(void *ctx, const uint8_t *config, size_t config_len,
                                     const spanvmm_sink *err);
    /* agile#open: Appended: agile migration's parked pages (wit/agile.wit). config: JSON. */
    int32_t (*agile_open)(void *ctx, const uint8_t *config, size_t config_len,
                          const spanvmm_sink *err);
    /* agile#park: What it did (JSON) to out (or the error message). */
    int32_t (*agile_park)(void *ctx, const uint64_t *bitmap, size_t words, const spanvmm_sink *out);
    /* agile#report: JSON to out (or the error message). */
    int32_t (*agile_report)(void *ctx, const spanvmm_sink *out);
    /* agile#close: Brings every page back and stops. */
    int32_t (*agile_close)(void *ctx, const spanvmm_sink *err);
    /* migration#throttle-vcpus: Appended: slows the guest during pre-copy (percent of the time asleep). */
    int32_t (*migration_throttle_vcpus)(void *ctx, uint32_t percent, const spanvmm_sink *err);
} spanvmm_host;
/* ---- end of generated text ---- */

/* ---- exported by the service ---- */

/* Handshake: must return SPANVMM_SERVICE_ABI_VERSION. */
uint32_t spanvmm_service_abi_version(void);

/* The manifest as JSON (the serde form of spanvmm_sdk::Manifest):
 * {"name":"…","version":"…","abi_version":1,"events":["port-write","port-read","lifecycle","tick",
 *  "mmio-write","mmio-read","net-frames"],"ports":[{"base":1792,"len":4}],
 *  "mmio":[{"base":67645734912,"len":4096}] (optional),"capabilities":["memory-read","memory-write","vcpu-state",
 *  "pause-resume","dirty-log","drives-migration","snapshot"],"tick_period_ms":0} */
int32_t spanvmm_service_describe(const spanvmm_sink *manifest_json);

int32_t spanvmm_service_attach(const spanvmm_host *host, const uint8_t *config, size_t config_len,
                               const spanvmm_sink *err);

int32_t spanvmm_service_on_event(const spanvmm_event *ev, spanvmm_event_reply *reply);

/* The state for a successor's resume_from. */
int32_t spanvmm_service_detach(const spanvmm_sink *state);

int32_t spanvmm_service_resume_from(const uint8_t *state, size_t state_len,
                                    const spanvmm_sink *err);

/* A control-API command: JSON in, JSON (or an error message) out. */
int32_t spanvmm_service_call(const uint8_t *method, size_t method_len, const uint8_t *args,
                             size_t args_len, const spanvmm_sink *out);

#ifdef __cplusplus
}
#endif

#endif /* SPANVMM_SERVICE_H */
