//! The queue of one subscriber: routing pushes into it and never waits; the subscriber's
//! session pops from it as its in-flight window allows. The overflow rule is written in the
//! module doc of [`super`].

use super::{Message, drop_reason};
use std::collections::VecDeque;
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
    q: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Delivery>,
    bytes: usize,
    dropped: u64,
}

impl Outbox {
    pub(super) fn new(client: Arc<str>, max_messages: usize, max_bytes: usize) -> Outbox {
        Outbox {
            client,
            notify: Notify::new(),
            max_messages,
            max_bytes,
            q: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `d`, or drops a message to respect the limits; returns why a message was
    /// dropped and, if the dropped one is `d` itself, `d`.
    pub fn push(&self, d: Delivery) -> Result<(), (&'static str, Option<Delivery>)> {
        let cost = d.msg.cost();
        let mut q = self.lock();
        let full =
            |q: &Queue| q.items.len() >= self.max_messages || q.bytes + cost > self.max_bytes;
        let mut dropped = None;
        if full(&q) {
            if d.qos == 0 {
                q.dropped += 1;
                return Err((drop_reason::QOS0_QUEUE_FULL, Some(d)));
            }
            // Make room by dropping the oldest QoS 0 messages.
            while full(&q) {
                let Some(i) = q.items.iter().position(|x| x.qos == 0) else {
                    q.dropped += 1;
                    return Err((drop_reason::QUEUE_FULL, Some(d)));
                };
                if let Some(old) = q.items.remove(i) {
                    q.bytes -= old.msg.cost();
                    q.dropped += 1;
                    dropped = Some(drop_reason::QOS0_QUEUE_FULL);
                }
            }
        }
        q.bytes += cost;
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
            q.bytes += d.msg.cost();
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
        q.bytes -= d.msg.cost();
        Some(d)
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
        q.bytes += d.msg.cost();
        q.items.push_back(d);
    }
}
