// SPDX-License-Identifier: GPL-2.0
// Ark's kernel-side programs (CO-RE). Each entry point is thin: it reads what it needs with CO-RE
// relocations, updates a bounded map and, for rare interesting cases, writes one record to the
// ring buffer. Userspace (exporter/src/collectors/ebpf.rs) reads the maps on its collection
// interval and the ring buffer continuously.
//
// Attach types: tp_btf (no tracefs needed) with classic tracepoints as fallbacks; kprobes and
// fentry are not available on every kernel we run on (shared/REAL-SERVICES.md, "eBPF").
//
// Every map is bounded; keys that userspace cannot bound (flows, in-flight requests) live in
// LRU maps so the oldest entries go first.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>

#include "ark.h"

char LICENSE[] SEC("license") = "GPL";

// Set by userspace before load (rodata).
const volatile __u64 slow_io_ns = 100 * 1000 * 1000;
const volatile __u64 retransmit_event_gap_ns = 1000 * 1000 * 1000;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, ARK_RINGBUF_BYTES);
} ARK_EVENTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, ARK_MAX_FLOWS);
	__type(key, struct ark_flow_key);
	__type(value, struct ark_flow_value);
} ARK_FLOWS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, ARK_MAX_INFLIGHT);
	__type(key, __u64);
	__type(value, struct ark_inflight);
} ARK_INFLIGHT SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ARK_MAX_IO_BUCKETS);
	__type(key, struct ark_io_key);
	__type(value, __u64);
} ARK_IO_HIST SEC(".maps");

// Pids userspace wants exit events for even when they exit cleanly (GPU / socket holders).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ARK_MAX_WATCHED);
	__type(key, __u32);
	__type(value, __u8);
} ARK_WATCHED SEC(".maps");

// Counts ring-buffer reservations that failed (userspace too slow): exported as drops.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} ARK_LOST SEC(".maps");

static __always_inline void count_lost(void)
{
	__u32 zero = 0;
	__u64 *lost = bpf_map_lookup_elem(&ARK_LOST, &zero);
	if (lost)
		__sync_fetch_and_add(lost, 1);
}

static __always_inline struct ark_event *reserve(__u32 kind)
{
	struct ark_event *e = bpf_ringbuf_reserve(&ARK_EVENTS, sizeof(*e), 0);
	if (!e) {
		count_lost();
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->ts_ns = bpf_ktime_get_ns();
	return e;
}

// ---- TCP retransmits -------------------------------------------------------------------------
// Keyed by the socket's 4-tuple and its cgroup: the pid current at a retransmit is whatever the
// softirq interrupted, so it is never used.

static __always_inline int on_retransmit(const struct sock *sk)
{
	struct ark_flow_key key = {};
	__u16 family = BPF_CORE_READ(sk, __sk_common.skc_family);

	key.family = family;
	key.sport = BPF_CORE_READ(sk, __sk_common.skc_num);
	key.dport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (family == 2 /* AF_INET */) {
		__u32 s = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__u32 d = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(key.saddr, &s, 4);
		__builtin_memcpy(key.daddr, &d, 4);
	} else if (family == 10 /* AF_INET6 */) {
		BPF_CORE_READ_INTO(&key.saddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&key.daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	} else {
		return 0;
	}
	key.cgroup_id = BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);

	__u64 now = bpf_ktime_get_ns();
	__u64 count = 1;
	int emit = 1;
	struct ark_flow_value *v = bpf_map_lookup_elem(&ARK_FLOWS, &key);
	if (v) {
		count = __sync_fetch_and_add(&v->count, 1) + 1;
		// One event per flow per gap keeps the ring buffer quiet in a storm; the count in the
		// map stays exact.
		if (now - v->last_event_ns < retransmit_event_gap_ns)
			emit = 0;
		else
			v->last_event_ns = now;
	} else {
		struct ark_flow_value init = {.count = 1, .last_event_ns = now};
		bpf_map_update_elem(&ARK_FLOWS, &key, &init, BPF_ANY);
	}
	if (!emit)
		return 0;
	struct ark_event *e = reserve(ARK_EV_RETRANSMIT);
	if (!e)
		return 0;
	e->cgroup_id = key.cgroup_id;
	e->v1 = count;
	e->family = key.family;
	e->sport = key.sport;
	e->dport = key.dport;
	__builtin_memcpy(e->saddr, key.saddr, 16);
	__builtin_memcpy(e->daddr, key.daddr, 16);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(ark_tcp_retransmit_btf, const struct sock *sk)
{
	return on_retransmit(sk);
}

// Classic tracepoint fallback: the record starts with 8 bytes of common fields, then
// `const void *skbaddr; const void *skaddr;`.
struct tcp_retransmit_args {
	__u64 common;
	const void *skbaddr;
	const void *skaddr;
};

SEC("tracepoint/tcp/tcp_retransmit_skb")
int ark_tcp_retransmit_tp(struct tcp_retransmit_args *ctx)
{
	return on_retransmit((const struct sock *)ctx->skaddr);
}

// ---- Block I/O latency -----------------------------------------------------------------------

SEC("tp_btf/block_rq_issue")
int BPF_PROG(ark_block_rq_issue, struct request *rq)
{
	__u64 key = (__u64)rq;
	struct ark_inflight v = {
		.issued_ns = bpf_ktime_get_ns(),
		.cgroup_id = bpf_get_current_cgroup_id(),
		.pid = bpf_get_current_pid_tgid() >> 32,
	};
	bpf_map_update_elem(&ARK_INFLIGHT, &key, &v, BPF_ANY);
	return 0;
}

static __always_inline __u32 log2_bucket(__u64 us)
{
	__u32 b = 0;
	// Bucket i counts latencies <= 2^i microseconds; the last bucket is open-ended.
#pragma unroll
	for (int i = 0; i < ARK_IO_BUCKETS - 1; i++) {
		if (us > (1ULL << b))
			b++;
	}
	return b;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(ark_block_rq_complete, struct request *rq, int error, unsigned int nr_bytes)
{
	__u64 key = (__u64)rq;
	struct ark_inflight *v = bpf_map_lookup_elem(&ARK_INFLIGHT, &key);
	if (!v)
		return 0; // completed without an issue we saw (attached mid-flight): tolerated
	__u64 lat = bpf_ktime_get_ns() - v->issued_ns;
	__u64 cgroup_id = v->cgroup_id;
	__u32 pid = v->pid;
	bpf_map_delete_elem(&ARK_INFLIGHT, &key);

	struct ark_io_key hk = {};
	// Flushes and passthrough requests have no partition: name the whole disk instead.
	struct block_device *part = BPF_CORE_READ(rq, part);
	hk.dev = part ? BPF_CORE_READ(part, bd_dev) : BPF_CORE_READ(rq, q, disk, part0, bd_dev);
	hk.op = BPF_CORE_READ(rq, cmd_flags) & 0xff;
	hk.bucket = log2_bucket(lat / 1000);
	__u64 one = 1;
	__u64 *c = bpf_map_lookup_elem(&ARK_IO_HIST, &hk);
	if (c)
		__sync_fetch_and_add(c, 1);
	else
		bpf_map_update_elem(&ARK_IO_HIST, &hk, &one, BPF_NOEXIST);
	hk.bucket = ARK_IO_SUM_BUCKET;
	c = bpf_map_lookup_elem(&ARK_IO_HIST, &hk);
	if (c)
		__sync_fetch_and_add(c, lat);
	else
		bpf_map_update_elem(&ARK_IO_HIST, &hk, &lat, BPF_NOEXIST);

	if (lat < slow_io_ns)
		return 0;
	struct ark_event *e = reserve(ARK_EV_SLOW_IO);
	if (!e)
		return 0;
	e->pid = pid;
	e->cgroup_id = cgroup_id;
	e->v1 = lat;
	e->v2 = hk.dev;
	e->v3 = hk.op;
	bpf_ringbuf_submit(e, 0);
	return 0;
}

// ---- Process exits and OOM kills -------------------------------------------------------------

SEC("tp_btf/sched_process_exit")
int BPF_PROG(ark_process_exit, struct task_struct *p)
{
	__u32 pid = BPF_CORE_READ(p, pid);
	__u32 tgid = BPF_CORE_READ(p, tgid);
	if (pid != tgid)
		return 0; // threads: only the process (thread-group leader) matters
	__u32 code = BPF_CORE_READ(p, exit_code);
	if (code == 0 && !bpf_map_lookup_elem(&ARK_WATCHED, &tgid))
		return 0; // clean exits of processes nobody watches are the common, boring case
	struct ark_event *e = reserve(ARK_EV_EXIT);
	if (!e)
		return 0;
	e->pid = tgid;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->v1 = code;
	BPF_CORE_READ_STR_INTO(&e->comm, p, comm);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

// The OOM tracepoint's first field after the common header has been `int pid` on every kernel
// that has it, while its BTF signature changed (6.x added the task and uid): read it classic.
struct mark_victim_args {
	__u64 common;
	int pid;
};

SEC("tracepoint/oom/mark_victim")
int ark_oom_victim(struct mark_victim_args *ctx)
{
	struct ark_event *e = reserve(ARK_EV_OOM);
	if (!e)
		return 0;
	e->pid = ctx->pid;
	bpf_ringbuf_submit(e, 0);
	return 0;
}
