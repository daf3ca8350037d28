// SPDX-License-Identifier: GPL-2.0
// Layouts shared between the BPF programs and userspace. exporter/src/collectors/ebpf.rs parses
// these by byte offset; the offsets are asserted below and in its tests, so a change here that
// is not mirrored there fails the build.
#ifndef ARK_H
#define ARK_H

// Map caps (also documented in docs/ebpf.md).
#define ARK_RINGBUF_BYTES (256 * 1024)
#define ARK_MAX_FLOWS 16384
#define ARK_MAX_INFLIGHT 16384
#define ARK_MAX_WATCHED 8192
#define ARK_IO_BUCKETS 26 // le 1us, 2us, 4us ... 2^24us (~16.8 s), then +Inf
#define ARK_IO_SUM_BUCKET 255
#define ARK_MAX_IO_BUCKETS 8192

#define ARK_EV_RETRANSMIT 1
#define ARK_EV_SLOW_IO 2
#define ARK_EV_EXIT 3
#define ARK_EV_OOM 4

struct ark_event {
	__u32 kind;      // 0
	__u32 pid;       // 4: tgid where known (0 for retransmits)
	__u64 cgroup_id; // 8: cgroup v2 id (inode of the cgroup directory)
	__u64 ts_ns;     // 16: CLOCK_MONOTONIC
	__u64 v1;        // 24: retransmit: count so far; slow io: latency ns; exit: exit_code
	__u64 v2;        // 32: slow io: dev_t (kernel encoding: major << 20 | minor)
	__u32 v3;        // 40: slow io: REQ_OP
	__u16 family;    // 44
	__u16 sport;     // 46: host order
	__u16 dport;     // 48: host order
	__u16 pad;       // 50
	__u8 saddr[16];  // 52
	__u8 daddr[16];  // 68
	char comm[16];   // 84
	__u32 pad2;      // 100
};                       // 104

struct ark_flow_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u16 family;
	__u16 pad;
	__u64 cgroup_id;
}; // 48

struct ark_flow_value {
	__u64 count;
	__u64 last_event_ns;
};

struct ark_inflight {
	__u64 issued_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 pad;
};

struct ark_io_key {
	__u32 dev;
	__u8 op;
	__u8 bucket;
	__u16 pad;
}; // 8

_Static_assert(sizeof(struct ark_event) == 104, "ark_event layout");
_Static_assert(sizeof(struct ark_flow_key) == 48, "ark_flow_key layout");
_Static_assert(sizeof(struct ark_io_key) == 8, "ark_io_key layout");

#endif
