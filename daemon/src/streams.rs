//! A pipeline's streams, per source: sound cut into the model's windows, or readings stacked
//! into windows for a model with state (or score events); the model's stream (its state
//! tensors and score on/off states) carried from one window to the next, one step at a time,
//! and the time of each window.
//!
//! ```text
//!  samples or a reading from source S ─► S's cutter ─► S's waiting windows ─► one step in
//!                                                                             │ flight with
//!                    S's stream, back for S's next window ◄───────────────────┘ S's stream
//! ```
//!
//! Sources never share a stream: two microphones on one MQTT wildcard each have their own.
//! A stream starts over (fresh state, no score flips carried) when its feed restarts, when
//! its source goes quiet for more than [`GAP_MS`] beyond what its last samples lasted (a
//! sender that pauses: the samples after are not the ones before continued; a reading
//! lasts nine of the stream's usual intervals, so a sensor that misses about ten readings
//! starts over), when its
//! waiting windows overflow, and when the model's version changes (the engine sees to that).
//! The pipeline stops taking samples while [`PAUSE_AT`] windows wait, so a source that
//! delivers faster than the model runs (a burst after a reconnect, a file) is held back by
//! its feed's queue rather than dropped here.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use crate::engine::{Input, Stream, Windower};

/// A source silent this much longer than its last samples lasted paused: its stream starts
/// over. Longer than the pipeline may be busy committing (it takes no samples meanwhile).
pub const GAP_MS: i64 = 3000;
/// Windows waiting (over all sources) at which the pipeline stops taking samples.
pub const PAUSE_AT: usize = 64;
/// Windows one source may have waiting (half a minute of Silero VAD's 32 ms windows): samples
/// that would make more are dropped, and the stream starts over after them.
pub const MAX_WAITING: usize = 1024;
/// Sources one pipeline keeps streams for; a new one beyond takes the place of the idlest.
pub const MAX_SOURCES: usize = 64;

/// One window of one source, timed by its samples.
#[derive(Debug)]
pub struct Window {
    pub source: String,
    /// When its first new sample was heard (readings: its newest reading), ms since the
    /// epoch.
    pub ts_ms: i64,
    /// The same, seconds from the start of the source's stream.
    pub start_s: f64,
    pub taken: Instant,
    pub input: Input,
}

/// A window ready to run, with its source's stream (`None`: a fresh one).
#[derive(Debug)]
pub struct Step {
    pub window: Window,
    pub stream: Option<Stream>,
    /// Which stream of the source it belongs to: a step that comes back after its source
    /// started over brings neither its state nor its flips along.
    pub generation: u64,
}

/// A score that was on when its stream ended: its stop, said then, timed when it went off
/// (or at the stream's last window).
#[derive(Debug, Clone, PartialEq)]
pub struct EndedStop {
    pub source: String,
    pub output: String,
    pub ts_ms: i64,
    pub start_s: f64,
}

/// What cuts a source's data into the model's inputs.
#[derive(Debug, Clone)]
pub enum Cutter {
    /// Mono samples into audio windows.
    Pcm(Windower),
    /// Readings (a value per field) stacked into windows.
    Readings(Readings),
}

impl Cutter {
    fn reset(&mut self) {
        match self {
            Cutter::Pcm(w) => w.reset(),
            Cutter::Readings(r) => r.reset(),
        }
    }
}

/// Stacks readings into windows: the last `window` readings, every `stride` new ones.
#[derive(Debug, Clone)]
pub struct Readings {
    window: usize,
    stride: usize,
    shape: Vec<usize>,
    readings: VecDeque<Vec<f32>>,
    fresh: usize,
    emitted: bool,
}

impl Readings {
    /// Windows of `window` readings every `stride`, each an input of `shape`.
    pub fn new(window: usize, stride: usize, shape: Vec<usize>) -> Readings {
        Readings {
            window,
            stride,
            shape,
            readings: VecDeque::new(),
            fresh: 0,
            emitted: false,
        }
    }

    /// Forget the readings so far: the next window is made of readings after this.
    pub fn reset(&mut self) {
        self.readings.clear();
        self.fresh = 0;
        self.emitted = false;
    }

    /// Take one reading; the window it completes, if it does.
    pub fn push(&mut self, values: Vec<f32>) -> Option<Input> {
        self.readings.push_back(values);
        if self.readings.len() > self.window {
            self.readings.pop_front();
        }
        self.fresh += 1;
        let due = if self.emitted {
            self.fresh >= self.stride
        } else {
            self.readings.len() == self.window
        };
        if !due || self.readings.len() < self.window {
            return None;
        }
        self.fresh = 0;
        self.emitted = true;
        Some(Input::Tensor {
            shape: self.shape.clone(),
            data: self.readings.iter().flatten().copied().collect(),
        })
    }
}

/// Readings windows of a model without state: each source's readings stacked apart (two
/// sensors on one MQTT wildcard never share a window), any number of windows at once.
pub struct PerSource {
    proto: Readings,
    /// Each source's readings and when it last gave one (a tick), for making room.
    sources: HashMap<String, (u64, Readings)>,
    tick: u64,
}

impl PerSource {
    pub fn new(proto: Readings) -> PerSource {
        PerSource {
            proto,
            sources: HashMap::new(),
            tick: 0,
        }
    }

    /// Forget every source's readings (the feed started over).
    pub fn reset(&mut self) {
        self.sources.clear();
    }

    /// One reading of `source`; the window it completes, if it does. Past [`MAX_SOURCES`], a
    /// new source takes the place of the one heard from longest ago.
    pub fn push(&mut self, source: &str, values: Vec<f32>) -> Option<Input> {
        self.tick += 1;
        if !self.sources.contains_key(source) && self.sources.len() >= MAX_SOURCES {
            let oldest = self
                .sources
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.sources.remove(&k);
            }
        }
        let (t, r) = self
            .sources
            .entry(source.to_string())
            .or_insert_with(|| (0, self.proto.clone()));
        *t = self.tick;
        r.push(values)
    }
}

struct Source {
    win: Cutter,
    /// When sample 0 of this stream was heard.
    t0_ms: Option<i64>,
    /// The stream between steps; `None` while a step runs, or to start afresh.
    stream: Option<Stream>,
    busy: bool,
    generation: u64,
    waiting: VecDeque<Window>,
    /// When the last samples came, and how long they last.
    last_ms: i64,
    last_len_ms: i64,
    /// Readings: the usual time between two of this stream's readings (smoothed; learnt from
    /// its second reading on, never from a gap that started it over).
    interval_ms: Option<i64>,
    /// Per score output said to be on: when it went off, if it did and the stop is not said
    /// yet (it may come back on within the hold: a pause inside speech).
    on: HashMap<String, Option<(i64, f64)>>,
    /// The last window judged: when a stop that never came is timed.
    last_window: (i64, f64),
}

pub struct Streams {
    proto: Cutter,
    /// How long a score must stay off before its stop is said.
    hold_ms: i64,
    sources: HashMap<String, Source>,
    next_generation: u64,
}

/// What a push did besides queueing windows.
#[derive(Debug, Default, PartialEq)]
pub struct Pushed {
    /// Windows dropped: they would have been too many waiting.
    pub dropped: u64,
    /// The source's stream started over (a pause, an overflow).
    pub restarted: bool,
    /// No room for a new source: the samples were not taken.
    pub refused: bool,
    /// Stops of the stream that ended.
    pub stops: Vec<EndedStop>,
}

impl Streams {
    pub fn new(proto: Cutter, hold_ms: u64) -> Streams {
        Streams {
            proto,
            hold_ms: hold_ms as i64,
            sources: HashMap::new(),
            next_generation: 1,
        }
    }

    /// The samples a second of a sound's windows.
    pub fn rate(&self) -> Option<u32> {
        match &self.proto {
            Cutter::Pcm(w) => Some(w.rate),
            Cutter::Readings(_) => None,
        }
    }

    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// The source's state for data heard at `ts_ms` lasting `len_ms` (`None`: a reading,
    /// which lasts nine of the stream's usual intervals), made if new, and the generation a
    /// restart now takes; its stream started over first if it paused. `None` if there is no
    /// room for a new source.
    fn enter(
        &mut self,
        source: &str,
        ts_ms: i64,
        len_ms: Option<i64>,
        pushed: &mut Pushed,
    ) -> Option<(&mut Source, u64)> {
        if !self.sources.contains_key(source) && !self.make_room(&mut pushed.stops) {
            pushed.refused = true;
            return None;
        }
        let generation = self.generation();
        let src = self
            .sources
            .entry(source.to_string())
            .or_insert_with(|| Source {
                win: self.proto.clone(),
                t0_ms: None,
                stream: None,
                busy: false,
                generation,
                waiting: VecDeque::new(),
                last_ms: ts_ms,
                last_len_ms: 0,
                interval_ms: None,
                on: HashMap::new(),
                last_window: (ts_ms, 0.0),
            });
        let since = ts_ms - src.last_ms;
        let going = src.t0_ms.is_some();
        // Sound lasts what its samples do; a reading lasts nine of its usual intervals (a
        // stream of one reading so far has no usual interval, and never pauses).
        let lasts = match len_ms {
            Some(_) => Some(src.last_len_ms),
            None => src.interval_ms.map(|i| 9 * i),
        };
        let paused = going && lasts.is_some_and(|l| since > l + GAP_MS);
        if paused {
            pushed.dropped += src.end(source, generation, &mut pushed.stops);
            pushed.restarted = true;
        } else if going && len_ms.is_none() {
            let since = since.max(0);
            src.interval_ms = Some(src.interval_ms.map_or(since, |i| (3 * i + since) / 4));
        }
        src.last_len_ms = len_ms.unwrap_or(0);
        src.last_ms = ts_ms;
        Some((src, generation))
    }

    /// Samples `samples` of `source`, heard up to `ts_ms`.
    pub fn push(&mut self, source: &str, ts_ms: i64, taken: Instant, samples: &[f32]) -> Pushed {
        let mut pushed = Pushed::default();
        let Some(rate) = self.rate().map(f64::from) else {
            pushed.refused = true;
            return pushed;
        };
        let ms = |n: i64| (n as f64 * 1000.0 / rate).round() as i64;
        let n = samples.len() as i64;
        let Some((src, restart)) = self.enter(source, ts_ms, Some(ms(n)), &mut pushed) else {
            return pushed;
        };
        let Cutter::Pcm(win) = &mut src.win else {
            unreachable!("a sound's sources cut samples");
        };
        // Bounded before a window is cut: one message may hold minutes of sound.
        let coming = win.windows_after(samples.len());
        if src.waiting.len() + coming > MAX_WAITING {
            pushed.dropped += src.end(source, restart, &mut pushed.stops) + coming as u64;
            pushed.restarted = true;
            return pushed;
        }
        let t0 = *src.t0_ms.get_or_insert(ts_ms - ms(n));
        let Cutter::Pcm(win) = &mut src.win else {
            unreachable!("a sound's sources cut samples");
        };
        for (start, input) in win.push(samples) {
            src.waiting.push_back(Window {
                source: source.to_string(),
                ts_ms: t0 + ms(start),
                start_s: start as f64 / rate,
                taken,
                input,
            });
        }
        pushed
    }

    /// One reading (a value per field) of `source`, taken at `ts_ms`.
    pub fn push_reading(
        &mut self,
        source: &str,
        ts_ms: i64,
        taken: Instant,
        values: Vec<f32>,
    ) -> Pushed {
        let mut pushed = Pushed::default();
        if self.rate().is_some() {
            pushed.refused = true;
            return pushed;
        }
        let Some((src, restart)) = self.enter(source, ts_ms, None, &mut pushed) else {
            return pushed;
        };
        if src.waiting.len() >= MAX_WAITING {
            pushed.dropped += src.end(source, restart, &mut pushed.stops) + 1;
            pushed.restarted = true;
            return pushed;
        }
        let t0 = *src.t0_ms.get_or_insert(ts_ms);
        let Cutter::Readings(r) = &mut src.win else {
            unreachable!("a readings stream's sources stack readings");
        };
        if let Some(input) = r.push(values) {
            src.waiting.push_back(Window {
                source: source.to_string(),
                ts_ms,
                start_s: (ts_ms - t0) as f64 / 1000.0,
                taken,
                input,
            });
        }
        pushed
    }

    /// Room for one more source: the least recently heard idle one goes if need be.
    fn make_room(&mut self, stops: &mut Vec<EndedStop>) -> bool {
        if self.sources.len() < MAX_SOURCES {
            return true;
        }
        let idlest = self
            .sources
            .iter()
            .filter(|(_, s)| !s.busy && s.waiting.is_empty())
            .min_by_key(|(_, s)| s.last_ms)
            .map(|(k, _)| k.clone());
        match idlest {
            Some(k) => {
                let mut gone = self.sources.remove(&k).expect("found");
                gone.end(&k, 0, stops);
                true
            }
            None => false,
        }
    }

    /// The feed started over (reconnected, ffmpeg restarted), or the pipeline stops: every
    /// source's stream ends. Returns the windows dropped and the stops of scores left on.
    pub fn restart(&mut self) -> (u64, Vec<EndedStop>) {
        let generation = self.generation();
        let mut stops = Vec::new();
        let mut dropped = 0;
        for (name, s) in self.sources.iter_mut() {
            dropped += s.end(name, generation, &mut stops);
        }
        (dropped, stops)
    }

    /// Steps that may start now, at most `room`: the next window of each source that has
    /// none running.
    pub fn ready(&mut self, room: usize) -> Vec<Step> {
        let mut out = Vec::new();
        for s in self.sources.values_mut() {
            if out.len() >= room {
                break;
            }
            if s.busy {
                continue;
            }
            if let Some(window) = s.waiting.pop_front() {
                s.busy = true;
                out.push(Step {
                    window,
                    stream: s.stream.take(),
                    generation: s.generation,
                });
            }
        }
        out
    }

    /// A step of `source` came back with the stream to carry on with; false if the source
    /// started over meanwhile (the step's result belongs to a stream that ended).
    pub fn back(&mut self, source: &str, generation: u64, stream: Option<Stream>) -> bool {
        let Some(s) = self.sources.get_mut(source) else {
            return false;
        };
        s.busy = false;
        let current = s.generation == generation;
        if current {
            s.stream = stream;
        }
        current
    }

    /// The flips of one finished window of `source` (its outputs' `event`s, in window order)
    /// as they are to be said: a stop only once the score stayed off the hold, timed when it
    /// went off; a start within the hold of a stop, neither. Returns the time of a stop said
    /// now, which is the result's time.
    pub fn flips(
        &mut self,
        source: &str,
        ts_ms: i64,
        start_s: f64,
        outputs: &mut serde_json::Map<String, serde_json::Value>,
    ) -> Option<(i64, f64)> {
        let s = self.sources.get_mut(source)?;
        s.last_window = (ts_ms, start_s);
        let mut said = None;
        for (name, o) in outputs.iter_mut() {
            let Some(o) = o.as_object_mut() else { continue };
            let raw = o.remove("event");
            match raw.as_ref().and_then(|e| e.as_str()) {
                Some("start") => {
                    // Back on within the hold: the pause was not a stop.
                    if !matches!(s.on.get(name), Some(Some(_))) {
                        o.insert("event".into(), "start".into());
                    }
                    s.on.insert(name.clone(), None);
                }
                Some("stop") => {
                    if let Some(off) = s.on.get_mut(name) {
                        *off = Some((ts_ms, start_s));
                    }
                }
                _ => {
                    if let Some(&Some((t, at))) = s.on.get(name)
                        && ts_ms - t >= self.hold_ms
                    {
                        s.on.remove(name);
                        o.insert("event".into(), "stop".into());
                        said = Some((t, at));
                    }
                }
            }
        }
        said
    }

    /// Windows waiting, over every source.
    pub fn waiting(&self) -> usize {
        self.sources.values().map(|s| s.waiting.len()).sum()
    }
}

impl Source {
    /// End this stream: the next samples start a new one. The windows it drops, and the stops
    /// of its scores left on.
    fn end(&mut self, name: &str, generation: u64, stops: &mut Vec<EndedStop>) -> u64 {
        for (output, off) in self.on.drain() {
            let (ts_ms, start_s) = off.unwrap_or(self.last_window);
            stops.push(EndedStop {
                source: name.to_string(),
                output,
                ts_ms,
                start_s,
            });
        }
        let dropped = self.waiting.len() as u64;
        self.win.reset();
        self.t0_ms = None;
        self.interval_ms = None;
        self.stream = None;
        self.waiting.clear();
        self.generation = generation;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams() -> Streams {
        let m = crate::engine::vad_manifest(1000);
        Streams::new(Cutter::Pcm(Windower::for_model(&m, None).unwrap()), 10)
    }

    #[test]
    fn a_stop_is_said_after_the_hold_at_the_time_it_went_off_and_short_pauses_are_not_stops() {
        let mut s = streams();
        s.push("a", 0, Instant::now(), &[0.0; 4]);
        let mut flip = |ts: i64, event: Option<&str>| {
            let mut o = serde_json::Map::new();
            let mut v = serde_json::json!({"score": 0.5});
            if let Some(e) = event {
                v["event"] = e.into();
            }
            o.insert("p".into(), v);
            let said = s.flips("a", ts, ts as f64 / 1000.0, &mut o);
            (
                o["p"]
                    .get("event")
                    .and_then(|e| e.as_str())
                    .map(String::from),
                said,
            )
        };
        assert_eq!(flip(0, Some("start")), (Some("start".into()), None));
        assert_eq!(flip(4, Some("stop")), (None, None), "not yet");
        assert_eq!(
            flip(8, Some("start")),
            (None, None),
            "a pause within the hold"
        );
        assert_eq!(flip(12, None), (None, None));
        assert_eq!(flip(16, Some("stop")), (None, None));
        assert_eq!(flip(20, None), (None, None));
        assert_eq!(flip(28, None), (Some("stop".into()), Some((16, 0.016))));
        assert_eq!(flip(32, None), (None, None), "said once");
    }

    #[test]
    fn windows_are_timed_by_their_samples_and_one_step_per_source_runs_at_once() {
        let mut s = streams();
        let t = Instant::now();
        // 10 samples at 1 kHz heard at 10 010 ms: sample 0 was heard at 10 000 ms.
        let p = s.push("a", 10_010, t, &[0.1; 10]);
        assert_eq!(p, Pushed::default());
        s.push("b", 10_010, t, &[0.2; 4]);
        let steps = s.ready(8);
        assert_eq!(steps.len(), 2, "one step per source");
        let a = steps.iter().find(|x| x.window.source == "a").unwrap();
        assert_eq!((a.window.ts_ms, a.window.start_s), (10_000, 0.0));
        assert!(s.ready(8).is_empty(), "each source waits for its step");
        assert_eq!(s.waiting(), 1, "a's second window");
        let gen_a = a.generation;
        s.back("a", gen_a, None);
        let next = s.ready(8);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].window.ts_ms, 10_004);
        assert_eq!(next[0].window.start_s, 0.004);
    }

    #[test]
    fn a_gap_or_a_restart_starts_the_stream_over_and_a_late_step_brings_no_state() {
        let mut s = streams();
        let t = Instant::now();
        s.push("a", 10_004, t, &[0.1; 4]);
        let step = s.ready(1).pop().unwrap();
        // 4 samples heard 4 s after the last 4 (which lasted 4 ms): the sender paused.
        let p = s.push("a", 14_008, t, &[0.1; 4]);
        assert!(p.restarted);
        assert!(s.ready(1).is_empty(), "the old step still runs");
        assert!(
            !s.back("a", step.generation, None),
            "a step of the ended stream"
        );
        let fresh = s.ready(1).pop().unwrap();
        assert_eq!((fresh.window.ts_ms, fresh.window.start_s), (14_004, 0.0));
        assert_ne!(fresh.generation, step.generation);
        assert!(s.back("a", fresh.generation, None));
        s.push("a", 14_012, t, &[0.1; 4]);
        assert_eq!(s.restart().0, 1, "a restart drops what waited");
        assert_eq!(s.waiting(), 0);

        // Samples that come faster than they play are no pause.
        let mut quick = streams();
        quick.push("q", 5_000, t, &[0.1; 400]);
        assert!(!quick.push("q", 5_010, t, &[0.1; 400]).restarted);
        assert!(
            !quick.push("q", 8_400, t, &[0.1; 4]).restarted,
            "within 0.4 s + 3 s"
        );
    }

    #[test]
    fn a_stream_that_ends_with_a_score_on_says_its_stop() {
        let mut s = streams();
        let t = Instant::now();
        s.push("a", 0, t, &[0.0; 4]);
        let judge = |s: &mut Streams, ts: i64, event: Option<&str>| {
            let mut o = serde_json::Map::new();
            let mut v = serde_json::json!({"score": 0.5});
            if let Some(e) = event {
                v["event"] = e.into();
            }
            o.insert("p".into(), v);
            s.flips("a", ts, ts as f64 / 1000.0, &mut o);
        };
        judge(&mut s, 0, Some("start"));
        judge(&mut s, 4, None);
        let (_, stops) = s.restart();
        assert_eq!(
            stops,
            [EndedStop {
                source: "a".into(),
                output: "p".into(),
                ts_ms: 4,
                start_s: 0.004
            }],
            "on to the end: stopped at its last window"
        );
        s.push("a", 100, t, &[0.0; 4]);
        judge(&mut s, 100, Some("start"));
        judge(&mut s, 104, Some("stop"));
        // The sender pauses before the hold is over: the stop is said, timed when it went off.
        let p = s.push("a", 9_000, t, &[0.0; 4]);
        assert!(p.restarted);
        assert_eq!(p.stops.len(), 1);
        assert_eq!((p.stops[0].ts_ms, p.stops[0].start_s), (104, 0.104));
        assert!(s.restart().1.is_empty(), "nothing on any more");
    }

    #[test]
    fn too_many_waiting_windows_are_dropped_with_the_stream() {
        let mut s = streams();
        let t = Instant::now();
        s.push("a", 0, t, &[0.0; 4]);
        let step = s.ready(1).pop().unwrap();
        let p = s.push("a", 0, t, &vec![0.0; 4 * (MAX_WAITING + 1)]);
        assert_eq!(p.dropped, MAX_WAITING as u64 + 1);
        assert!(p.restarted);
        assert_eq!(s.waiting(), 0);
        s.back("a", step.generation, None);
    }

    #[test]
    fn sources_beyond_the_bound_take_the_place_of_idle_ones_only() {
        let mut s = streams();
        let t = Instant::now();
        for i in 0..MAX_SOURCES {
            assert!(!s.push(&format!("s{i}"), i as i64, t, &[0.0; 4]).refused);
        }
        // Every source has a window waiting: none is idle.
        assert!(s.push("new", 100, t, &[0.0; 4]).refused);
        let steps = s.ready(MAX_SOURCES);
        for st in steps {
            s.back(&st.window.source, st.generation, None);
        }
        assert!(!s.push("new", 100, t, &[0.0; 4]).refused);
    }
    #[test]
    fn windows_slide_by_their_stride() {
        let mut s = Readings::new(3, 2, vec![6]);
        let mut out = Vec::new();
        for i in 0..8 {
            if let Some(Input::Tensor { shape, data }) = s.push(vec![i as f32, -(i as f32)]) {
                assert_eq!(shape, [6]);
                out.push(
                    data.iter()
                        .step_by(2)
                        .map(|x| *x as i32)
                        .collect::<Vec<_>>(),
                );
            }
        }
        // The first window once three readings are in, then one every two new readings.
        assert_eq!(out, [vec![0, 1, 2], vec![2, 3, 4], vec![4, 5, 6]]);
        // After a reopened port, a window is made of new readings only.
        s.reset();
        assert!(s.push(vec![10.0, 0.0]).is_none());
        assert!(s.push(vec![11.0, 0.0]).is_none());
        assert!(s.push(vec![12.0, 0.0]).is_some());
    }

    #[test]
    fn readings_of_two_sources_make_their_own_windows_and_a_long_silence_starts_over() {
        let mut s = Streams::new(Cutter::Readings(Readings::new(2, 1, vec![2])), 100);
        let t = Instant::now();
        // Interleaved, a reading a second each: a's windows hold only a's readings.
        for (i, ts) in [0i64, 1000, 2000].iter().enumerate() {
            let v = i as f32;
            for (src, sign) in [("a", 1.0), ("b", -1.0)] {
                let p = s.push_reading(src, *ts, t, vec![sign * v]);
                assert_eq!(p, Pushed::default(), "{src} at {ts}");
            }
        }
        let windows = |s: &mut Streams| {
            let mut got = Vec::new();
            loop {
                let steps = s.ready(8);
                if steps.is_empty() {
                    return got;
                }
                for st in steps {
                    let Input::Tensor { data, .. } = &st.window.input else {
                        panic!("readings are tensors");
                    };
                    got.push((st.window.source.clone(), data.clone(), st.window.start_s));
                    assert!(s.back(&st.window.source, st.generation, st.stream));
                }
            }
        };
        let mut got = windows(&mut s);
        got.sort_by(|x, y| x.0.cmp(&y.0).then(x.2.total_cmp(&y.2)));
        assert_eq!(
            got,
            [
                ("a".to_string(), vec![0.0, 1.0], 1.0),
                ("a".to_string(), vec![1.0, 2.0], 2.0),
                ("b".to_string(), vec![-0.0, -1.0], 1.0),
                ("b".to_string(), vec![-1.0, -2.0], 2.0),
            ]
        );
        // Silent for nine of its usual intervals (1 s) and the gap: still the same stream,
        // and the usual interval grows a quarter of the way towards that silence (3.75 s).
        let p = s.push_reading("a", 2000 + 9000 + GAP_MS, t, vec![3.0]);
        assert!(!p.restarted, "{p:?}");
        windows(&mut s);
        // Longer than nine of those and the gap: the stream starts over, and its next window
        // is made of new readings only.
        let after = 2000 + 9000 + GAP_MS + 9 * 3750 + GAP_MS + 1;
        let p = s.push_reading("a", after, t, vec![5.0]);
        assert!(p.restarted, "{p:?}");
        assert!(
            windows(&mut s).is_empty(),
            "one new reading is no window of two"
        );
        s.push_reading("a", after + 1000, t, vec![6.0]);
        let w = windows(&mut s);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].1, [5.0, 6.0]);
        assert_eq!(w[0].2, 1.0, "timed from the new stream's first reading");
        // A slow sensor's second reading, a minute after its first, is no pause: a stream
        // with no usual interval yet never starts over.
        s.push_reading("slow", 0, t, vec![1.0]);
        let p = s.push_reading("slow", 60_000, t, vec![2.0]);
        assert!(!p.restarted, "{p:?}");
    }

    #[test]
    fn readings_windows_without_state_never_mix_sources() {
        let mut p = PerSource::new(Readings::new(2, 2, vec![2]));
        let data = |i: Option<Input>| match i {
            Some(Input::Tensor { data, .. }) => Some(data),
            _ => None,
        };
        assert_eq!(data(p.push("a", vec![1.0])), None);
        assert_eq!(data(p.push("b", vec![10.0])), None);
        assert_eq!(data(p.push("a", vec![2.0])), Some(vec![1.0, 2.0]));
        assert_eq!(data(p.push("b", vec![20.0])), Some(vec![10.0, 20.0]));
        p.reset();
        assert_eq!(
            data(p.push("a", vec![3.0])),
            None,
            "a reset forgets readings"
        );
    }
}
