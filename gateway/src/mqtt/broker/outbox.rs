//! The queue of one subscriber: routing pushes into it and never waits; the subscriber's
//! session pops from it as its in-flight window allows. The overflow rule is written in the
//! module doc of [`super`].

use super::{Message, drop_reason};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// One message on its way to one subscriber.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub msg: Arc<Message>,
    /// QoS to deliver it with: the lower of the publish's and the subscription's.
    pub qos: u8,
    /// RETAIN flag to send.
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions.
    pub ids: Vec<usize>,
    /// Its row in the buffer file, for a persistent session (deleted once acknowledged).
    pub seq: Option<u64>,
    /// The packet id it was sent with, when it is sent again after a reconnect.
    pub pkid: Option<u16>,
}

/// The queue of one subscriber.
#[derive(Debug)]
pub struct Outbox {
    /// Client id, for the status page.
    pub client: Arc<str>,
    /// Woken when a message is queued.
    pub notify: Notify,
    max_messages: usize,
    max_bytes: usize,
    /// Bytes queued in every outbox together, and their limit.
    total: Arc<AtomicUsize>,
    max_total: usize,
    q: Mutex<Queue>,
}

/// The limits of one queue and of all of them together.
#[derive(Debug, Clone)]
pub(super) struct Limits {
    pub(super) messages: usize,
    pub(super) bytes: usize,
    pub(super) total: Arc<AtomicUsize>,
    pub(super) max_total: usize,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
    dropped: u64,
    /// Messages taken out so far (whether the queue moves).
    popped: u64,
}

impl Outbox {
    pub(super) fn new(client: Arc<str>, limits: &Limits) -> Outbox {
        Outbox {
            client,
            notify: Notify::new(),
            max_messages: limits.messages,
            max_bytes: limits.bytes,
            total: limits.total.clone(),
            max_total: limits.max_total,
            q: Mutex::default(),
        }
    }

    fn add(&self, q: &mut Queue, cost: usize) {
        q.bytes += cost;
        self.total.fetch_add(cost, Relaxed);
    }

    fn sub(&self, q: &mut Queue, cost: usize) {
        q.bytes -= cost;
        self.total.fetch_sub(cost, Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `d`, or drops a message to respect the limits; returns why a message was
    /// dropped and, if the dropped one is `d` itself, `d`.
    pub fn push(&self, d: Delivery) -> Result<(), (&'static str, Option<Delivery>)> {
        let cost = d.msg.cost();
        let mut q = self.lock();
        let own_full =
            |q: &Queue| q.items.len() >= self.max_messages || q.bytes + cost > self.max_bytes;
        let all_full = || self.total.load(Relaxed) + cost > self.max_total;
        let mut dropped = None;
        if own_full(&q) || all_full() {
            if d.qos == 0 {
                q.dropped += 1;
                return Err((drop_reason::QOS0_QUEUE_FULL, Some(d)));
            }
            // Make room by dropping this queue's oldest QoS 0 messages.
            while own_full(&q) || all_full() {
                let Some(i) = q.items.iter().position(|x| x.qos == 0) else {
                    q.dropped += 1;
                    let why = if own_full(&q) {
                        drop_reason::QUEUE_FULL
                    } else {
                        drop_reason::ALL_QUEUES_FULL
                    };
                    return Err((why, Some(d)));
                };
                if let Some(old) = q.items.remove(i) {
                    self.sub(&mut q, old.msg.cost());
                    q.dropped += 1;
                    dropped = Some(drop_reason::QOS0_QUEUE_FULL);
                }
            }
        }
        self.add(&mut q, cost);
        q.items.push_back(d);
        drop(q);
        self.notify.notify_one();
        match dropped {
            Some(why) => Err((why, None)),
            None => Ok(()),
        }
    }

    /// Puts messages sent but not acknowledged back at the front, in their order, for the
    /// next connection of a persistent session (beyond the limits: they were queued once).
    pub fn requeue(&self, ds: Vec<Delivery>) {
        let mut q = self.lock();
        for d in ds.into_iter().rev() {
            self.add(&mut q, d.msg.cost());
            q.items.push_front(d);
        }
        drop(q);
        self.notify.notify_one();
    }

    /// Takes the oldest message if it can go now: a QoS 0 one always, a QoS 1/2 one while
    /// `window_open`. Order is kept: nothing overtakes a message waiting for the window.
    pub fn pop(&self, window_open: bool) -> Option<Delivery> {
        let mut q = self.lock();
        let front = q.items.front()?;
        if front.qos > 0 && !window_open {
            return None;
        }
        let d = q.items.pop_front()?;
        self.sub(&mut q, d.msg.cost());
        q.popped += 1;
        Some(d)
    }

    /// `Some(messages taken out so far)` when a QoS 1/2 message of `cost` bytes would not fit
    /// now without dropping one; `None` when it would.
    pub fn full_for(&self, cost: usize) -> Option<u64> {
        let q = self.lock();
        let full = q.items.len() >= self.max_messages
            || q.bytes + cost > self.max_bytes
            || self.total.load(Relaxed) + cost > self.max_total;
        full.then_some(q.popped)
    }

    /// Messages queued now.
    pub fn depth(&self) -> usize {
        self.lock().items.len()
    }

    /// Messages dropped from this queue so far.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Queues a message loaded from the buffer file (it was within the limits once).
    pub(super) fn load(&self, d: Delivery) {
        let mut q = self.lock();
        self.add(&mut q, d.msg.cost());
        q.items.push_back(d);
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let bytes = self.lock().bytes;
        self.total.fetch_sub(bytes, Relaxed);
    }
}
