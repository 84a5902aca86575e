//! A pipeline's sound, per source: samples cut into the model's windows, the model's stream
//! (its state tensors and score on/off states) carried from one window to the next, one step
//! at a time, and the time of each window's first sample.
//!
//! ```text
//!  Pcm(samples) from source S ─► S's windower ─► S's waiting windows ─► one step in flight
//!                                                                         │ with S's stream
//!                    S's stream, back for S's next window ◄───────────────┘
//! ```
//!
//! Sources never share a stream: two microphones on one MQTT wildcard each have their own.
//! A stream starts over (fresh state, no score flips carried) when its feed restarts, when
//! its source goes quiet for more than [`GAP_MS`] beyond what its last samples lasted (a
//! sender that pauses: the samples after are not the ones before continued), when its
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
    /// When its first new sample was heard, ms since the epoch.
    pub ts_ms: i64,
    /// Its first new sample, seconds from the start of the source's stream.
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

struct Source {
    win: Windower,
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
    /// Per score output said to be on: when it went off, if it did and the stop is not said
    /// yet (it may come back on within the hold: a pause inside speech).
    on: HashMap<String, Option<(i64, f64)>>,
    /// The last window judged: when a stop that never came is timed.
    last_window: (i64, f64),
}

pub struct Streams {
    proto: Windower,
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
    pub fn new(proto: Windower, hold_ms: u64) -> Streams {
        Streams {
            proto,
            hold_ms: hold_ms as i64,
            sources: HashMap::new(),
            next_generation: 1,
        }
    }

    pub fn rate(&self) -> u32 {
        self.proto.rate
    }

    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// Samples `samples` of `source`, heard up to `ts_ms`.
    pub fn push(&mut self, source: &str, ts_ms: i64, taken: Instant, samples: &[f32]) -> Pushed {
        let mut pushed = Pushed::default();
        if !self.sources.contains_key(source) && !self.make_room(&mut pushed.stops) {
            pushed.refused = true;
            return pushed;
        }
        let rate = f64::from(self.proto.rate);
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
                on: HashMap::new(),
                last_window: (ts_ms, 0.0),
            });
        let ms = |n: i64| (n as f64 * 1000.0 / rate).round() as i64;
        let n = samples.len() as i64;
        if src.t0_ms.is_some() && ts_ms - src.last_ms > src.last_len_ms + GAP_MS {
            pushed.dropped += src.end(source, generation, &mut pushed.stops);
            pushed.restarted = true;
        }
        src.last_ms = ts_ms;
        src.last_len_ms = ms(n);
        // Bounded before a window is cut: one message may hold minutes of sound.
        let coming = src.win.windows_after(samples.len());
        if src.waiting.len() + coming > MAX_WAITING {
            pushed.dropped += src.end(source, generation, &mut pushed.stops) + coming as u64;
            pushed.restarted = true;
            return pushed;
        }
        let t0 = *src.t0_ms.get_or_insert(ts_ms - ms(n));
        for (start, input) in src.win.push(samples) {
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
        Streams::new(Windower::for_model(&m, None).unwrap(), 10)
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
}
