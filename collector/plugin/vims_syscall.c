/*
 * vims_syscall: a QEMU TCG plugin (system emulation, x86-64) that records every `syscall`
 * instruction a guest executes, on every vCPU, into a shared-memory ring that the VIMS collector
 * reads (vims.collector.plugin_tracer). Built by scripts/qemu-plugin-setup.sh with the system gcc.
 *
 * How: at translation time each user-space instruction `0f 05` gets an execution callback with
 * register read access. The callback runs before the instruction, so every register still holds
 * what user space passed: RAX (call number), RDI, RSI, RDX, R10, R8, R9 (arguments), RIP (the
 * return address is RIP + 2, what RCX holds after the instruction), RSP (user stack), CR3 (address
 * space) and K_GS_BASE (the
 * kernel's per-cpu base of this CPU, swapped in by the kernel's entry). The current task is read at
 * that moment from K_GS_BASE + current_task's per-cpu offset (written by the collector into the
 * control area) with qemu_plugin_read_memory_vaddr: the kernel is mapped in the user's page tables
 * when PTI is off (the VIMS guests boot with pti=off; TCG's max CPU is AMD, where PTI is off anyway).
 *
 * The vCPU never waits: a full ring drops the record and counts it (per vCPU).
 *
 * Shared memory (one file, path from the `shm=` argument, created here):
 *   header, 4096 bytes: magic "VIMSPLG1", version, vCPUs, slots per ring, record size, and the
 *   control area the collector writes: enabled, current_task offset, a per-vCPU cap of records per
 *   second (0: none), a generation counter, the task_struct offsets of pid, tgid, comm and
 *   real_parent (read at the call, so that a row's identity and parent are the caller's even if it
 *   exec'd or exited since, and its task_struct was freed and given to another task), the
 *   policy's program filter (include / exclude shell patterns on comm, matched with fnmatch at the
 *   call: a program it does not keep is counted in `filtered` and takes no slot and no cap) and its
 *   call filter (a bitmap of the call numbers 0-511 to keep, tested before anything is read: a call
 *   it does not keep is counted in `filtered` too; a number past 511 is kept, for the collector).
 *   then per vCPU: a 64-byte ring header (head: written here; tail: written by the collector;
 *   dropped; seen = syscall instructions executed while enabled; capped; filtered) and `slots` records.
 *
 * No QEMU header is used: the few API functions (QEMU_PLUGIN_VERSION 4, QEMU 10.0) are declared
 * below, as are the two glib types the API hands over.
 */
#include <fcntl.h>
#include <fnmatch.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- the QEMU plugin API as of QEMU 10.0 (include/qemu/qemu-plugin.h), declared here ---- */
typedef struct { char *data; unsigned int len; } GArray;
typedef struct { uint8_t *data; unsigned int len; } GByteArray;
extern GByteArray *g_byte_array_new(void);
extern GByteArray *g_byte_array_set_size(GByteArray *array, unsigned int length);
extern char *g_array_free(GArray *array, int free_segment);

typedef uint64_t qemu_plugin_id_t;
typedef struct qemu_info_t {
    const char *target_name;
    struct { int min; int cur; } version;
    bool system_emulation;
    union { struct { int smp_vcpus; int max_vcpus; } system; };
} qemu_info_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;
struct qemu_plugin_register;
typedef struct {
    struct qemu_plugin_register *handle;
    const char *name;
    const char *feature;
} qemu_plugin_reg_descriptor;
enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_CB_R_REGS, QEMU_PLUGIN_CB_RW_REGS };
typedef void (*qemu_plugin_vcpu_simple_cb_t)(qemu_plugin_id_t id, unsigned int vcpu_index);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_init_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_simple_cb_t cb);
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, qemu_plugin_vcpu_tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, qemu_plugin_vcpu_udata_cb_t cb,
                                            enum qemu_plugin_cb_flags flags, void *userdata);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
size_t qemu_plugin_insn_data(const struct qemu_plugin_insn *insn, void *dest, size_t len);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
GArray *qemu_plugin_get_registers(void);
int qemu_plugin_read_register(struct qemu_plugin_register *handle, GByteArray *buf);
bool qemu_plugin_read_memory_vaddr(uint64_t addr, GByteArray *data, size_t len);

__attribute__((visibility("default"))) int qemu_plugin_version = 4;

/* ---- the shared memory layout (mirrored in collector/plugin_tracer.py) ---- */
#define VIMS_MAGIC 0x31474c50534d4956ULL /* "VIMSPLG1" little-endian */
#define VIMS_VERSION 4
#define MAX_PATTERNS 48
#define PATTERN_SIZE 32
#define HEADER_SIZE 4096
#define RING_HEADER 64
#define MAX_VCPUS 64
#define CALL_NUMBERS 512

struct header {
    uint64_t magic;
    uint32_t version, n_vcpus;
    uint32_t slots, record_size;
    uint32_t enabled;          /* control: 1 = record */
    uint32_t regs_ok;          /* set here: 1 if every register was found */
    uint64_t task_offset;      /* control: per-cpu offset of current_task; 0 = do not read the task */
    uint64_t cap_per_s;        /* control: records per second per vCPU, 0 = no cap */
    uint64_t generation;       /* control: bumped by the collector at each change */
    char missing[64];          /* set here: the registers not found, comma separated */
    uint64_t pid_offset;       /* control: offsetof(task_struct, pid); 0 = do not read pid/tgid/comm */
    uint64_t tgid_offset;      /* control: offsetof(task_struct, tgid) */
    uint64_t comm_offset;      /* control: offsetof(task_struct, comm) */
    uint8_t path_arg[512];     /* control: per call number, 1 + the argument holding a path (0: none) */
    uint8_t argv_arg[512];     /* control: per call number, 1 + the argument holding argv (execve) */
    uint32_t filter_seq;       /* control: odd while the collector rewrites the program filter */
    uint32_t n_include;        /* control: patterns[0..n_include) keep a program (none: every program) */
    uint32_t n_exclude;        /* control: the next n_exclude patterns drop one (after include) */
    uint32_t filter_pad;
    char patterns[MAX_PATTERNS][PATTERN_SIZE]; /* control: shell patterns on comm (fnmatch, NUL-terminated) */
    uint32_t call_filter;      /* control (under filter_seq): 1 = keep only the calls set in call_keep */
    uint32_t call_pad;
    uint8_t call_keep[CALL_NUMBERS / 8]; /* control: bit nr = keep call nr (0-511) */
    uint64_t parent_offset;    /* control: offsetof(task_struct, real_parent); 0 = do not read the ppid */
};
/* The offsets collector/plugin/__init__.py writes at. */
_Static_assert(offsetof(struct header, filter_seq) == 1168, "filter_seq moved");
_Static_assert(offsetof(struct header, patterns) == 1184, "patterns moved");
_Static_assert(offsetof(struct header, call_filter) == 2720, "call_filter moved");
_Static_assert(offsetof(struct header, call_keep) == 2728, "call_keep moved");
_Static_assert(offsetof(struct header, parent_offset) == 2792, "parent_offset moved");
_Static_assert(sizeof(struct header) <= HEADER_SIZE, "the header outgrew its page");

struct ring {
    uint64_t head;             /* written here (release) */
    uint64_t tail;             /* written by the collector */
    uint64_t dropped;          /* records not written: ring full */
    uint64_t seen;             /* syscall instructions executed while enabled */
    uint64_t capped;           /* records not written: over the cap */
    uint64_t filtered;         /* records not written: a program the filter does not keep */
    uint64_t reserved[2];
};

struct record {                /* 16 x u64 = 128 bytes */
    uint64_t ts_ns;            /* host CLOCK_REALTIME */
    uint64_t nr;               /* RAX */
    uint64_t args[6];          /* RDI RSI RDX R10 R8 R9 */
    uint64_t ip;               /* user return address: RIP of the syscall + 2 (RCX after it) */
    uint64_t sp;               /* RSP */
    uint64_t cr3;
    uint64_t task;             /* current task, read at the call; 0 if not read */
    uint64_t kgs;              /* K_GS_BASE: the kernel per-cpu base of this CPU */
    uint64_t flags;            /* bit 0: task read failed; bit 1: pid/tgid/comm read; bit 4: ppid read */
    uint64_t pid_tgid;         /* pid | tgid << 32, read at the call */
    char comm[16];             /* the task's comm, read at the call */
    uint32_t ppid;             /* flags bit 4: the tgid of the task's real_parent, read at the call */
    uint32_t ppid_pad;
    uint64_t reserved;
    char path[96];             /* flags bit 2: the path argument, read at the call (NUL-terminated, cut) */
    char argv[128];            /* flags bit 3: argv joined by spaces, read at the call (cut) */
};                             /* 152 + 224 = 376 bytes */

enum { R_RAX, R_RDI, R_RSI, R_RDX, R_R10, R_R8, R_R9, R_RIP, R_RSP, R_CR3, R_KGS, N_REGS };
static const char *reg_names[N_REGS] = {"rax", "rdi", "rsi", "rdx", "r10", "r8", "r9", "rip", "rsp",
                                        "cr3", "k_gs_base"};

static struct header *hdr;
static uint8_t *base;
static size_t map_size;
static uint32_t slots = 65536;

struct vcpu_state {
    struct qemu_plugin_register *regs[N_REGS];
    GByteArray *buf;
    uint64_t second;           /* the current second of the cap */
    uint64_t in_second;
};
static struct vcpu_state vcpus[MAX_VCPUS];

static inline struct ring *ring_of(unsigned int vcpu)
{
    return (struct ring *)(base + HEADER_SIZE + (size_t)vcpu * (RING_HEADER + (size_t)slots * sizeof(struct record)));
}

static inline uint64_t read_reg(struct vcpu_state *st, int i)
{
    uint64_t v = 0;
    if (!st->regs[i]) {
        return 0;
    }
    g_byte_array_set_size(st->buf, 0);
    int n = qemu_plugin_read_register(st->regs[i], st->buf);
    if (n > 0) {
        memcpy(&v, st->buf->data, n < 8 ? (size_t)n : 8);
    }
    return v;
}

static void vcpu_init(qemu_plugin_id_t id, unsigned int vcpu)
{
    (void)id;
    if (vcpu >= MAX_VCPUS) {
        return;
    }
    struct vcpu_state *st = &vcpus[vcpu];
    st->buf = g_byte_array_new();
    GArray *list = qemu_plugin_get_registers();
    qemu_plugin_reg_descriptor *d = (qemu_plugin_reg_descriptor *)list->data;
    for (unsigned int i = 0; i < list->len; i++) {
        for (int r = 0; r < N_REGS; r++) {
            if (d[i].name && strcmp(d[i].name, reg_names[r]) == 0) {
                st->regs[r] = d[i].handle;
            }
        }
    }
    g_array_free(list, 1);
    if (vcpu == 0) {
        char missing[64] = "";
        int ok = 1;
        for (int r = 0; r < N_REGS; r++) {
            if (!st->regs[r]) {
                ok = 0;
                if (strlen(missing) + strlen(reg_names[r]) + 2 < sizeof(missing)) {
                    if (missing[0]) strcat(missing, ",");
                    strcat(missing, reg_names[r]);
                }
            }
        }
        memcpy(hdr->missing, missing, sizeof(missing));
        __atomic_store_n(&hdr->regs_ok, (uint32_t)ok, __ATOMIC_RELEASE);
    }
}

/* Copy the user string at addr into out (size n, NUL-terminated), never reading across a page that
 * is not needed: a string at the end of a mapped page must not fail for the next page. */
static bool read_string(struct vcpu_state *st, uint64_t addr, char *out, size_t n)
{
    size_t got = 0;
    while (got + 1 < n) {
        size_t want = 4096 - ((addr + got) & 4095);
        if (want > n - 1 - got) want = n - 1 - got;
        if (!qemu_plugin_read_memory_vaddr(addr + got, st->buf, want) || st->buf->len < want) {
            out[got] = 0;
            return got > 0;
        }
        void *nul = memchr(st->buf->data, 0, want);
        size_t take = nul ? (size_t)((uint8_t *)nul - st->buf->data) : want;
        memcpy(out + got, st->buf->data, take);
        got += take;
        if (nul) break;
    }
    out[got] = 0;
    return true;
}

static void read_argv(struct vcpu_state *st, uint64_t argv, char *out, size_t n)
{
    size_t used = 0;
    out[0] = 0;
    for (int i = 0; i < 32 && used + 1 < n; i++) {
        uint64_t ptr = 0;
        if (!qemu_plugin_read_memory_vaddr(argv + 8 * (uint64_t)i, st->buf, 8) || st->buf->len < 8) break;
        memcpy(&ptr, st->buf->data, 8);
        if (!ptr) break;
        if (i) out[used++] = ' ';
        if (!read_string(st, ptr, out + used, n - used)) break;
        used += strlen(out + used);
    }
    out[used < n ? used : n - 1] = 0;
}

/* Whether the program filter keeps the program `comm` (NUL-terminated). A filter the collector is
 * rewriting keeps everything: the collector filters what arrives as well, so nothing is lost. */
static bool keeps(const char *comm)
{
    uint32_t seq = __atomic_load_n(&hdr->filter_seq, __ATOMIC_ACQUIRE);
    if (seq & 1) {
        return true;
    }
    uint32_t inc = hdr->n_include, exc = hdr->n_exclude;
    if (inc > MAX_PATTERNS || exc > MAX_PATTERNS - inc) {
        return true;
    }
    for (const char *c = comm; *c; c++) {
        if ((unsigned char)*c >= 0x80) {
            return true;  /* not ASCII: how a pattern's `?` counts it is the collector's to decide */
        }
    }
    bool keep = inc == 0;
    for (uint32_t i = 0; i < inc && !keep; i++) {
        keep = fnmatch(hdr->patterns[i], comm, FNM_NOESCAPE) == 0;
    }
    for (uint32_t i = inc; i < inc + exc && keep; i++) {
        keep = fnmatch(hdr->patterns[i], comm, FNM_NOESCAPE) != 0;
    }
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return keep || __atomic_load_n(&hdr->filter_seq, __ATOMIC_RELAXED) != seq;
}

/* Whether the call filter keeps call number nr; as for programs, a filter being rewritten keeps all. */
static bool keeps_call(uint64_t nr)
{
    uint32_t seq = __atomic_load_n(&hdr->filter_seq, __ATOMIC_ACQUIRE);
    if ((seq & 1) || !hdr->call_filter || nr >= CALL_NUMBERS) {
        return true;
    }
    bool keep = (hdr->call_keep[nr / 8] >> (nr % 8)) & 1;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return keep || __atomic_load_n(&hdr->filter_seq, __ATOMIC_RELAXED) != seq;
}

/* Copy `len` bytes of guest memory at `addr` (a kernel address) into `out`; false if unreadable. */
static bool read_kernel(struct vcpu_state *st, uint64_t addr, void *out, size_t len)
{
    if (!qemu_plugin_read_memory_vaddr(addr, st->buf, len) || st->buf->len < len) {
        return false;
    }
    memcpy(out, st->buf->data, len);
    return true;
}

#define SPAN_MAX 64

/* The caller's pid, tgid and comm (flags bit 1) and its parent's tgid (bit 4), read from its
 * task_struct at the call. pid, tgid and real_parent lie within a few words of each other in
 * task_struct: where they do, one read takes the three (a read is a page walk: the cost per call). */
static void read_identity(struct vcpu_state *st, uint64_t task, uint64_t *flags, uint64_t *pid_tgid,
                          char comm[16], uint32_t *ppid)
{
    uint64_t pid_off = __atomic_load_n(&hdr->pid_offset, __ATOMIC_RELAXED), tgid_off = hdr->tgid_offset;
    uint64_t parent_off = __atomic_load_n(&hdr->parent_offset, __ATOMIC_RELAXED), parent = 0;
    uint64_t lo = pid_off < tgid_off ? pid_off : tgid_off;
    uint64_t hi = (pid_off > tgid_off ? pid_off : tgid_off) + 4;
    if (parent_off) {
        lo = parent_off < lo ? parent_off : lo;
        hi = parent_off + 8 > hi ? parent_off + 8 : hi;
    }
    uint32_t pid = 0, tgid = 0;
    bool ok, parent_ok = false;
    if (hi - lo <= SPAN_MAX) {
        uint8_t span[SPAN_MAX];
        ok = read_kernel(st, task + lo, span, hi - lo);
        if (ok) {
            memcpy(&pid, span + (pid_off - lo), 4);
            memcpy(&tgid, span + (tgid_off - lo), 4);
            if (parent_off) {
                memcpy(&parent, span + (parent_off - lo), 8);
                parent_ok = true;
            }
        }
    } else {
        ok = read_kernel(st, task + pid_off, &pid, 4) && read_kernel(st, task + tgid_off, &tgid, 4);
        parent_ok = ok && parent_off && read_kernel(st, task + parent_off, &parent, 8);
    }
    if (!ok || !read_kernel(st, task + hdr->comm_offset, comm, 16)) {
        return;
    }
    comm[15] = 0;
    *pid_tgid = (uint64_t)pid | ((uint64_t)tgid << 32);
    *flags |= 2;
    /* the kernel's own tasks (pid 0, or their own parent) have none: 0, as the collector reads it */
    if (parent_ok && (!pid || !parent || parent == task || read_kernel(st, parent + tgid_off, ppid, 4))) {
        *flags |= 16;
    }
}

static void on_syscall(unsigned int vcpu, void *udata)
{
    (void)udata;
    if (vcpu >= hdr->n_vcpus || !__atomic_load_n(&hdr->enabled, __ATOMIC_ACQUIRE)) {
        return;
    }
    struct ring *ring = ring_of(vcpu);
    struct vcpu_state *st = &vcpus[vcpu];
    ring->seen++;
    uint64_t nr = read_reg(st, R_RAX);
    if (!keeps_call(nr)) {
        ring->filtered++;
        return;
    }
    /* Who calls, read at the call: the program filter needs it before anything is kept. */
    uint64_t kgs = read_reg(st, R_KGS), task = 0, flags = 0, pid_tgid = 0;
    uint32_t ppid = 0;
    char comm[16] = {0};
    uint64_t off = __atomic_load_n(&hdr->task_offset, __ATOMIC_RELAXED);
    if (off && kgs) {
        g_byte_array_set_size(st->buf, 0);
        if (qemu_plugin_read_memory_vaddr(kgs + off, st->buf, 8) && st->buf->len >= 8) {
            memcpy(&task, st->buf->data, 8);
            if (task && __atomic_load_n(&hdr->pid_offset, __ATOMIC_RELAXED)) {
                read_identity(st, task, &flags, &pid_tgid, comm, &ppid);
            }
        } else {
            flags |= 1;
        }
    }
    if ((flags & 2) && !keeps(comm)) {  /* a caller not read is kept: the collector decides */
        ring->filtered++;
        return;
    }
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t ts = (uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec;
    uint64_t cap = __atomic_load_n(&hdr->cap_per_s, __ATOMIC_RELAXED);
    if (cap) {
        uint64_t second = ts / 1000000000ULL;
        if (second != st->second) {
            st->second = second;
            st->in_second = 0;
        }
        if (st->in_second >= cap) {
            ring->capped++;
            return;
        }
        st->in_second++;
    }
    uint64_t head = ring->head;
    uint64_t tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
    if (head - tail >= slots) {
        ring->dropped++;
        return;
    }
    struct record *rec = (struct record *)((uint8_t *)ring + RING_HEADER) + (head & (slots - 1));
    rec->ts_ns = ts;
    rec->nr = nr;
    for (int i = 0; i < 6; i++) {
        rec->args[i] = read_reg(st, R_RDI + i);
    }
    rec->ip = read_reg(st, R_RIP) + 2;
    rec->sp = read_reg(st, R_RSP);
    rec->cr3 = read_reg(st, R_CR3);
    rec->kgs = kgs;
    rec->task = task;
    rec->flags = flags;
    rec->pid_tgid = pid_tgid;
    rec->ppid = ppid;
    memcpy(rec->comm, comm, 16);
    if (rec->nr < 512) {
        unsigned int pa = hdr->path_arg[rec->nr], aa = hdr->argv_arg[rec->nr];
        if (pa && pa <= 6 && read_string(st, rec->args[pa - 1], rec->path, sizeof(rec->path))) {
            rec->flags |= 4;
        }
        if (aa && aa <= 6 && rec->args[aa - 1]) {
            read_argv(st, rec->args[aa - 1], rec->argv, sizeof(rec->argv));
            rec->flags |= 8;
        }
    }
    __atomic_store_n(&ring->head, head + 1, __ATOMIC_RELEASE);
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        if (qemu_plugin_insn_size(insn) != 2 || qemu_plugin_insn_vaddr(insn) >= 0x0000800000000000ULL) {
            continue;
        }
        uint8_t code[2];
        if (qemu_plugin_insn_data(insn, code, 2) == 2 && code[0] == 0x0f && code[1] == 0x05) {
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_syscall, QEMU_PLUGIN_CB_R_REGS, NULL);
        }
    }
}

static void at_exit(qemu_plugin_id_t id, void *udata)
{
    (void)id;
    (void)udata;
    if (hdr) {
        __atomic_store_n(&hdr->enabled, 0, __ATOMIC_RELEASE);
    }
}

__attribute__((visibility("default")))
int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    const char *path = NULL;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "shm=", 4) == 0) {
            path = argv[i] + 4;
        } else if (strncmp(argv[i], "slots=", 6) == 0) {
            slots = (uint32_t)strtoul(argv[i] + 6, NULL, 10);
        } else {
            fprintf(stderr, "vims_syscall: unknown argument %s (shm=PATH, slots=N)\n", argv[i]);
            return -1;
        }
    }
    if (!info->system_emulation || strcmp(info->target_name, "x86_64") != 0) {
        fprintf(stderr, "vims_syscall: only qemu-system-x86_64 is supported (this is %s)\n", info->target_name);
        return -1;
    }
    if (!path) {
        fprintf(stderr, "vims_syscall: shm=PATH is required\n");
        return -1;
    }
    if (slots < 2 || (slots & (slots - 1)) || slots > (1u << 24)) {
        fprintf(stderr, "vims_syscall: slots=%u: a power of two, 2 to 16777216\n", slots);
        return -1;
    }
    unsigned int n = (unsigned int)info->system.max_vcpus;
    if (n > MAX_VCPUS) {
        fprintf(stderr, "vims_syscall: %u vCPUs: at most %d\n", n, MAX_VCPUS);
        return -1;
    }
    map_size = HEADER_SIZE + (size_t)n * (RING_HEADER + (size_t)slots * sizeof(struct record));
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || ftruncate(fd, (off_t)map_size) != 0) {
        perror("vims_syscall: shm");
        return -1;
    }
    base = mmap(NULL, map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
        perror("vims_syscall: mmap");
        return -1;
    }
    hdr = (struct header *)base;
    hdr->version = VIMS_VERSION;
    hdr->n_vcpus = n;
    hdr->slots = slots;
    hdr->record_size = sizeof(struct record);
    __atomic_store_n(&hdr->magic, VIMS_MAGIC, __ATOMIC_RELEASE);
    qemu_plugin_register_vcpu_init_cb(id, vcpu_init);
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, at_exit, NULL);
    return 0;
}
