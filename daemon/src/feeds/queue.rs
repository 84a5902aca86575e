//! A pipeline's bounded queue with its stated policy, and the gate in front of it that thins
//! samples out (`every_nth`, `max_fps`).
//!
//! `DropOldest` is for cameras: a frame that waited is worth less than the one just taken,
//! so a full queue drops its oldest frame and takes the new one. `Wait` is for sensors and
//! files: the feed waits for room, which slows its reading (back-pressure) and loses nothing.
//! Drops and skips are counted in the pipeline's stats.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::FeedStats;
use super::Sample;
use crate::config::OnFull;

/// How a pipeline thins its samples before they queue.
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    pub every_nth: u32,
    /// Shortest time between two samples let through, milliseconds.
    pub min_gap_ms: Option<f64>,
}

struct Shared {
    state: Mutex<St>,
    /// Rung when a sample arrives or the last sender goes.
    filled: Notify,
    /// Rung when a sample leaves or the receiver goes.
    emptied: Notify,
    cap: usize,
    policy: OnFull,
    gate: Gate,
    stats: Arc<FeedStats>,
}

struct St {
    items: VecDeque<Sample>,
    senders: usize,
    receiver: bool,
    seen: u64,
    last: Option<std::time::Instant>,
}

pub struct Sender {
    shared: Arc<Shared>,
}

pub struct Receiver {
    shared: Arc<Shared>,
}

/// The pipeline is gone; the feed should stop.
#[derive(Debug)]
pub struct Closed;

pub fn bounded(
    cap: usize,
    policy: OnFull,
    gate: Gate,
    stats: Arc<FeedStats>,
) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(St {
            items: VecDeque::new(),
            senders: 1,
            receiver: true,
            seen: 0,
            last: None,
        }),
        filled: Notify::new(),
        emptied: Notify::new(),
        cap: cap.max(1),
        policy,
        gate,
        stats,
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, St> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clone for Sender {
    fn clone(&self) -> Sender {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.shared.lock().senders -= 1;
        self.shared.filled.notify_one();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.lock().receiver = false;
        self.shared.emptied.notify_waiters();
    }
}

impl Sender {
    /// Offer a sample: it passes the gate or is skipped, then queues by the policy.
    pub async fn send(&self, sample: Sample) -> Result<(), Closed> {
        let s = &self.shared;
        if matches!(sample.data, super::Data::Restart) {
            // Not a sample: it neither counts for the gate nor may be thinned out.
            return self.queue(sample).await;
        }
        {
            let mut st = s.lock();
            if !st.receiver {
                return Err(Closed);
            }
            st.seen += 1;
            let now = sample.taken;
            let skip_nth = !(st.seen - 1).is_multiple_of(u64::from(s.gate.every_nth.max(1)));
            let skip_rate = match (s.gate.min_gap_ms, st.last) {
                (Some(gap), Some(last)) => {
                    now.saturating_duration_since(last).as_secs_f64() * 1000.0 < gap
                }
                _ => false,
            };
            if skip_nth || skip_rate {
                s.stats.skipped.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            st.last = Some(now);
        }
        self.queue(sample).await
    }

    /// Put a sample in the queue by the policy.
    async fn queue(&self, sample: Sample) -> Result<(), Closed> {
        let s = &self.shared;
        let mut sample = Some(sample);
        loop {
            // Registered before the check, so a wake-up between the two is not lost.
            let emptied = s.emptied.notified();
            let queued = {
                let mut st = s.lock();
                if !st.receiver {
                    return Err(Closed);
                }
                let full = st.items.len() >= s.cap;
                if full && s.policy == OnFull::DropOldest {
                    // The oldest sample, never a restart marker: a window must still start over.
                    let i = st
                        .items
                        .iter()
                        .position(|x| !matches!(x.data, super::Data::Restart));
                    if let Some(i) = i {
                        st.items.remove(i);
                        s.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        st.items.pop_front();
                    }
                }
                if !full || s.policy == OnFull::DropOldest {
                    st.items.push_back(sample.take().expect("sent once"));
                    true
                } else {
                    false
                }
            };
            if queued {
                s.filled.notify_one();
                return Ok(());
            }
            emptied.await;
        }
    }
}

impl Receiver {
    /// The next sample; `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Sample> {
        let s = &self.shared;
        loop {
            let filled = s.filled.notified();
            {
                let mut st = s.lock();
                if let Some(x) = st.items.pop_front() {
                    drop(st);
                    s.emptied.notify_one();
                    return Some(x);
                }
                if st.senders == 0 {
                    return None;
                }
            }
            filled.await;
        }
    }

    /// Samples waiting now.
    pub fn len(&self) -> usize {
        self.shared.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feeds::{Data, Sample};

    fn sample(i: usize) -> Sample {
        Sample::new(i.to_string(), Data::Reading(vec![i as f32]))
    }

    /// What is left in the queue, by source, once every sender is gone.
    async fn sources(rx: &mut Receiver) -> Vec<String> {
        let mut got = Vec::new();
        while let Some(s) = rx.recv().await {
            got.push(s.source);
        }
        got
    }

    fn gate() -> Gate {
        Gate {
            every_nth: 1,
            min_gap_ms: None,
        }
    }

    #[tokio::test]
    async fn drop_oldest_keeps_the_newest_and_counts_drops() {
        let stats = Arc::new(FeedStats::default());
        let (tx, mut rx) = bounded(3, OnFull::DropOldest, gate(), stats.clone());
        for i in 0..10 {
            tx.send(sample(i)).await.unwrap();
        }
        drop(tx);
        let got = sources(&mut rx).await;
        assert_eq!(got, ["7", "8", "9"]);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 7);
    }

    #[tokio::test]
    async fn drop_oldest_never_drops_a_restart_marker() {
        let stats = Arc::new(FeedStats::default());
        let (tx, mut rx) = bounded(2, OnFull::DropOldest, gate(), stats.clone());
        tx.send(Sample::new("r".into(), Data::Restart))
            .await
            .unwrap();
        for i in 0..5 {
            tx.send(sample(i)).await.unwrap();
        }
        drop(tx);
        let got = sources(&mut rx).await;
        assert_eq!(got, ["r", "4"]);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn wait_applies_back_pressure_and_loses_nothing() {
        let stats = Arc::new(FeedStats::default());
        let (tx, mut rx) = bounded(2, OnFull::Wait, gate(), stats.clone());
        let writer = tokio::spawn(async move {
            for i in 0..50 {
                tx.send(sample(i)).await.unwrap();
            }
        });
        let mut got = Vec::new();
        while let Some(s) = rx.recv().await {
            // The queue never holds more than its bound.
            assert!(rx.len() <= 2);
            got.push(s.source.parse::<usize>().unwrap());
        }
        writer.await.unwrap();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn every_nth_lets_one_in_n_through_and_a_gone_receiver_closes() {
        let stats = Arc::new(FeedStats::default());
        let g = Gate {
            every_nth: 3,
            min_gap_ms: None,
        };
        let (tx, mut rx) = bounded(100, OnFull::Wait, g, stats.clone());
        for i in 0..10 {
            tx.send(sample(i)).await.unwrap();
        }
        let mut got = Vec::new();
        while !rx.is_empty() {
            got.push(rx.recv().await.unwrap().source);
        }
        assert_eq!(got, ["0", "3", "6", "9"]);
        assert_eq!(stats.skipped.load(Ordering::Relaxed), 6);
        drop(rx);
        assert!(tx.send(sample(10)).await.is_err());
    }

    #[tokio::test]
    async fn max_fps_skips_samples_closer_than_the_gap() {
        let stats = Arc::new(FeedStats::default());
        let g = Gate {
            every_nth: 1,
            min_gap_ms: Some(60_000.0),
        };
        let (tx, rx) = bounded(100, OnFull::Wait, g, stats.clone());
        for i in 0..5 {
            tx.send(sample(i)).await.unwrap();
        }
        // All five were taken within a minute: only the first passes.
        assert_eq!(rx.len(), 1);
        assert_eq!(stats.skipped.load(Ordering::Relaxed), 4);
    }
}
