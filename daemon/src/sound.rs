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
/// over.
pub const GAP_MS: i64 = 1000;
/// Windows waiting (over all sources) at which the pipeline stops taking samples.
pub const PAUSE_AT: usize = 64;
/// Windows one source may have waiting (over four minutes of Silero VAD's 32 ms windows, one
/// whole message of the largest MQTT payload); more are dropped with the stream.
pub const MAX_WAITING: usize = 8192;
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
    /// started over does not bring its state along.
    pub generation: u64,
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
    /// Per score output: when it went off, not yet said (it may come back on within the
    /// hold: a pause inside speech).
    going_off: HashMap<String, (i64, f64)>,
}

pub struct Streams {
    proto: Windower,
    /// How long a score must stay off before its stop is said.
    hold_ms: i64,
    sources: HashMap<String, Source>,
    next_generation: u64,
}

/// What a push did besides queueing windows.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Windows dropped because too many waited.
    pub dropped: u64,
    /// The source's stream started over (a gap, an overflow).
    pub restarted: bool,
    /// No room for a new source: the samples were not taken.
    pub refused: bool,
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
        if !self.sources.contains_key(source) && !self.make_room() {
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
                going_off: HashMap::new(),
            });
        let ms = |n: i64| (n as f64 * 1000.0 / rate).round() as i64;
        let n = samples.len() as i64;
        if src.t0_ms.is_some() && ts_ms - src.last_ms > src.last_len_ms + GAP_MS {
            src.restart(generation);
            pushed.restarted = true;
        }
        src.last_ms = ts_ms;
        src.last_len_ms = ms(n);
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
        if src.waiting.len() > MAX_WAITING {
            pushed.dropped = src.waiting.len() as u64;
            src.waiting.clear();
            // The windows after the drop do not follow the stream's last state.
            src.generation = generation;
            src.stream = None;
            pushed.restarted = true;
        }
        pushed
    }

    /// Room for one more source: the least recently heard idle one goes if need be.
    fn make_room(&mut self) -> bool {
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
                self.sources.remove(&k);
                true
            }
            None => false,
        }
    }

    /// The feed started over (reconnected, ffmpeg restarted): every source's stream does too.
    pub fn restart(&mut self) {
        let generation = self.generation();
        for s in self.sources.values_mut() {
            s.restart(generation);
        }
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

    /// A step of `source` came back with the stream to carry on with.
    pub fn back(&mut self, source: &str, generation: u64, stream: Option<Stream>) {
        if let Some(s) = self.sources.get_mut(source) {
            s.busy = false;
            if s.generation == generation {
                s.stream = stream;
            }
        }
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
        let mut said = None;
        for (name, o) in outputs.iter_mut() {
            let Some(o) = o.as_object_mut() else { continue };
            let raw = o.remove("event");
            match raw.as_ref().and_then(|e| e.as_str()) {
                Some("start") => {
                    if s.going_off.remove(name).is_none() {
                        o.insert("event".into(), "start".into());
                    }
                }
                Some("stop") => {
                    s.going_off.insert(name.clone(), (ts_ms, start_s));
                }
                _ => {
                    if let Some(&(t, at)) = s.going_off.get(name)
                        && ts_ms - t >= self.hold_ms
                    {
                        s.going_off.remove(name);
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
    fn restart(&mut self, generation: u64) {
        self.win.reset();
        self.t0_ms = None;
        self.stream = None;
        self.waiting.clear();
        self.going_off.clear();
        self.generation = generation;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streams() -> Streams {
        let m = crate::engine::Manifest::parse(
            r#"
format = 2
name = "vad"
version = "1.0.0"
[[inputs]]
name = "input"
dtype = "f32"
shape = [1, 6]
[inputs.audio]
sample_rate = 1000
window = 4
context = 2
[[outputs]]
name = "p"
[outputs.postprocess]
kind = "score"
[selftest]
tolerance = 0.0
golden = ["g.npz"]
"#,
        )
        .unwrap();
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
        // 4 samples heard 3 s after the last 4 (which lasted 4 ms): the sender paused.
        let p = s.push("a", 13_008, t, &[0.1; 4]);
        // Samples that come faster than they play are no pause.
        let mut quick = streams();
        quick.push("q", 5_000, t, &[0.1; 4000]);
        assert!(!quick.push("q", 5_010, t, &[0.1; 4000]).restarted);
        assert!(
            !quick.push("q", 9_000, t, &[0.1; 4]).restarted,
            "within 4 s + 1 s"
        );
        assert!(p.restarted);
        let fresh = s.ready(1);
        assert!(fresh.is_empty(), "the old step still runs");
        s.back("a", step.generation, None);
        let fresh = s.ready(1).pop().unwrap();
        assert_eq!((fresh.window.ts_ms, fresh.window.start_s), (13_004, 0.0));
        assert_ne!(fresh.generation, step.generation);

        s.back("a", fresh.generation, None);
        s.push("a", 13_012, t, &[0.1; 4]);
        s.restart();
        assert_eq!(s.waiting(), 0, "a restart drops what waited");
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
