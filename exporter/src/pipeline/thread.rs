//! The pipeline thread and its handles: a bounded channel feeds events and queries to the one
//! thread that owns the [`Pipeline`]; sources hold an [`EventSender`], the HTTP layer a
//! [`PipelineClient`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use super::Pipeline;
use crate::event::{ClipCounters, Event, ParseError, event_bytes};
use crate::graph::RootCause;
use crate::metrics::{DropCounters, Telemetry};

/// Messages to the pipeline thread.
pub enum Msg {
    /// An event, the `source` label of its sender, and the sender's lane (see [`EventSender`]).
    Event(Box<Event>, &'static str, Arc<Lane>),
    Why(u32, tokio::sync::oneshot::Sender<Option<Vec<RootCause>>>),
    Scenes(tokio::sync::oneshot::Sender<Vec<crate::rules::ActiveScene>>),
    Shutdown,
}

/// What one sender has in the queue (bytes as [`event_bytes`] counts them, and events), and
/// its id, which the graph charges the nodes it creates to.
#[derive(Debug)]
pub struct Lane {
    bytes: AtomicUsize,
    events: AtomicUsize,
    id: u64,
}

impl Default for Lane {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Lane {
            bytes: AtomicUsize::new(0),
            events: AtomicUsize::new(0),
            id: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl Lane {
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The queue's bounds and what is in it, shared by all senders and the pipeline thread.
#[derive(Debug)]
struct Queue {
    bytes: AtomicUsize,
    events: AtomicUsize,
    max_bytes: usize,
    max_events: usize,
}

/// Channel slots beyond the event bound, for queries.
const QUERY_ROOM: usize = 64;

/// Share of the queue (bytes and events) kept for light senders: a sender that already has more
/// than [`LIGHT_SHARE`] of the reserve in the queue only gets the rest.
const RESERVE_DIVISOR: usize = 4;
/// A light sender is one with at most reserve / LIGHT_SHARE in the queue.
const LIGHT_SHARE: usize = 8;

impl Queue {
    fn reserve(max: usize) -> usize {
        max / RESERVE_DIVISOR
    }

    /// Takes room for an event of `bytes` for `lane`, or says no. Everyone may fill the queue up
    /// to its bounds less the reserve; the reserve is only for senders that hold little of the
    /// queue themselves, so one flooding source cannot crowd out the others (issue 15).
    fn admit(&self, lane: &Lane, bytes: usize) -> bool {
        let total_b = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let total_e = self.events.fetch_add(1, Ordering::Relaxed) + 1;
        let lane_b = lane.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let lane_e = lane.events.fetch_add(1, Ordering::Relaxed) + 1;
        let (reserve_b, reserve_e) = (
            Self::reserve(self.max_bytes),
            Self::reserve(self.max_events),
        );
        let within_shared =
            total_b <= self.max_bytes - reserve_b && total_e <= self.max_events - reserve_e;
        let light = lane_b <= (reserve_b / LIGHT_SHARE).max(1)
            && lane_e <= (reserve_e / LIGHT_SHARE).max(1)
            && total_b <= self.max_bytes
            && total_e <= self.max_events;
        if within_shared || light {
            return true;
        }
        self.release(lane, bytes);
        false
    }

    fn release(&self, lane: &Lane, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.events.fetch_sub(1, Ordering::Relaxed);
        lane.bytes.fetch_sub(bytes, Ordering::Relaxed);
        lane.events.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Handle for event sources. Cloning is cheap and shares the sender's lane. Never blocks.
///
/// The queue is bounded in events and in bytes. Each sender has a lane: what it has in the
/// queue. All senders may fill the queue up to three quarters of either bound; the last quarter
/// is reserved for light senders, each of which may hold at most an eighth of it. A source that
/// floods fills its share and then has its own events dropped, while a probe sending one event
/// a second still gets through (`[pipeline]` docs in docs/exporter.md).
#[derive(Clone)]
pub struct EventSender {
    tx: SyncSender<Msg>,
    dropped: DropCounters,
    source: &'static str,
    queue: Arc<Queue>,
    lane: Arc<Lane>,
    clipped: Arc<ClipCounters>,
}

impl EventSender {
    /// The same channel, tagged with another `source` label, in a lane of its own.
    pub fn with_source(&self, source: &'static str) -> EventSender {
        EventSender {
            source,
            lane: Arc::default(),
            ..self.clone()
        }
    }

    /// The same channel and source label in a lane of its own: for one of several independent
    /// producers behind one source (each probe), so that one of them flooding does not take the
    /// others' place in the queue.
    pub fn new_lane(&self) -> EventSender {
        self.with_source(self.source)
    }

    pub fn source(&self) -> &'static str {
        self.source
    }

    /// Queues an event; `false` when it was dropped (queue full for this sender, or pipeline
    /// gone), which is counted in `ark_events_dropped_total`.
    ///
    /// Strings are clipped to their stored bounds first, and the queue is bounded in bytes as
    /// well as in events: a flood of 4 KiB values cannot park a quarter gigabyte in the channel.
    pub fn send(&self, mut ev: Event) -> bool {
        if ClipCounters::needs_clip(&ev) {
            self.clipped.clip(&mut ev);
        }
        let bytes = event_bytes(&ev);
        if !self.queue.admit(&self.lane, bytes) {
            self.dropped.inc("queue_full");
            return false;
        }
        match self
            .tx
            .try_send(Msg::Event(Box::new(ev), self.source, self.lane.clone()))
        {
            Ok(()) => true,
            Err(e) => {
                self.queue.release(&self.lane, bytes);
                self.dropped.inc(match e {
                    TrySendError::Full(_) => "queue_full",
                    TrySendError::Disconnected(_) => "pipeline_closed",
                });
                false
            }
        }
    }

    /// Counts a line a source could not parse (`ark_events_dropped_total{reason}`).
    pub fn count_bad_line(&self, e: &ParseError) {
        self.dropped.inc(e.reason());
    }

    /// Gives back the room an event taken off the channel held (the receiving side calls it for
    /// every [`Msg::Event`]).
    pub fn taken(&self, ev: &Event, lane: &Lane) {
        self.queue.release(lane, event_bytes(ev));
    }
}

/// Handle for queries (HTTP).
#[derive(Clone)]
pub struct PipelineClient {
    tx: SyncSender<Msg>,
    running: Arc<AtomicBool>,
}

/// Why a query got no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("pipeline busy")]
    Busy,
    #[error("pipeline stopped")]
    Stopped,
}

impl PipelineClient {
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    pub async fn why(&self, pid: u32) -> Result<Option<Vec<RootCause>>, QueryError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ask(Msg::Why(pid, tx), rx).await
    }

    pub async fn scenes(&self) -> Result<Vec<crate::rules::ActiveScene>, QueryError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ask(Msg::Scenes(tx), rx).await
    }

    async fn ask<T>(
        &self,
        msg: Msg,
        rx: tokio::sync::oneshot::Receiver<T>,
    ) -> Result<T, QueryError> {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(QueryError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(QueryError::Stopped),
        }
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(QueryError::Stopped),
            Err(_) => Err(QueryError::Busy),
        }
    }

    /// Asks the thread to stop (best effort).
    pub fn shutdown(&self) {
        let _ = self.tx.try_send(Msg::Shutdown);
    }
}

/// A running pipeline thread.
pub struct Running {
    pub sender: EventSender,
    pub client: PipelineClient,
    pub thread: std::thread::JoinHandle<()>,
}

/// A bounded event channel without a pipeline behind it (tests, tools). The receiver gets
/// [`Msg`]s; [`spawn`] uses the same channel.
pub fn channel(capacity: usize, dropped: DropCounters) -> (EventSender, Receiver<Msg>) {
    channel_with(capacity, usize::MAX, dropped, Arc::default())
}

/// [`channel`] with a byte bound and shared clip counters. The receiving side must call
/// [`EventSender::taken`] for each event it takes off the channel.
pub fn channel_with(
    capacity: usize,
    max_bytes: usize,
    dropped: DropCounters,
    clipped: Arc<ClipCounters>,
) -> (EventSender, Receiver<Msg>) {
    let capacity = capacity.max(1);
    // Room beyond the events' bound for queries (`why`, scenes), which the bound does not count.
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity + QUERY_ROOM);
    let queue = Arc::new(Queue {
        bytes: AtomicUsize::new(0),
        events: AtomicUsize::new(0),
        max_bytes,
        max_events: capacity,
    });
    (
        EventSender {
            tx,
            dropped,
            source: "probe",
            queue,
            lane: Arc::default(),
            clipped,
        },
        rx,
    )
}

/// Moves the pipeline onto its own thread.
pub fn spawn(mut p: Pipeline, telemetry: Telemetry) -> std::io::Result<Running> {
    let (sender, rx) = channel_with(
        p.cfg.queue_capacity.max(16),
        p.cfg.queue_max_bytes.max(64 * 1024),
        telemetry.dropped.clone(),
        p.clipped.clone(),
    );
    let running = Arc::new(AtomicBool::new(true));
    let flag = running.clone();
    let queue = sender.clone();
    p.publish(&telemetry);
    let thread = std::thread::Builder::new()
        .name("ark-pipeline".to_owned())
        .spawn(move || {
            run(&mut p, &rx, &queue, &telemetry);
            flag.store(false, Ordering::Relaxed);
        })?;
    Ok(Running {
        client: PipelineClient {
            tx: sender.tx.clone(),
            running,
        },
        sender,
        thread,
    })
}

fn run(p: &mut Pipeline, rx: &Receiver<Msg>, queue: &EventSender, telemetry: &Telemetry) {
    let mut next_tick = Instant::now() + p.cfg.tick_interval;
    let mut last_publish = Instant::now();
    // Gap between snapshots: the configured interval, stretched so that building snapshots
    // (which resolves root causes, bounded by walk_budget) never takes more than ~20 % of the
    // pipeline thread under a continuous event flow.
    let mut gap = p.cfg.publish_interval;
    loop {
        let now = Instant::now();
        let mut deadline = next_tick;
        if p.dirty {
            deadline = deadline.min(last_publish + gap);
        }
        let msg = match rx.recv_timeout(deadline.saturating_duration_since(now)) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut next = msg;
        // Drain what is queued, but come up for air to publish and tick.
        let mut budget = 4096;
        while let Some(m) = next.take() {
            match m {
                Msg::Event(ev, source, lane) => {
                    queue.taken(&ev, &lane);
                    p.set_producer(lane.id());
                    p.handle_event(&ev, source);
                }
                Msg::Why(pid, reply) => {
                    let _ = reply.send(p.why(pid));
                }
                Msg::Scenes(reply) => {
                    let scenes = p.engine().map(|e| e.active_scenes()).unwrap_or_default();
                    let _ = reply.send(scenes);
                }
                Msg::Shutdown => return,
            }
            budget -= 1;
            if budget > 0 {
                next = rx.try_recv().ok();
            }
        }
        let now = Instant::now();
        if now >= next_tick {
            p.tick(None);
            next_tick = now + p.cfg.tick_interval;
        }
        if p.dirty && now >= last_publish + gap {
            let t0 = Instant::now();
            p.publish(telemetry);
            last_publish = now;
            let took = t0.elapsed();
            gap = p.cfg.publish_interval.max(took * 4);
            if took > Duration::from_millis(100) {
                tracing::debug!(ms = took.as_millis() as u64, "Slow snapshot");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;
    use crate::metrics::Telemetry;
    use proptest::prelude::*;

    fn ev(value_len: usize) -> Event {
        Event {
            ts: 1,
            event_type: EventType::ComputeUtil,
            entity_id: "gpu-0".into(),
            job_id: None,
            pid: Some(1),
            value: "v".repeat(value_len),
            node_id: None,
            pod: None,
            namespace: None,
        }
    }

    fn sender(capacity: usize, max_bytes: usize) -> (EventSender, Receiver<Msg>) {
        let t = Telemetry::new("n").unwrap();
        channel_with(capacity, max_bytes, t.dropped.clone(), Arc::default())
    }

    /// Takes one message off the channel the way the pipeline thread does.
    fn take(tx: &EventSender, rx: &Receiver<Msg>) -> bool {
        match rx.try_recv() {
            Ok(Msg::Event(ev, _, lane)) => {
                tx.taken(&ev, &lane);
                true
            }
            _ => false,
        }
    }

    #[test]
    fn a_flooding_sender_leaves_room_for_a_light_one() {
        let (flood, rx) = sender(1024, 1 << 20);
        let honest = flood.new_lane();
        let mut accepted = 0;
        while flood.send(ev(1000)) {
            accepted += 1;
        }
        // The flood got its three quarters and no more.
        let q = &flood.queue;
        assert!(q.bytes.load(Ordering::Relaxed) <= (1 << 20) * 3 / 4);
        assert!(accepted > 0);
        // Another lane still gets in, up to its light share, and so does a third.
        for _ in 0..10 {
            assert!(honest.send(ev(100)));
        }
        assert!(flood.new_lane().send(ev(100)));
        assert!(!flood.send(ev(1000)), "the flood stays out of the reserve");
        // Drained, the flood gets in again.
        while take(&flood, &rx) {}
        assert_eq!(q.bytes.load(Ordering::Relaxed), 0);
        assert_eq!(q.events.load(Ordering::Relaxed), 0);
        assert!(flood.send(ev(1000)));
    }

    #[test]
    fn tiny_events_hit_the_event_bound_not_just_the_byte_bound() {
        let (flood, _rx) = sender(100, usize::MAX);
        let mut n = 0;
        while flood.send(ev(0)) {
            n += 1;
        }
        assert_eq!(n, 75);
        let light = flood.new_lane();
        assert!(light.send(ev(0)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Send { lane: usize, len: usize },
        Take,
    }

    proptest! {
        /// Random interleavings of four lanes and the receiver: the queue never holds more than
        /// its bounds, the counters always equal what is in the channel, and a lane holding
        /// nothing can always send a small event.
        #[test]
        fn bounds_hold_under_any_interleaving(
            ops in proptest::collection::vec(
                prop_oneof![
                    3 => (0..4usize, 0..250usize).prop_map(|(lane, len)| Op::Send { lane, len }),
                    1 => Just(Op::Take),
                ],
                1..400,
            )
        ) {
            let (max_events, max_bytes) = (64, 8 * 1024);
            let (first, rx) = sender(max_events, max_bytes);
            let lanes: Vec<EventSender> = (0..4).map(|_| first.new_lane()).collect();
            let mut in_channel: Vec<usize> = Vec::new();
            let mut held = [0usize; 4];
            let mut queued: std::collections::VecDeque<(usize, usize)> = Default::default();
            for op in ops {
                match op {
                    Op::Send { lane, len } => {
                        let e = ev(len);
                        let b = event_bytes(&e);
                        if lanes[lane].send(e) {
                            in_channel.push(b);
                            held[lane] += b;
                            queued.push_back((lane, b));
                        }
                    }
                    Op::Take => {
                        if take(&first, &rx) {
                            let (lane, b) = queued.pop_front().unwrap();
                            held[lane] -= b;
                            in_channel.remove(0);
                        }
                    }
                }
                let q = &first.queue;
                let bytes: usize = in_channel.iter().sum();
                prop_assert_eq!(q.bytes.load(Ordering::Relaxed), bytes);
                prop_assert_eq!(q.events.load(Ordering::Relaxed), in_channel.len());
                prop_assert!(bytes <= max_bytes);
                prop_assert!(in_channel.len() <= max_events);
                for (i, l) in lanes.iter().enumerate() {
                    prop_assert_eq!(l.lane.bytes.load(Ordering::Relaxed), held[i]);
                }
            }
            // A lane that holds nothing gets a small event in whatever the others did.
            let fresh = first.new_lane();
            let light_room = (Queue::reserve(max_bytes) / LIGHT_SHARE) as i64;
            let reserve_used: usize = held.iter().filter(|&&h| h as i64 <= light_room).sum();
            if reserve_used + 200 < Queue::reserve(max_bytes) && in_channel.len() < max_events - 1 {
                prop_assert!(fresh.send(ev(10)));
            }
        }
    }
}
