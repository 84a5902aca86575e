//! The update core on plain values: every refusal class, every transition, every place a
//! restart picks up. Each case builds signed manifests with a fresh key, feeds the core what
//! the driver would, and checks what it asks for, in order.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tern_update::Code;
use tern_update::bundle::{self, Artifact, KeySet, Signed, Targets};
use tern_update::command::{SigningKey, generate_pkcs8};
use tern_update::topics;

use super::*;

const NOW_S: i64 = 1_800_000_000;
const CHUNK: u64 = 4096;
const TOPIC: &str = "tern/fleet/lab/update/m";

fn key() -> SigningKey {
    SigningKey::from_pkcs8(&generate_pkcs8()).expect("a fresh key")
}

/// A box with one trusted key, online, in the daemon.
struct Box1 {
    core: Core,
    key: SigningKey,
    at: Instant,
    wall_ms: i64,
}

fn settings() -> Settings {
    Settings {
        freshness: None,
        device: "b1".into(),
        groups: vec!["lab".into()],
        arch: std::env::consts::ARCH.into(),
        ternd: semver::Version::new(0, 1, 0),
        topics: Some(topics::Device::new("tern", "b1", &["lab".to_string()])),
        window: 4,
        health_window: Duration::from_secs(60),
        health_max_errors: 3,
        min_free_bytes: 1000,
        in_daemon: true,
    }
}

fn trust(keys: &[&SigningKey], threshold: usize) -> Trust {
    Trust {
        keys: KeySet {
            keys: keys.iter().map(|k| k.public()).collect(),
            threshold,
            retired: Vec::new(),
        },
        version: 0,
        doc: None,
    }
}

fn artifact_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

fn signed(name: &str, version: &str, art: &[u8]) -> Signed {
    Signed {
        format: bundle::FORMAT,
        kind: "model".into(),
        name: name.into(),
        version: version.into(),
        artifact: Artifact::describe(art, CHUNK),
        targets: Targets::default(),
        expires: NOW_S + 3600,
        issued: Some(NOW_S),
        shadow: None,
    }
}

fn payload(m: &bundle::Manifest) -> Bytes {
    Bytes::from(serde_json::to_vec(m).unwrap())
}

impl Box1 {
    fn new() -> Box1 {
        Box1::with(settings())
    }

    fn with(s: Settings) -> Box1 {
        let key = key();
        let at = Instant::now();
        let wall_ms = NOW_S * 1000;
        let mut b = Box1 {
            core: Core::new(s, trust(&[&key], 1), Now { at, wall_ms }),
            key,
            at,
            wall_ms,
        };
        let t = trust(&[&b.key], 1);
        let a = b.step(Input::Resume {
            open: Vec::new(),
            trust: t,
            next_id: 7,
            time: None,
        });
        assert!(matches!(&a[..], [Action::CleanStaging { keep }] if keep.is_empty()));
        assert!(b.step(Input::Link(Link::Online)).is_empty());
        b
    }

    fn now(&self) -> Now {
        Now {
            at: self.at,
            wall_ms: self.wall_ms,
        }
    }

    fn later(&mut self, d: Duration) {
        self.at += d;
        self.wall_ms += d.as_millis() as i64;
    }

    fn step(&mut self, i: Input) -> Vec<Action> {
        let now = self.now();
        self.core.step(i, now)
    }

    fn done(&mut self, o: Outcome) -> Vec<Action> {
        self.step(Input::Done(o))
    }

    fn ok(&mut self) -> Vec<Action> {
        self.done(Outcome::Recorded(Ok(())))
    }

    /// A manifest of `m` 1.1.0 signed by the box's key, with `edit` applied.
    fn manifest(&self, version: &str, edit: impl Fn(&mut Signed)) -> Bytes {
        let mut s = signed("m", version, &artifact_bytes(10_000));
        edit(&mut s);
        payload(&bundle::sign(&s, &[&self.key]))
    }

    fn offer(&mut self, p: Bytes, facts: ManifestFacts) -> Vec<Action> {
        self.offer_on(TOPIC, p, facts)
    }

    fn offer_on(&mut self, source: &str, p: Bytes, facts: ManifestFacts) -> Vec<Action> {
        self.step(Input::Manifest {
            source: source.into(),
            payload: p,
            facts,
        })
    }

    /// Offer a good manifest and take it through recording and staging: downloading, with
    /// the first window of chunks asked for.
    fn downloading(&mut self, p: Bytes) -> Vec<Action> {
        let a = self.offer(p, room());
        assert!(matches!(effect(&a), Some(Effect::Insert { .. })), "{a:?}");
        let a = self.ok();
        assert!(
            matches!(effect(&a), Some(Effect::CreateStaging { .. })),
            "{a:?}"
        );
        self.ok()
    }

    /// Deliver every chunk of `art` and store each: ends asking to record `verifying`.
    fn all_chunks(&mut self, sha: &str, art: &[u8]) -> Vec<Action> {
        let mut last = Vec::new();
        for (i, c) in art.chunks(CHUNK as usize).enumerate() {
            let a = self.step(Input::Link(Link::Chunk {
                sha256: sha.into(),
                index: i,
                payload: Bytes::from(bundle::chunk_message(sha, i, c)),
            }));
            assert!(
                matches!(effect(&a), Some(Effect::StoreChunk { index, .. }) if *index == i),
                "chunk {i}: {a:?}"
            );
            last = self.done(Outcome::Chunk(Ok(())));
        }
        last
    }

    /// From accepted to `health`: the whole happy path, checking each step asked for.
    fn reach_health(&mut self) {
        let art = artifact_bytes(10_000);
        let sha = tern_update::sha256_hex(&art);
        self.downloading(self.manifest("1.1.0", |_| {}));
        let a = self.all_chunks(&sha, &art);
        assert_eq!(set_state(&a), Some(State::Verifying), "{a:?}");
        let a = self.ok();
        assert!(
            matches!(effect(&a), Some(Effect::VerifyStage { .. })),
            "{a:?}"
        );
        let a = self.done(Outcome::Step(Ok(())));
        assert!(crashed(&a, "update:unpacked"));
        assert_eq!(set_state(&a), Some(State::Staged));
        let a = self.ok();
        assert_eq!(set_state(&a), Some(State::SelfTesting));
        let a = self.ok();
        assert!(matches!(effect(&a), Some(Effect::Install { .. })), "{a:?}");
        let a = self.done(Outcome::Installed(Ok(Some("1.0.0".into()))));
        assert!(crashed(&a, "update:installed"));
        assert!(a.iter().any(
            |x| matches!(x, Action::RecordPrevious { previous: Some(p), .. } if p == "1.0.0")
        ));
        assert_eq!(set_state(&a), Some(State::Activating));
        let a = self.ok();
        assert!(a.iter().any(|x| matches!(x, Action::RemoveStaging { .. })));
        assert!(
            matches!(effect(&a), Some(Effect::Activate { version, .. }) if version.to_string() == "1.1.0")
        );
        let a = self.done(Outcome::Step(Ok(())));
        assert!(crashed(&a, "update:activated"));
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::ModelActivated { version, .. } if version == "1.1.0"))
        );
        assert!(matches!(
            effect(&a),
            Some(Effect::StartWatch { resumed: false, .. })
        ));
        let a = self.done(Outcome::Watching {
            left: Duration::from_secs(60),
            restarts: 0,
        });
        assert_eq!(set_state(&a), Some(State::Health));
        let a = self.ok();
        assert!(crashed(&a, "update:health"));
        assert_eq!(self.core.watching(), Some("m"));
    }

    /// Deliver chunk `index` of the artifact `sha` with `data` as its bytes.
    fn chunk(&mut self, sha: &str, index: usize, data: &[u8]) -> Vec<Action> {
        self.step(Input::Link(Link::Chunk {
            sha256: sha.into(),
            index,
            payload: Bytes::from(bundle::chunk_message(sha, index, data)),
        }))
    }

    fn tick(&mut self, health: Option<HealthFacts>) -> Vec<Action> {
        self.step(Input::Tick {
            health,
            shadow: None,
        })
    }
}

fn room() -> ManifestFacts {
    ManifestFacts {
        free_bytes: u64::MAX,
        ..Default::default()
    }
}

fn healthy(ok: u64, failed: u64) -> Option<HealthFacts> {
    Some(HealthFacts {
        active_version: Some(semver::Version::new(1, 1, 0)),
        ok,
        failed,
        refused: 0,
        hung: false,
    })
}

fn effect(a: &[Action]) -> Option<&Effect> {
    match a.last() {
        Some(Action::Do(e)) => Some(e),
        _ => None,
    }
}

fn set_state(a: &[Action]) -> Option<State> {
    match effect(a) {
        Some(Effect::SetState { state, .. }) => Some(*state),
        _ => None,
    }
}

fn crashed(a: &[Action], point: &str) -> bool {
    a.iter()
        .any(|x| matches!(x, Action::Crash(p) if p == point))
}

fn finished(a: &[Action]) -> Option<(State, Option<Code>)> {
    a.iter().find_map(|x| match x {
        Action::FinishRow { state, code, .. } => Some((*state, *code)),
        _ => None,
    })
}

fn refused_event(a: &[Action]) -> Option<String> {
    a.iter().find_map(|x| match x {
        Action::Event(v) if v["event"] == "update.refused" => Some(v["code"].as_str()?.to_string()),
        _ => None,
    })
}

fn status_state(a: &[Action]) -> Option<String> {
    a.iter().rev().find_map(|x| match x {
        Action::Status { body, .. } => Some(body["state"].as_str()?.to_string()),
        _ => None,
    })
}

fn wanted(a: &[Action]) -> Vec<usize> {
    a.iter()
        .flat_map(|x| match x {
            Action::Want { chunks, .. } => chunks.clone(),
            _ => Vec::new(),
        })
        .collect()
}

/// Every refusal class: the manifest is refused with its code, an event says so, the status
/// says so unless the box has something newer, and nothing is recorded.
#[test]
fn every_refusal_class_is_refused_with_its_code() {
    type Case = (&'static str, Code, fn(&Box1) -> (Bytes, ManifestFacts));
    let cases: Vec<Case> = vec![
        ("unsigned", Code::Unsigned, |b| {
            let s = signed("m", "1.1.0", &artifact_bytes(100));
            let mut m = bundle::sign(&s, &[&b.key]);
            m.signatures.clear();
            (payload(&m), room())
        }),
        ("a key the box does not trust", Code::UnknownKey, |_| {
            let s = signed("m", "1.1.0", &artifact_bytes(100));
            (payload(&bundle::sign(&s, &[&key()])), room())
        }),
        (
            "signed bytes changed after signing",
            Code::BadSignature,
            |b| {
                let s = signed("m", "1.1.0", &artifact_bytes(100));
                let mut m = bundle::sign(&s, &[&b.key]);
                m.signed["version"] = "9.9.9".into();
                (payload(&m), room())
            },
        ),
        ("the same key twice", Code::DuplicateSignature, |b| {
            let s = signed("m", "1.1.0", &artifact_bytes(100));
            (payload(&bundle::sign(&s, &[&b.key, &b.key])), room())
        }),
        ("expired", Code::Expired, |b| {
            (b.manifest("1.1.0", |s| s.expires = NOW_S - 1), room())
        }),
        ("older than installed", Code::Downgrade, |b| {
            let facts = ManifestFacts {
                highest: Some(semver::Version::new(2, 0, 0)),
                ..room()
            };
            (b.manifest("1.1.0", |_| {}), facts)
        }),
        ("installed already", Code::Replay, |b| {
            let facts = ManifestFacts {
                highest: Some(semver::Version::new(1, 1, 0)),
                ..room()
            };
            (b.manifest("1.1.0", |_| {}), facts)
        }),
        ("another device", Code::WrongTarget, |b| {
            (
                b.manifest("1.1.0", |s| s.targets.devices = vec!["b2".into()]),
                room(),
            )
        }),
        ("another group", Code::WrongTarget, |b| {
            (
                b.manifest("1.1.0", |s| s.targets.groups = vec!["other".into()]),
                room(),
            )
        }),
        ("another architecture", Code::WrongTarget, |b| {
            (
                b.manifest("1.1.0", |s| s.targets.arch = vec!["sparc".into()]),
                room(),
            )
        }),
        ("a newer ternd", Code::WrongTarget, |b| {
            let m = b.manifest("1.1.0", |s| s.targets.min_ternd = Some("99.0.0".into()));
            (m, room())
        }),
        ("a name that escapes its folder", Code::BadName, |b| {
            (b.manifest("1.1.0", |s| s.name = "../m".into()), room())
        }),
        ("a kind this box does not install", Code::Malformed, |b| {
            (b.manifest("1.1.0", |s| s.kind = "daemon".into()), room())
        }),
        ("not JSON", Code::Malformed, |_| {
            (Bytes::from_static(b"{nope"), room())
        }),
        ("over the size bound", Code::Oversize, |_| {
            (
                Bytes::from(vec![b' '; bundle::MAX_MANIFEST_BYTES + 1]),
                room(),
            )
        }),
        ("chunk hashes that do not add up", Code::BadArtifact, |b| {
            (
                b.manifest("1.1.0", |s| s.artifact.chunks.pop().map(drop).unwrap_or(())),
                room(),
            )
        }),
        ("a shadow rule that is no rule", Code::Malformed, |b| {
            let mut spec = shadow_spec();
            spec.fraction = 0.0;
            (
                b.manifest("1.1.0", |s| s.shadow = Some(spec.clone())),
                room(),
            )
        }),
        ("an artifact hash that is no hash", Code::BadArtifact, |b| {
            (
                b.manifest("1.1.0", |s| s.artifact.sha256 = "xyz".into()),
                room(),
            )
        }),
    ];
    assert!(cases.len() >= 17);
    for (what, code, make) in cases {
        let mut b = Box1::new();
        let (p, facts) = make(&b);
        let a = b.offer(p, facts);
        assert_eq!(
            refused_event(&a).as_deref(),
            Some(code.as_str()),
            "{what}: {a:?}"
        );
        // Every refusal is said on the status topic, downgrades and replays too, so a
        // rollout tool waiting for this manifest hears at once.
        assert_eq!(status_state(&a).as_deref(), Some("refused"), "{what}");
        assert!(
            effect(&a).is_none() && b.core.current().is_none(),
            "{what}: {a:?}"
        );
    }
}

#[test]
fn below_the_threshold_and_revoked_keys_are_refused() {
    let mut b = Box1::new();
    let second = key();
    let t = Trust {
        keys: KeySet {
            keys: vec![b.key.public(), second.public()],
            threshold: 2,
            retired: Vec::new(),
        },
        version: 0,
        doc: None,
    };
    b.step(Input::Resume {
        open: Vec::new(),
        trust: t,
        next_id: 1,
        time: None,
    });
    let a = b.offer(b.manifest("1.1.0", |_| {}), room());
    assert_eq!(refused_event(&a).as_deref(), Some("below_threshold"));

    let mut b = Box1::new();
    let old = key();
    let t = Trust {
        keys: KeySet {
            keys: vec![b.key.public()],
            threshold: 1,
            retired: vec![old.public()],
        },
        version: 1,
        doc: None,
    };
    b.step(Input::Resume {
        open: Vec::new(),
        trust: t,
        next_id: 1,
        time: None,
    });
    let s = signed("m", "1.1.0", &artifact_bytes(100));
    let a = b.offer(payload(&bundle::sign(&s, &[&old])), room());
    assert_eq!(refused_event(&a).as_deref(), Some("revoked_key"));
}

#[test]
fn with_no_keys_configured_nothing_is_trusted() {
    let mut b = Box1::new();
    b.step(Input::Resume {
        open: Vec::new(),
        trust: trust(&[], 1),
        next_id: 1,
        time: None,
    });
    let a = b.offer(b.manifest("1.1.0", |_| {}), room());
    assert_eq!(refused_event(&a).as_deref(), Some("unknown_key"));
}

#[test]
fn a_refusal_from_a_file_says_no_status() {
    let mut b = Box1::new();
    let p = b.manifest("1.1.0", |s| s.expires = 0);
    let a = b.offer_on("file:/tmp/x.bundle", p, room());
    assert_eq!(refused_event(&a).as_deref(), Some("expired"));
    assert_eq!(status_state(&a), None);
}

#[test]
fn the_happy_path_goes_through_every_state_and_commits_after_the_window() {
    let mut b = Box1::new();
    b.reach_health();
    // Inside the window, healthy: nothing.
    assert!(b.tick(healthy(10, 0)).is_empty());
    b.later(Duration::from_secs(61));
    let a = b.tick(healthy(10, 0));
    assert!(crashed(&a, "update:health-passed"));
    assert_eq!(finished(&a), Some((State::Committed, None)));
    assert_eq!(status_state(&a).as_deref(), Some("committed"));
    assert!(b.core.current().is_none());
}

fn shadow_spec() -> bundle::ShadowSpec {
    bundle::ShadowSpec::parse_pairs("agreement=0.95,samples=50").unwrap()
}

fn verdict(promote: bool) -> Option<ShadowVerdict> {
    Some(ShadowVerdict {
        promote,
        reason: "agreement 0.5000 over 50 samples by rule".into(),
    })
}

impl Box1 {
    /// A manifest with a shadow, taken from accepted to a running shadow.
    fn reach_shadow(&mut self) {
        let art = artifact_bytes(10_000);
        let sha = tern_update::sha256_hex(&art);
        self.downloading(self.manifest("1.1.0", |s| s.shadow = Some(shadow_spec())));
        self.all_chunks(&sha, &art);
        self.ok();
        self.done(Outcome::Step(Ok(())));
        self.ok();
        self.ok();
        let a = self.done(Outcome::Installed(Ok(Some("1.0.0".into()))));
        assert_eq!(set_state(&a), Some(State::Shadow), "{a:?}");
        let a = self.ok();
        assert!(a.iter().any(|x| matches!(x, Action::RemoveStaging { .. })));
        assert!(crashed(&a, "update:shadow"));
        assert!(
            matches!(effect(&a), Some(Effect::StartShadow { version, spec, .. })
                if version.to_string() == "1.1.0" && **spec == shadow_spec()),
            "{a:?}"
        );
        assert_eq!(self.core.shadowing(), None, "not until the shadow runs");
        assert!(self.done(Outcome::Step(Ok(()))).is_empty());
        assert_eq!(
            self.core.shadowing().map(|(n, v)| (n, v.to_string())),
            Some(("m", "1.1.0".into()))
        );
    }
}

/// A manifest with a shadow is installed but not activated: it waits for its verdict, then
/// goes the normal way (activation, health window) or is marked failed with code `shadow`.
#[test]
fn a_shadow_waits_for_its_verdict_then_activates_or_fails() {
    let mut b = Box1::new();
    b.reach_shadow();
    // No verdict yet: nothing, however long.
    b.later(Duration::from_secs(3600));
    assert!(b.tick(None).is_empty());
    let a = b.step(Input::Tick {
        health: None,
        shadow: verdict(true),
    });
    assert_eq!(set_state(&a), Some(State::Activating), "{a:?}");
    let a = b.ok();
    assert!(matches!(effect(&a), Some(Effect::Activate { .. })), "{a:?}");

    let mut b = Box1::new();
    b.reach_shadow();
    let a = b.step(Input::Tick {
        health: None,
        shadow: verdict(false),
    });
    assert!(
        matches!(effect(&a), Some(Effect::Reject { version, .. }) if version.to_string() == "1.1.0"),
        "{a:?}"
    );
    // Marking it failed did not commit: the next tick with the verdict tries again.
    let a = b.done(Outcome::Rejected(Err("disk full".into())));
    assert_eq!(finished(&a), None, "{a:?}");
    b.later(Duration::from_secs(10));
    let a = b.step(Input::Tick {
        health: None,
        shadow: verdict(false),
    });
    assert!(matches!(effect(&a), Some(Effect::Reject { .. })), "{a:?}");
    let a = b.done(Outcome::Rejected(Ok("1.0.0".into())));
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::Shadow))));
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::FinishRow { reason: Some(r), .. }
            if r.contains("agreement 0.5000 over 50"))),
        "{a:?}"
    );
    assert!(b.core.current().is_none());
}

/// A newer version of the model replaces its shadow (the operator fixed a bad publish); one
/// of another model waits for the verdict.
#[test]
fn a_newer_version_replaces_a_shadow_and_another_model_waits() {
    let mut b = Box1::new();
    b.reach_shadow();
    let other = {
        let s = signed("other", "2.0.0", &artifact_bytes(100));
        payload(&bundle::sign(&s, &[&b.key]))
    };
    let a = b.offer_on("tern/d/update/other", other, room());
    assert!(effect(&a).is_none(), "{a:?}");
    assert!(b.core.shadowing().is_some());
    let a = b.offer(b.manifest("1.2.0", |_| {}), room());
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::Superseded))));
    assert!(matches!(effect(&a), Some(Effect::Insert { .. })), "{a:?}");
    assert_eq!(b.core.shadowing(), None);
}

/// A restart in `shadow` starts the shadow again (it goes on from its record); one that
/// cannot start fails the update with its reason.
#[test]
fn a_restart_in_shadow_takes_the_shadow_up_again() {
    let mut b = Box1::new();
    let mut row = open_row(&b, 5, State::Shadow, TOPIC);
    row.manifest = b
        .manifest("1.1.0", |s| s.shadow = Some(shadow_spec()))
        .to_vec();
    let a = resume(&mut b, vec![row.clone()]);
    assert!(
        matches!(effect(&a), Some(Effect::StartShadow { id: 5, .. })),
        "{a:?}"
    );
    assert!(b.done(Outcome::Step(Ok(()))).is_empty());
    assert!(b.core.shadowing().is_some());

    // The box's own trouble starting it: tried again on a later tick, not failed.
    let mut b = Box1::new();
    resume(&mut b, vec![row.clone()]);
    let a = b.done(Outcome::Step(Err((Code::Io, "database is locked".into()))));
    assert_eq!(finished(&a), None, "{a:?}");
    assert!(b.tick(None).is_empty(), "not before the retry time");
    b.later(Duration::from_secs(60));
    let a = b.tick(None);
    assert!(
        matches!(effect(&a), Some(Effect::StartShadow { .. })),
        "{a:?}"
    );
    assert!(b.done(Outcome::Step(Ok(()))).is_empty());
    assert!(b.core.shadowing().is_some());

    let mut b = Box1::new();
    resume(&mut b, vec![row]);
    let a = b.done(Outcome::Step(Err((
        Code::Shadow,
        "version 1.1.0 is not installed".into(),
    ))));
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::Shadow))));
}

#[test]
fn acceptance_records_then_stages_then_asks_for_a_window_of_chunks() {
    let mut b = Box1::new();
    let a = b.offer(b.manifest("1.1.0", |_| {}), room());
    match effect(&a) {
        Some(Effect::Insert { id, event, .. }) => {
            assert_eq!(*id, 7, "ids go on from the database's");
            assert_eq!(event["event"], "update.downloading");
        }
        other => panic!("{other:?}"),
    }
    let a = b.ok();
    assert!(crashed(&a, "update:accepted"));
    assert!(matches!(
        effect(&a),
        Some(Effect::CreateStaging {
            id: 7,
            size: 10_000
        })
    ));
    let a = b.ok();
    assert_eq!(wanted(&a), vec![0, 1, 2], "3 chunks, a window of 4");
    assert_eq!(status_state(&a).as_deref(), Some("downloading"));
}

#[test]
fn offline_boxes_ask_for_chunks_when_the_link_comes_back() {
    let mut b = Box1::new();
    b.step(Input::Link(Link::Offline));
    let a = b.downloading(b.manifest("1.1.0", |_| {}));
    assert!(wanted(&a).is_empty());
    let a = b.step(Input::Link(Link::Online));
    assert_eq!(wanted(&a), vec![0, 1, 2]);
}

#[test]
fn only_asked_chunks_of_this_artifact_are_taken() {
    let mut b = Box1::new();
    let art = artifact_bytes(10_000);
    let sha = tern_update::sha256_hex(&art);
    b.downloading(b.manifest("1.1.0", |_| {}));
    let other = "ab".repeat(32);
    let a = b.step(Input::Link(Link::Chunk {
        sha256: other.clone(),
        index: 0,
        payload: Bytes::from(bundle::chunk_message(&other, 0, &art[..4096])),
    }));
    assert!(a.is_empty(), "{a:?}");
    let a = b.step(Input::Link(Link::Chunk {
        sha256: sha.clone(),
        index: 9,
        payload: Bytes::new(),
    }));
    assert!(a.is_empty(), "chunk 9 was never asked for: {a:?}");
}

#[test]
fn a_bad_chunk_is_said_once_and_asked_for_again_later() {
    let mut b = Box1::new();
    let art = artifact_bytes(10_000);
    let sha = tern_update::sha256_hex(&art);
    b.downloading(b.manifest("1.1.0", |_| {}));
    let mut bad = art[..4096].to_vec();
    bad[0] ^= 1;
    let a = b.chunk(&sha, 0, &bad);
    assert_eq!(refused_event(&a).as_deref(), Some("bad_chunk"));
    assert!(effect(&a).is_none());
    // Not asked for again before RETRY_BAD_CHUNK.
    assert!(!wanted(&a).contains(&0));
    b.later(RETRY_BAD_CHUNK + Duration::from_secs(1));
    let a = b.tick(None);
    assert!(wanted(&a).contains(&0), "{a:?}");
    let a = b.chunk(&sha, 0, &bad);
    assert_eq!(refused_event(&a), None, "said once per chunk");
}

#[test]
fn a_chunk_that_cannot_be_written_or_recorded_fails_the_update_as_io() {
    for failure in [
        ChunkFailure::Write("disk".into()),
        ChunkFailure::Record("db".into()),
    ] {
        let mut b = Box1::new();
        let art = artifact_bytes(10_000);
        let sha = tern_update::sha256_hex(&art);
        b.downloading(b.manifest("1.1.0", |_| {}));
        b.step(Input::Link(Link::Chunk {
            sha256: sha.clone(),
            index: 0,
            payload: Bytes::from(bundle::chunk_message(&sha, 0, &art[..4096])),
        }));
        let a = b.done(Outcome::Chunk(Err(failure)));
        assert_eq!(finished(&a), Some((State::Failed, Some(Code::Io))));
    }
}

#[test]
fn a_stalled_download_asks_again_then_fails_as_stalled() {
    let mut b = Box1::new();
    b.downloading(b.manifest("1.1.0", |_| {}));
    b.later(STALL + Duration::from_secs(1));
    let a = b.tick(None);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Unwant { chunks, .. } if chunks == &vec![0, 1, 2]))
    );
    assert_eq!(wanted(&a), vec![0, 1, 2]);
    let mut last = Vec::new();
    for _ in 1..MAX_STALLS {
        b.later(STALL + Duration::from_secs(1));
        last = b.tick(None);
    }
    assert_eq!(finished(&last), Some((State::Failed, Some(Code::Stalled))));
}

#[test]
fn a_manifest_that_expires_during_the_download_fails_as_expired() {
    let mut b = Box1::new();
    b.downloading(b.manifest("1.1.0", |s| s.expires = NOW_S + 30));
    b.later(Duration::from_secs(31));
    let a = b.tick(None);
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::Expired))));
}

#[test]
fn clearing_the_manifest_stops_its_download() {
    let mut b = Box1::new();
    b.downloading(b.manifest("1.1.0", |_| {}));
    let a = b.offer(Bytes::new(), room());
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::Withdrawn))));
    assert!(a.iter().any(|x| matches!(x, Action::Unwant { .. })));
}

#[test]
fn clearing_another_topic_changes_nothing() {
    let mut b = Box1::new();
    b.downloading(b.manifest("1.1.0", |_| {}));
    let a = b.offer_on("tern/b1/update/m", Bytes::new(), room());
    assert!(a.is_empty() && b.core.current().is_some(), "{a:?}");
}

#[test]
fn a_newer_version_of_the_downloading_model_supersedes_it() {
    let mut b = Box1::new();
    b.downloading(b.manifest("1.1.0", |_| {}));
    let a = b.offer_on("tern/b1/update/m", b.manifest("1.2.0", |_| {}), room());
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::Superseded))));
    assert!(matches!(effect(&a), Some(Effect::Insert { id: 8, .. })));
}

#[test]
fn an_older_version_or_another_model_waits_its_turn_and_is_offered_after() {
    let mut b = Box1::new();
    b.downloading(b.manifest("1.2.0", |_| {}));
    let a = b.offer_on("tern/b1/update/m", b.manifest("1.1.0", |_| {}), room());
    assert!(a.is_empty(), "waits: {a:?}");
    let mut other = signed("n", "1.0.0", &artifact_bytes(100));
    other.expires = NOW_S + 100;
    let p = payload(&bundle::sign(&other, &[&b.key]));
    assert!(b.offer_on("tern/b1/update/n", p.clone(), room()).is_empty());
    // The running one ends: the first waiting one is offered again, with fresh facts.
    let a = b.offer(Bytes::new(), room());
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::Withdrawn))));
    match a.last() {
        Some(Action::Reoffer { source, .. }) => assert_eq!(source, "tern/b1/update/m"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn one_manifest_waits_per_model_the_highest() {
    let mut b = Box1::new();
    b.downloading(b.manifest("1.1.0", |_| {}));
    let n = |v: &str, src: &str, b: &mut Box1| {
        let s = signed("n", v, &artifact_bytes(100));
        let p = payload(&bundle::sign(&s, &[&b.key]));
        b.offer_on(src, p, room())
    };
    n("2.0.0", "tern/b1/update/n", &mut b);
    n("1.5.0", "tern/fleet/lab/update/n", &mut b);
    let a = b.offer(Bytes::new(), room());
    let offered: Vec<String> = a
        .iter()
        .filter_map(|x| match x {
            Action::Reoffer { payload, .. } => Some(
                serde_json::from_slice::<Value>(payload).unwrap()["signed"]["version"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(offered, ["2.0.0"], "the lower one was dropped");
}

#[test]
fn a_manifest_seen_in_this_run_is_not_judged_again() {
    let mut b = Box1::new();
    let p = b.manifest("1.1.0", |s| s.expires = 0);
    assert!(refused_event(&b.offer(p.clone(), room())).is_some());
    assert!(b.offer(p, room()).is_empty(), "retained, delivered again");
}

#[test]
fn a_known_manifest_is_taken_again_only_after_a_retryable_failure() {
    let cases = [
        (State::Committed, None, false),
        (State::Failed, Some(Code::SelfTest), false),
        (State::Failed, Some(Code::BadHash), false),
        (State::RolledBack, Some(Code::Health), false),
        (State::Failed, Some(Code::Io), true),
        (State::Failed, Some(Code::NoSpace), true),
        (State::Failed, Some(Code::Stalled), true),
        (State::Failed, Some(Code::Withdrawn), true),
        (State::Failed, Some(Code::BadChunk), true),
        (State::Failed, Some(Code::Interrupted), true),
    ];
    for (state, code, again) in cases {
        let mut b = Box1::new();
        let facts = ManifestFacts {
            known: Some(Known { state, code }),
            ..room()
        };
        let a = b.offer(b.manifest("1.1.0", |_| {}), facts);
        assert_eq!(
            matches!(effect(&a), Some(Effect::Insert { .. })),
            again,
            "{state:?} {code:?}: {a:?}"
        );
    }
}

#[test]
fn a_full_disk_fails_at_once_and_may_be_retried() {
    let mut b = Box1::new();
    let p = b.manifest("1.1.0", |_| {});
    let facts = ManifestFacts {
        free_bytes: 5000,
        ..Default::default()
    };
    b.offer(p.clone(), facts);
    let a = b.ok();
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::NoSpace))));
    assert!(!a.iter().any(|x| matches!(x, Action::Do(_))));
    // Delivered again with room: taken.
    assert!(matches!(
        effect(&b.offer(p, room())),
        Some(Effect::Insert { .. })
    ));
}

#[test]
fn an_update_that_cannot_be_recorded_is_taken_when_delivered_again() {
    let mut b = Box1::new();
    let p = b.manifest("1.1.0", |_| {});
    b.offer(p.clone(), room());
    let a = b.done(Outcome::Recorded(Err("disk I/O error".into())));
    assert!(a.is_empty() && b.core.current().is_none(), "{a:?}");
    assert!(matches!(
        effect(&b.offer(p, room())),
        Some(Effect::Insert { .. })
    ));
}

#[test]
fn staging_that_cannot_be_made_fails_as_io() {
    let mut b = Box1::new();
    b.offer(b.manifest("1.1.0", |_| {}), room());
    b.ok();
    let a = b.done(Outcome::Recorded(Err("read-only file system".into())));
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::Io))));
}

#[test]
fn a_step_that_cannot_be_recorded_is_tried_again_after_a_pause() {
    let mut b = Box1::new();
    let art = artifact_bytes(10_000);
    let sha = tern_update::sha256_hex(&art);
    b.downloading(b.manifest("1.1.0", |_| {}));
    b.all_chunks(&sha, &art);
    let a = b.done(Outcome::Recorded(Err("locked".into())));
    assert!(a.is_empty(), "{a:?}");
    assert!(b.tick(None).is_empty(), "not before STEP_RETRY");
    b.later(STEP_RETRY + Duration::from_millis(1));
    assert_eq!(set_state(&b.tick(None)), Some(State::Verifying));
}

#[test]
fn each_failing_step_ends_with_its_own_code() {
    type Fail = fn(&mut Box1) -> Vec<Action>;
    let cases: [(&str, Code, Fail); 5] = [
        ("verification", Code::BadHash, |b| {
            b.done(Outcome::Step(Err((Code::BadHash, "hash".into()))))
        }),
        ("package", Code::PackageMismatch, |b| {
            b.done(Outcome::Step(Err((Code::PackageMismatch, "other".into()))))
        }),
        ("self-test", Code::SelfTest, |b| {
            b.done(Outcome::Step(Ok(())));
            b.ok();
            b.ok();
            b.done(Outcome::Installed(Err((Code::SelfTest, "vector 2".into()))))
        }),
        ("install io", Code::Io, |b| {
            b.done(Outcome::Step(Ok(())));
            b.ok();
            b.ok();
            b.done(Outcome::Installed(Err((Code::Io, "disk".into()))))
        }),
        ("activation", Code::Activation, |b| {
            b.done(Outcome::Step(Ok(())));
            b.ok();
            b.ok();
            b.done(Outcome::Installed(Ok(None)));
            b.ok();
            b.done(Outcome::Step(Err((Code::Activation, "gone".into()))))
        }),
    ];
    for (what, code, fail) in cases {
        let mut b = Box1::new();
        let art = artifact_bytes(10_000);
        let sha = tern_update::sha256_hex(&art);
        b.downloading(b.manifest("1.1.0", |_| {}));
        b.all_chunks(&sha, &art);
        b.ok();
        let a = fail(&mut b);
        assert_eq!(
            finished(&a),
            Some((State::Failed, Some(code))),
            "{what}: {a:?}"
        );
        assert_eq!(status_state(&a).as_deref(), Some("failed"), "{what}");
    }
}

#[test]
fn health_verdicts_roll_back_on_errors_a_hang_a_switch_or_restarts() {
    type Verdict = (&'static str, Option<HealthFacts>, &'static str);
    let cases: Vec<Verdict> = vec![
        (
            "errors",
            healthy(10, 3),
            "3 inference error(s) and 10 success(es)",
        ),
        (
            "a hang",
            Some(HealthFacts {
                hung: true,
                ..healthy(5, 0).unwrap()
            }),
            "running for more than",
        ),
        (
            "another version active",
            Some(HealthFacts {
                active_version: Some(semver::Version::new(1, 0, 0)),
                ..Default::default()
            }),
            "no longer the active one",
        ),
        (
            "no pool",
            Some(HealthFacts::default()),
            "no longer the active one",
        ),
    ];
    for (what, facts, why) in cases {
        let mut b = Box1::new();
        b.reach_health();
        let a = b.tick(facts);
        match effect(&a) {
            Some(Effect::Reject { reason, .. }) => {
                assert!(reason.contains(why), "{what}: {reason}")
            }
            other => panic!("{what}: {other:?}"),
        }
        let a = b.done(Outcome::Rejected(Ok("1.0.0".into())));
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::ModelActivated { version, .. } if version == "1.0.0"))
        );
        assert_eq!(
            finished(&a),
            Some((State::RolledBack, Some(Code::Health))),
            "{what}"
        );
    }
}

#[test]
fn a_few_errors_among_many_successes_do_not_roll_back() {
    let mut b = Box1::new();
    b.reach_health();
    assert!(b.tick(healthy(100, 3)).is_empty());
    b.later(Duration::from_secs(61));
    assert_eq!(
        finished(&b.tick(healthy(100, 3))),
        Some((State::Committed, None))
    );
}

#[test]
fn a_rollback_that_fails_leaves_the_update_failed() {
    let mut b = Box1::new();
    b.reach_health();
    b.tick(healthy(0, 5));
    let a = b.done(Outcome::Rejected(Err("no previous version".into())));
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::Health))));
}

fn open_row(b: &Box1, id: i64, state: State, source: &str) -> OpenRow {
    OpenRow {
        id,
        state: Some(state),
        source: source.into(),
        manifest: b.manifest("1.1.0", |_| {}).to_vec(),
        health_until_ms: None,
        held: Vec::new(),
        staging: true,
    }
}

fn resume(b: &mut Box1, open: Vec<OpenRow>) -> Vec<Action> {
    let t = trust(&[&b.key], 1);
    b.step(Input::Resume {
        open,
        trust: t,
        next_id: 20,
        time: None,
    })
}

#[test]
fn resume_ends_all_but_the_newest_open_update() {
    let mut b = Box1::new();
    let rows = vec![
        open_row(&b, 3, State::Downloading, TOPIC),
        open_row(&b, 4, State::Downloading, TOPIC),
    ];
    let a = resume(&mut b, rows);
    assert!(matches!(&a[0], Action::CleanStaging { keep } if keep == &vec![3, 4]));
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::Superseded))));
    assert_eq!(b.core.current(), Some((4, State::Downloading)));
}

#[test]
fn resume_fails_an_unreadable_record_and_an_interrupted_file_copy() {
    let mut b = Box1::new();
    let mut row = open_row(&b, 3, State::Verifying, TOPIC);
    row.manifest = b"garbage".to_vec();
    assert_eq!(
        finished(&resume(&mut b, vec![row])),
        Some((State::Failed, Some(Code::Internal)))
    );
    let mut b = Box1::new();
    let row = open_row(&b, 3, State::Downloading, "file:/tmp/x.bundle");
    let a = resume(&mut b, vec![row]);
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::Interrupted))));
    assert!(b.core.current().is_none());
}

#[test]
fn resume_fetches_only_missing_chunks_and_restarts_lost_staging() {
    let mut b = Box1::new();
    let mut row = open_row(&b, 3, State::Downloading, TOPIC);
    row.held = vec![0, 2];
    assert_eq!(wanted(&resume(&mut b, vec![row])), vec![1]);
    let mut b = Box1::new();
    let mut row = open_row(&b, 3, State::Downloading, TOPIC);
    row.held = vec![0, 2];
    row.staging = false;
    let a = resume(&mut b, vec![row]);
    assert!(matches!(
        effect(&a),
        Some(Effect::RestartStaging { id: 3, .. })
    ));
    assert_eq!(
        wanted(&b.ok()),
        vec![0, 1, 2],
        "held chunks are forgotten with the file"
    );
}

#[test]
fn resume_carries_each_later_step_on_from_its_record() {
    let cases = [
        (State::Verifying, "VerifyStage"),
        (State::Staged, "SetState"),
        (State::SelfTesting, "Install"),
        (State::Activating, "Activate"),
    ];
    for (state, want) in cases {
        let mut b = Box1::new();
        let row = open_row(&b, 3, state, TOPIC);
        let a = resume(&mut b, vec![row]);
        let got = format!("{:?}", effect(&a));
        assert!(got.contains(want), "{state:?}: {got}");
    }
}

#[test]
fn resume_in_the_health_window_counts_a_restart_and_records_nothing_new() {
    let mut b = Box1::new();
    let mut row = open_row(&b, 3, State::Health, TOPIC);
    row.health_until_ms = Some(1);
    let a = resume(&mut b, vec![row]);
    assert!(matches!(
        effect(&a),
        Some(Effect::StartWatch {
            id: 3,
            resumed: true,
            ..
        })
    ));
    let a = b.done(Outcome::Watching {
        left: Duration::from_secs(10),
        restarts: 1,
    });
    assert!(a.is_empty(), "no new state recorded: {a:?}");
    // Too many restarts: rolled back at once.
    let mut b = Box1::new();
    let row = open_row(&b, 3, State::Health, TOPIC);
    resume(&mut b, vec![row]);
    let a = b.done(Outcome::Watching {
        left: Duration::from_secs(10),
        restarts: MAX_HEALTH_RESTARTS,
    });
    assert!(
        matches!(effect(&a), Some(Effect::Reject { reason, .. }) if reason.contains("restarted 3 times"))
    );
}

#[test]
fn without_the_daemon_the_health_window_waits_for_it() {
    let mut s = settings();
    s.in_daemon = false;
    let mut b = Box1::with(s);
    let row = open_row(&b, 3, State::Health, TOPIC);
    let a = resume(&mut b, vec![row]);
    assert!(effect(&a).is_none(), "{a:?}");
    assert_eq!(b.core.watching(), None);
    assert!(b.tick(None).is_empty());
}

#[test]
fn a_clean_stop_in_the_health_window_is_remembered() {
    let mut b = Box1::new();
    b.reach_health();
    let a = b.step(Input::Stopping);
    assert!(matches!(&a[..], [Action::CleanStop { id: 7 }]));
    let mut b = Box1::new();
    assert!(b.step(Input::Stopping).is_empty(), "nothing to remember");
}

fn bundle_input(b: &Box1, ticket: u64, len: u64, facts: ManifestFacts) -> Input {
    Input::Bundle {
        ticket,
        path: "/tmp/v.bundle".into(),
        source: "file:/tmp/v.bundle".into(),
        manifest: b.manifest("1.1.0", |_| {}),
        artifact_len: len,
        facts,
    }
}

fn answer(a: &[Action]) -> Option<&Result<i64, InstallError>> {
    a.iter().find_map(|x| match x {
        Action::Answer { result, .. } => Some(result),
        _ => None,
    })
}

#[test]
fn a_bundle_is_answered_once_its_bytes_are_staged_and_goes_on() {
    let mut b = Box1::new();
    let a = b.step(bundle_input(&b, 1, 10_000, room()));
    assert!(matches!(effect(&a), Some(Effect::Insert { .. })));
    b.ok();
    let a = b.ok();
    assert!(wanted(&a).is_empty(), "a bundle's chunks are not fetched");
    assert!(
        matches!(effect(&a), Some(Effect::CopyBundle { path, .. }) if path == std::path::Path::new("/tmp/v.bundle"))
    );
    let a = b.done(Outcome::Step(Ok(())));
    assert_eq!(answer(&a), Some(&Ok(7)));
    assert_eq!(set_state(&a), Some(State::Verifying));
}

#[test]
fn a_bundle_that_serves_already_or_meets_a_busy_box_is_answered_at_once() {
    let mut b = Box1::new();
    let facts = ManifestFacts {
        serving: Some(3),
        ..room()
    };
    let a = b.step(bundle_input(&b, 1, 10_000, facts));
    assert_eq!(answer(&a), Some(&Ok(3)));
    assert!(effect(&a).is_none());
    b.downloading(b.manifest("1.2.0", |_| {}));
    let a = b.step(bundle_input(&b, 2, 10_000, room()));
    assert!(matches!(
        answer(&a),
        Some(Err(InstallError::Busy { id: 7, .. }))
    ));
}

#[test]
fn a_bundle_refused_or_damaged_is_answered_with_why() {
    let mut b = Box1::new();
    let a = b.step(Input::BundleRefused {
        ticket: 1,
        source: "file:/x".into(),
        refusal: bundle::RefusalError::Malformed("no manifest".into()),
    });
    assert!(matches!(answer(&a), Some(Err(InstallError::Refused(_)))));
    assert_eq!(refused_event(&a).as_deref(), Some("malformed"));
    // Its size disagrees with its manifest: failed once recorded, answered with its id.
    let mut b = Box1::new();
    b.step(bundle_input(&b, 1, 9_000, room()));
    let a = b.ok();
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::BadSize))));
    assert_eq!(answer(&a), Some(&Ok(7)));
    // A chunk inside is damaged.
    let mut b = Box1::new();
    b.step(bundle_input(&b, 1, 10_000, room()));
    b.ok();
    b.ok();
    let a = b.done(Outcome::Step(Err((Code::BadChunk, "chunk 1".into()))));
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::BadChunk))));
    assert_eq!(answer(&a), Some(&Ok(7)));
}

#[test]
fn a_key_rotation_signed_by_the_trusted_keys_takes_over() {
    let mut b = Box1::new();
    let next = key();
    let doc = bundle::KeysDoc {
        version: 1,
        keys: vec![next.public().to_base64()],
        threshold: 1,
    };
    let p = payload(&bundle::sign_keys(&doc, &[&b.key]));
    let a = b.step(Input::Link(Link::Keys { payload: p.clone() }));
    assert!(matches!(effect(&a), Some(Effect::Rotate { trust, .. }) if trust.version == 1));
    let a = b.ok();
    assert!(a.iter().any(|x| matches!(x, Action::Redeliver)));
    // The same document again changes nothing; a manifest by the new key is taken.
    assert!(b.step(Input::Link(Link::Keys { payload: p })).is_empty());
    let s = signed("m", "1.1.0", &artifact_bytes(100));
    let a = b.offer(payload(&bundle::sign(&s, &[&next])), room());
    assert!(matches!(effect(&a), Some(Effect::Insert { .. })), "{a:?}");
}

#[test]
fn a_key_rotation_by_an_untrusted_key_is_refused() {
    let mut b = Box1::new();
    let doc = bundle::KeysDoc {
        version: 1,
        keys: vec![key().public().to_base64()],
        threshold: 1,
    };
    let a = b.step(Input::Link(Link::Keys {
        payload: payload(&bundle::sign_keys(&doc, &[&key()])),
    }));
    assert_eq!(refused_event(&a).as_deref(), Some("unknown_key"));
    assert!(effect(&a).is_none());
}

#[test]
fn progress_statuses_are_rate_limited_but_steps_are_said_at_once() {
    let mut b = Box1::new();
    let art = artifact_bytes(10_000);
    let sha = tern_update::sha256_hex(&art);
    b.downloading(b.manifest("1.1.0", |_| {}));
    let mut said = 0;
    for (i, c) in art.chunks(CHUNK as usize).take(2).enumerate() {
        b.step(Input::Link(Link::Chunk {
            sha256: sha.clone(),
            index: i,
            payload: Bytes::from(bundle::chunk_message(&sha, i, c)),
        }));
        said += status_state(&b.done(Outcome::Chunk(Ok(())))).is_some() as usize;
    }
    assert_eq!(said, 0, "within STATUS_EVERY of the last status");
    b.later(STATUS_EVERY);
    let i = 2;
    b.step(Input::Link(Link::Chunk {
        sha256: sha.clone(),
        index: i,
        payload: Bytes::from(bundle::chunk_message(&sha, i, &art[8192..])),
    }));
    let a = b.done(Outcome::Chunk(Ok(())));
    assert_eq!(set_state(&a), Some(State::Verifying));
    assert!(a.iter().any(|x| matches!(x, Action::Progress { .. })));
}

#[test]
fn progress_events_come_every_tenth() {
    let mut b = Box1::new();
    let art = artifact_bytes(40 * CHUNK as usize);
    let sha = tern_update::sha256_hex(&art);
    let mut s = signed("m", "1.1.0", &art);
    s.expires = NOW_S + 3600;
    b.downloading(payload(&bundle::sign(&s, &[&b.key])));
    let mut percents = Vec::new();
    for (i, c) in art.chunks(CHUNK as usize).enumerate() {
        // Each chunk as it is asked for.
        let _ = b.step(Input::Link(Link::Chunk {
            sha256: sha.clone(),
            index: i,
            payload: Bytes::from(bundle::chunk_message(&sha, i, c)),
        }));
        for x in b.done(Outcome::Chunk(Ok(()))) {
            if let Action::Event(v) = x
                && v["event"] == "update.progress"
            {
                percents.push(v["percent"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(percents, [10, 20, 30, 40, 50, 60, 70, 80, 90]);
}

#[test]
fn an_input_while_a_step_is_pending_is_dropped() {
    let mut b = Box1::new();
    b.offer(b.manifest("1.1.0", |_| {}), room());
    assert!(b.tick(None).is_empty());
    assert_eq!(b.core.current(), Some((7, State::Downloading)));
    assert!(matches!(
        effect(&b.ok()),
        Some(Effect::CreateStaging { .. })
    ));
}

#[test]
fn a_superseded_download_s_chunks_count_as_free_space() {
    let mut b = Box1::new();
    let art = artifact_bytes(10_000);
    let sha = tern_update::sha256_hex(&art);
    b.downloading(b.manifest("1.1.0", |_| {}));
    for (i, c) in art.chunks(CHUNK as usize).take(2).enumerate() {
        b.step(Input::Link(Link::Chunk {
            sha256: sha.clone(),
            index: i,
            payload: Bytes::from(bundle::chunk_message(&sha, i, c)),
        }));
        b.done(Outcome::Chunk(Ok(())));
    }
    // 1.2.0 needs 3 × 10,000 + 1000 bytes; the disk shows 24,000 free with 1.1.0's two
    // staged chunks (8192 bytes) still on it.
    let facts = ManifestFacts {
        free_bytes: 24_000,
        ..Default::default()
    };
    let a = b.offer_on("tern/b1/update/m", b.manifest("1.2.0", |_| {}), facts);
    assert_eq!(finished(&a), Some((State::Failed, Some(Code::Superseded))));
    let a = b.ok();
    assert!(
        matches!(effect(&a), Some(Effect::CreateStaging { .. })),
        "{a:?}"
    );
}

/// Finding 3 of issue 16: a stranger on an update topic cannot push a good waiting manifest
/// out, and what the box says about their junk is short and rate-limited.
#[test]
fn junk_cannot_push_out_a_waiting_manifest_and_its_refusals_are_few_and_short() {
    let mut b = Box1::new();
    b.downloading(b.manifest("1.2.0", |_| {}));
    let good = payload(&bundle::sign(
        &signed("n", "1.0.0", &artifact_bytes(100)),
        &[&b.key],
    ));
    assert!(b.offer_on("tern/b1/update/n", good, room()).is_empty());
    let mut said = 0;
    for i in 0..3 * MAX_WAITING {
        let junk = format!(
            r#"{{"signed": {{"name": "{}", "version": "9.9.{i}"}}, "signatures": []}}"#,
            "x".repeat(100_000)
        );
        let a = b.offer_on(&format!("tern/b1/update/j{i}"), Bytes::from(junk), room());
        for x in &a {
            if let Action::Event(e) = x {
                said += 1;
                assert!(e.to_string().len() < 2048, "{e}");
                assert!(e["model"].is_null(), "{e}");
            }
        }
    }
    assert_eq!(said, REFUSAL_BURST as usize);
    // The running one ends: the good one is offered next.
    let a = b.offer(Bytes::new(), room());
    match a.last() {
        Some(Action::Reoffer { source, .. }) => assert_eq!(source, "tern/b1/update/n"),
        other => panic!("{other:?}"),
    }
    // A minute on, one more refusal is said, with how many were not.
    b.later(Duration::from_secs(61));
    let a = b.offer_on("tern/b1/update/late", Bytes::from_static(b"{}"), room());
    let ev = a
        .iter()
        .find_map(|x| match x {
            Action::Event(e) => Some(e.clone()),
            _ => None,
        })
        .expect("a refusal event");
    assert_eq!(
        ev["suppressed"],
        3 * MAX_WAITING as u64 - REFUSAL_BURST as u64,
        "{ev}"
    );
}

#[test]
fn a_junk_chunk_does_not_hold_off_a_stall() {
    let mut b = Box1::new();
    let art = artifact_bytes(10_000);
    let sha = tern_update::sha256_hex(&art);
    b.downloading(b.manifest("1.1.0", |_| {}));
    b.later(STALL / 2 + Duration::from_secs(1));
    let mut bad = art[..4096].to_vec();
    bad[0] ^= 1;
    let a = b.chunk(&sha, 0, &bad);
    assert_eq!(refused_event(&a).as_deref(), Some("bad_chunk"));
    b.later(STALL / 2 + Duration::from_secs(1));
    let a = b.tick(None);
    assert!(
        a.iter().any(|x| matches!(x, Action::Unwant { .. })),
        "a stall round: {a:?}"
    );
}

#[test]
fn seen_digests_are_bounded() {
    let mut s = Seen::default();
    for i in 0..MAX_SEEN + 10 {
        assert!(s.insert(format!("d{i}")));
    }
    assert!(!s.contains("d0") && !s.contains("d9"));
    assert!(s.contains("d10") && s.contains(&format!("d{}", MAX_SEEN + 9)));
    assert!(!s.insert("d10".into()));
    assert_eq!(s.set.len(), MAX_SEEN);
}

#[test]
fn an_unchanged_status_is_not_said_again() {
    let mut b = Box1::new();
    b.downloading(b.manifest("1.1.0", |_| {}));
    let mut said = 0;
    for _ in 0..10 {
        b.later(STATUS_EVERY + Duration::from_millis(1));
        said += b
            .tick(None)
            .iter()
            .filter(|x| matches!(x, Action::Status { .. }))
            .count();
    }
    assert_eq!(said, 0, "nothing new while waiting for chunks");
}

#[test]
fn a_stalled_download_says_why_in_its_status() {
    let mut b = Box1::new();
    b.downloading(b.manifest("1.1.0", |_| {}));
    let notes = |a: &[Action]| -> Vec<String> {
        a.iter()
            .filter_map(|x| match x {
                Action::Status { body, .. } => body["note"].as_str().map(str::to_string),
                _ => None,
            })
            .collect()
    };
    b.later(STALL / 2);
    assert!(notes(&b.tick(None)).is_empty(), "not stalled yet");
    b.later(STALL / 2 + Duration::from_secs(1));
    let said = notes(&b.tick(None));
    assert!(
        said.len() == 1 && said[0].contains("none of the") && said[0].contains("retained"),
        "{said:?}"
    );
}

/// A signed operator time of `t` unix seconds, by `key`.
fn time_msg(t: i64, key: &SigningKey) -> Bytes {
    payload(&bundle::sign_time(&bundle::TimeDoc { time: t }, &[key]))
}

fn time_in(b: &mut Box1, t: i64) -> Vec<Action> {
    let p = time_msg(t, &b.key);
    b.step(Input::Link(Link::Time { payload: p }))
}

#[test]
fn a_box_without_a_clock_judges_expiry_by_the_operators_signed_time() {
    let mut b = Box1::new();
    // No real-time clock: the box believes it is 1970.
    b.wall_ms = 0;
    let expired = b.manifest("1.1.0", |s| s.expires = NOW_S - 60);
    let a = b.offer(expired, room());
    assert!(
        matches!(effect(&a), Some(Effect::Insert { .. })),
        "without a signed time a 1970 box takes it: {a:?}"
    );

    let mut b = Box1::new();
    b.wall_ms = 0;
    let a = time_in(&mut b, NOW_S);
    assert!(
        matches!(&a[..], [Action::SaveTime(t)] if *t == NOW_S),
        "{a:?}"
    );
    assert_eq!(b.core.clock_s(), NOW_S);
    b.later(Duration::from_secs(30));
    b.tick(None);
    assert_eq!(b.core.clock_s(), NOW_S + 30, "the signed time runs on");
    let expired = b.manifest("1.1.0", |s| s.expires = NOW_S - 60);
    let a = b.offer(expired, room());
    assert_eq!(refused_event(&a).as_deref(), Some("expired"), "{a:?}");

    // An older time, a forged one and one by another key change nothing.
    assert!(time_in(&mut b, NOW_S - 100).is_empty());
    let mut forged = serde_json::from_slice::<Value>(&time_msg(NOW_S + 9_999, &b.key)).unwrap();
    forged["signed"]["time"] = json!(NOW_S + 99_999);
    let a = b.step(Input::Link(Link::Time {
        payload: Bytes::from(forged.to_string()),
    }));
    assert_eq!(refused_event(&a).as_deref(), Some("bad_signature"), "{a:?}");
    let a = b.step(Input::Link(Link::Time {
        payload: time_msg(NOW_S + 9_999, &key()),
    }));
    assert_eq!(refused_event(&a).as_deref(), Some("unknown_key"), "{a:?}");
    assert_eq!(b.core.clock_s(), NOW_S + 30);
}

#[test]
fn the_freshness_rule_refuses_stale_manifests_and_takes_them_when_a_newer_time_comes() {
    let day = Duration::from_secs(86_400);
    let mut b = Box1::with(Settings {
        freshness: Some(day),
        ..settings()
    });
    let good = b.manifest("1.1.0", |_| {});
    let a = b.offer(good.clone(), room());
    assert_eq!(
        refused_event(&a).as_deref(),
        Some("stale"),
        "no time yet: {a:?}"
    );
    assert_eq!(status_state(&a).as_deref(), Some("refused"));

    // The time arrives: the refused manifest is asked for again, and taken.
    let a = time_in(&mut b, NOW_S);
    assert!(a.iter().any(|x| matches!(x, Action::Redeliver)), "{a:?}");
    let a = b.offer(good, room());
    assert!(matches!(effect(&a), Some(Effect::Insert { .. })), "{a:?}");

    // Made two days before the operator's time: stale; no `issued`: stale.
    let mut b = Box1::with(Settings {
        freshness: Some(day),
        ..settings()
    });
    b.wall_ms = 0;
    time_in(&mut b, NOW_S);
    let old = b.manifest("1.1.0", |s| s.issued = Some(NOW_S - 2 * 86_400));
    let a = b.offer(old, room());
    assert_eq!(refused_event(&a).as_deref(), Some("stale"), "{a:?}");
    let undated = b.manifest("1.1.0", |s| s.issued = None);
    let a = b.offer(undated, room());
    assert_eq!(refused_event(&a).as_deref(), Some("stale"), "{a:?}");

    // The operator's time itself too old by the box's clock: stale until a newer one.
    let mut b = Box1::with(Settings {
        freshness: Some(day),
        ..settings()
    });
    time_in(&mut b, NOW_S - 2 * 86_400);
    let fresh = b.manifest("1.1.0", |_| {});
    let a = b.offer(fresh.clone(), room());
    assert_eq!(refused_event(&a).as_deref(), Some("stale"), "{a:?}");
    time_in(&mut b, NOW_S);
    let a = b.offer(fresh, room());
    assert!(matches!(effect(&a), Some(Effect::Insert { .. })), "{a:?}");
}

#[test]
fn a_bundle_file_is_not_held_to_the_freshness_rule_but_to_the_signed_clock() {
    let mut b = Box1::with(Settings {
        freshness: Some(Duration::from_secs(3600)),
        ..settings()
    });
    b.wall_ms = 0;
    let undated = b.manifest("1.1.0", |s| s.issued = None);
    let a = b.step(Input::Bundle {
        ticket: 1,
        path: "/x.bundle".into(),
        source: "file:/x.bundle".into(),
        manifest: undated,
        artifact_len: 10_000,
        facts: room(),
    });
    assert!(matches!(effect(&a), Some(Effect::Insert { .. })), "{a:?}");
}

#[test]
fn the_kept_time_is_the_clock_after_a_restart() {
    let mut b = Box1::new();
    b.wall_ms = 0;
    let t = trust(&[&b.key], 1);
    b.step(Input::Resume {
        open: Vec::new(),
        trust: t,
        next_id: 9,
        time: Some(NOW_S),
    });
    assert_eq!(b.core.clock_s(), NOW_S);
    let expired = b.manifest("1.1.0", |s| s.expires = NOW_S - 1);
    let a = b.offer(expired, room());
    assert_eq!(refused_event(&a).as_deref(), Some("expired"), "{a:?}");
}

#[test]
fn a_time_far_ahead_of_a_set_clock_is_refused_and_only_a_time_can_fix_refusals_are_asked_again() {
    let mut b = Box1::new();
    let a = time_in(&mut b, NOW_S + 2 * 86_400);
    assert_eq!(refused_event(&a).as_deref(), Some("malformed"), "{a:?}");
    assert_eq!(b.core.clock_s(), NOW_S, "not taken");
    // Without a set clock the box cannot tell: it takes it.
    let mut b = Box1::new();
    b.wall_ms = 0;
    let a = time_in(&mut b, NOW_S + 2 * 86_400);
    assert!(matches!(&a[..], [Action::SaveTime(_)]), "{a:?}");

    // A manifest made too long ago stays refused: a newer time does not ask for it again.
    let mut b = Box1::with(Settings {
        freshness: Some(Duration::from_secs(3600)),
        ..settings()
    });
    time_in(&mut b, NOW_S);
    let old = b.manifest("1.1.0", |s| s.issued = Some(NOW_S - 7200));
    let a = b.offer(old.clone(), room());
    assert_eq!(refused_event(&a).as_deref(), Some("stale"), "{a:?}");
    let a = time_in(&mut b, NOW_S + 10);
    assert!(!a.iter().any(|x| matches!(x, Action::Redeliver)), "{a:?}");
    assert!(b.offer(old, room()).is_empty(), "handled already");
}
