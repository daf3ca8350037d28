//! The pipeline thread and its handles: a bounded channel feeds events and queries to the one
//! thread that owns the [`Pipeline`]; sources hold an [`EventSender`], the HTTP layer a
//! [`PipelineClient`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use super::Pipeline;
use crate::event::{ClipCounters, Event, ParseError, event_bytes};
use crate::graph::RootCause;
use crate::metrics::{DropCounters, Telemetry};

/// Messages to the pipeline thread.
pub enum Msg {
    Event(Box<Event>, &'static str),
    Why(u32, tokio::sync::oneshot::Sender<Option<Vec<RootCause>>>),
    Scenes(tokio::sync::oneshot::Sender<Vec<crate::rules::ActiveScene>>),
    Shutdown,
}

/// Handle for event sources. Cloning is cheap. Never blocks.
#[derive(Clone)]
pub struct EventSender {
    tx: SyncSender<Msg>,
    dropped: DropCounters,
    source: &'static str,
    /// Bytes of the events in the channel (see [`event_bytes`]), and the most allowed.
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
    clipped: Arc<ClipCounters>,
}

impl EventSender {
    /// The same channel, tagged with another `source` label.
    pub fn with_source(&self, source: &'static str) -> EventSender {
        EventSender {
            source,
            ..self.clone()
        }
    }

    pub fn source(&self) -> &'static str {
        self.source
    }

    /// Queues an event; `false` when it was dropped (queue full or pipeline gone), which is
    /// counted in `ark_events_dropped_total`.
    ///
    /// Strings are clipped to their stored bounds first, and the queue is bounded in bytes as
    /// well as in events: a flood of 4 KiB values cannot park a quarter gigabyte in the channel.
    pub fn send(&self, mut ev: Event) -> bool {
        if ClipCounters::needs_clip(&ev) {
            self.clipped.clip(&mut ev);
        }
        let bytes = event_bytes(&ev);
        if self.queued.fetch_add(bytes, Ordering::Relaxed) + bytes > self.max_bytes {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            self.dropped.inc("queue_full");
            return false;
        }
        match self.tx.try_send(Msg::Event(Box::new(ev), self.source)) {
            Ok(()) => true,
            Err(e) => {
                self.queued.fetch_sub(bytes, Ordering::Relaxed);
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
    let (sender, rx, _) = channel_with(capacity, usize::MAX, dropped, Arc::default());
    (sender, rx)
}

/// [`channel`] with a byte bound and shared clip counters; also returns the queued-bytes
/// counter the receiving side must lower by [`event_bytes`] of each event it takes.
pub fn channel_with(
    capacity: usize,
    max_bytes: usize,
    dropped: DropCounters,
    clipped: Arc<ClipCounters>,
) -> (EventSender, Receiver<Msg>, Arc<AtomicUsize>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
    let queued = Arc::new(AtomicUsize::new(0));
    (
        EventSender {
            tx,
            dropped,
            source: "probe",
            queued: queued.clone(),
            max_bytes,
            clipped,
        },
        rx,
        queued,
    )
}

/// Moves the pipeline onto its own thread.
pub fn spawn(mut p: Pipeline, telemetry: Telemetry) -> std::io::Result<Running> {
    let (sender, rx, queued) = channel_with(
        p.cfg.queue_capacity.max(16),
        p.cfg.queue_max_bytes.max(64 * 1024),
        telemetry.dropped.clone(),
        p.clipped.clone(),
    );
    let running = Arc::new(AtomicBool::new(true));
    let flag = running.clone();
    p.publish(&telemetry);
    let thread = std::thread::Builder::new()
        .name("ark-pipeline".to_owned())
        .spawn(move || {
            run(&mut p, &rx, &queued, &telemetry);
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

fn run(p: &mut Pipeline, rx: &Receiver<Msg>, queued: &AtomicUsize, telemetry: &Telemetry) {
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
                Msg::Event(ev, source) => {
                    queued.fetch_sub(event_bytes(&ev), Ordering::Relaxed);
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
