//! `tern-update rollout`: a signed bundle to a group or a device list in waves, each wave
//! judged by its boxes' retained update statuses before the next starts, stopping (and rolling
//! back) when a wave fails more than allowed.
//!
//! Each wave's boxes get the manifest on their own device topic (`<prefix>/<device>/update/
//! <model>`, retained): a box offline during its wave finds it when it returns. The rollout's
//! state is written (temp, fsync, rename) to `<state-dir>/<id>.json` after every change and
//! published retained on `<prefix>/fleet/rollouts/<id>`; running the same id again resumes
//! where it was, from the file or, on another machine, from the broker.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tern_update::command::SigningKey;
use tern_update::topics::{DeviceTopic, Topics};

use crate::BrokerArgs;
use crate::mqtt::{Conn, connect, open_bundle, plain, roll_back};

/// A wave's size as the operator wrote it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Size {
    Count(usize),
    Percent(f64),
    Rest,
}

/// `1,5%,25%,rest`: counts, percentages of the whole target (rounded up, at least one box),
/// and `rest` (only last). Whatever the sizes leave over joins the last wave.
pub fn parse_waves(spec: &str) -> anyhow::Result<Vec<Size>> {
    let items: Vec<&str> = spec.split(',').map(str::trim).collect();
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let size = if *item == "rest" {
            if i + 1 != items.len() {
                bail!("--waves {spec}: `rest` can only be the last wave");
            }
            Size::Rest
        } else if let Some(p) = item.strip_suffix('%') {
            match p.parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Size::Percent(p),
                _ => bail!("--waves {spec}: `{item}` is not a percentage in (0, 100]"),
            }
        } else {
            match item.parse::<usize>() {
                Ok(n) if n > 0 => Size::Count(n),
                _ => bail!("--waves {spec}: `{item}` is not a count, a percentage or `rest`"),
            }
        };
        out.push(size);
    }
    Ok(out)
}

/// The waves' devices, in the order given.
pub fn plan(devices: &[String], sizes: &[Size]) -> Vec<Vec<String>> {
    let total = devices.len();
    let mut waves = Vec::new();
    let mut next = 0;
    for (i, s) in sizes.iter().enumerate() {
        if next >= total {
            break;
        }
        let n = match *s {
            Size::Count(n) => n,
            Size::Percent(p) => ((total as f64 * p / 100.0).ceil() as usize).max(1),
            Size::Rest => total,
        };
        let last = i + 1 == sizes.len();
        let end = if last { total } else { (next + n).min(total) };
        waves.push(devices[next..end].to_vec());
        next = end;
    }
    waves
}

/// How many failures a wave may have and still let the rollout go on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    Count(usize),
    Percent(f64),
}

impl Threshold {
    pub fn parse(s: &str) -> anyhow::Result<Threshold> {
        let bad = || {
            anyhow::anyhow!("--abort-above {s}: give a count (`0`, `2`) or a percentage (`10%`)")
        };
        Ok(match s.trim().strip_suffix('%') {
            Some(p) => match p.parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Threshold::Percent(p),
                _ => return Err(bad()),
            },
            None => Threshold::Count(s.trim().parse().map_err(|_| bad())?),
        })
    }

    /// Whether `failed` of a wave of `size` is within the threshold.
    pub fn allows(self, failed: usize, size: usize) -> bool {
        match self {
            Threshold::Count(n) => failed <= n,
            Threshold::Percent(p) => failed as f64 * 100.0 <= p * size as f64 + 1e-9,
        }
    }
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Threshold::Count(n) => write!(f, "{n}"),
            Threshold::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Running,
    Completed,
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub devices: Vec<String>,
    /// When its manifests were published and acknowledged by the broker.
    pub targeted_ms: Option<i64>,
    /// When it was judged good.
    pub passed_ms: Option<i64>,
}

/// Everything a rollout is, as kept in its file and its retained topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub model: String,
    pub version: String,
    pub manifest_sha256: String,
    /// The signed manifest itself (JSON text): a resume needs no bundle file once the chunks
    /// are on the broker.
    pub manifest: String,
    pub artifact_sha256: String,
    pub group: Option<String>,
    pub waves_spec: String,
    pub abort_above: Threshold,
    pub wait_secs: u64,
    pub soak_secs: u64,
    pub chunks_published: bool,
    pub waves: Vec<Wave>,
    /// The wave under way (= waves.len() when all passed).
    pub current: usize,
    pub phase: Phase,
    pub reason: Option<String>,
    /// Each box's latest state for this manifest (`committed`, `failed`, ...), with the
    /// reason a failing one gave.
    pub outcomes: BTreeMap<String, Outcome>,
    /// What the abort's rollback did, per box.
    pub rollbacks: BTreeMap<String, String>,
    pub started_ms: i64,
    pub updated_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// How long a targeted box with no presence on record is waited for before it counts as away.
const UNHEARD_GRACE: Duration = Duration::from_secs(15);

const TERMINAL_FAILURES: [&str; 3] = ["failed", "refused", "rolled_back"];

fn is_terminal(state: &str) -> bool {
    state == "committed" || TERMINAL_FAILURES.contains(&state)
}

/// What the rollout knows of the boxes from their retained and live messages.
#[derive(Default)]
struct Watch {
    online: BTreeMap<String, bool>,
    groups: BTreeMap<String, Vec<String>>,
}

impl Watch {
    /// Read one message; a status of this rollout's manifest goes into `r.outcomes` (without
    /// a rollout yet, only presence is read). Whether anything the rollout keeps changed.
    fn take(
        &mut self,
        topics: &Topics,
        r: Option<&mut Rollout>,
        topic: &str,
        payload: &[u8],
    ) -> bool {
        let Some((dev, what)) = topics.parse_device(topic) else {
            return false;
        };
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return false;
        };
        match what {
            DeviceTopic::State => {
                self.online.insert(dev.clone(), v["state"] == "online");
                if let Some(g) = v["groups"].as_array() {
                    let g = g.iter().filter_map(|x| x.as_str().map(str::to_string));
                    self.groups.insert(dev, g.collect());
                }
                false
            }
            DeviceTopic::UpdateStatus(model) => {
                let Some(r) = r else { return false };
                if model != r.model
                    || v["manifest_sha256"].as_str() != Some(r.manifest_sha256.as_str())
                {
                    return false;
                }
                // A box with no presence on record that speaks of this manifest is up: its
                // birth, retained, was not delivered here, which a broker whose nodes keep
                // retained messages apart does when given one node.
                if !self.online.contains_key(&dev) {
                    eprintln!(
                        "tern-update: {dev} reports on this update, but its presence (a \
                         retained birth) never reached us: does the broker keep retained \
                         messages per node? Give each node with --broker"
                    );
                    self.online.insert(dev.clone(), true);
                }
                // A box still at it may say why it is stuck (`note`).
                let reason = v["reason"].as_str().or(v["note"].as_str());
                let o = Outcome {
                    state: plain(&v["state"]),
                    reason: reason.unwrap_or("").to_string(),
                };
                r.outcomes.insert(dev, o.clone()) != Some(o)
            }
            DeviceTopic::Telemetry => false,
        }
    }

    fn is_online(&self, dev: &str) -> bool {
        self.online.get(dev).copied().unwrap_or(false)
    }
}

/// A wave's standing at one moment.
#[derive(Debug, Default, PartialEq)]
pub struct Standing {
    pub committed: Vec<String>,
    pub failed: Vec<String>,
    /// Online and not finished.
    pub busy: Vec<String>,
    /// Offline and not finished: late joiners.
    pub away: Vec<String>,
}

fn standing(r: &Rollout, wave: usize, online: &dyn Fn(&str) -> bool) -> Standing {
    let mut s = Standing::default();
    for d in &r.waves[wave].devices {
        match r.outcomes.get(d).map(|o| o.state.as_str()) {
            Some("committed") => s.committed.push(d.clone()),
            Some(st) if TERMINAL_FAILURES.contains(&st) => s.failed.push(d.clone()),
            _ if online(d) => s.busy.push(d.clone()),
            _ => s.away.push(d.clone()),
        }
    }
    s
}

pub struct Args {
    pub broker: BrokerArgs,
    pub id: String,
    pub bundle: Option<PathBuf>,
    pub group: Option<String>,
    pub devices: Vec<String>,
    pub waves: Option<String>,
    pub abort_above: Option<String>,
    pub wait_secs: Option<u64>,
    pub soak_secs: Option<u64>,
    pub late_secs: u64,
    pub command_key: Option<SigningKey>,
    pub state_dir: Option<PathBuf>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn default_state_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").context("no HOME for the state dir")?)
            .join(".local/state"),
    };
    Ok(base.join("tern-update/rollouts"))
}

fn check_id(id: &str) -> anyhow::Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.');
    if !ok {
        bail!(
            "--id {id:?}: use up to 64 letters, digits, `-`, `_`, `.` (it names a file and a topic)"
        );
    }
    Ok(())
}

/// The rollout's file and the retained copy, both after every change.
struct Keeper {
    path: PathBuf,
    topic: String,
}

impl Keeper {
    async fn save(&self, conn: &mut Conn, r: &mut Rollout) -> anyhow::Result<()> {
        r.updated_ms = now_ms();
        let bytes = serde_json::to_vec_pretty(r)?;
        write_atomic(&self.path, &bytes)?;
        conn.publish(&self.topic, bytes, true).await
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("state file without a directory")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Run (or resume) a rollout: 0 when every wave passed, 65 when it stopped on failures.
pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    check_id(&a.id)?;
    let dir = match &a.state_dir {
        Some(d) => d.clone(),
        None => default_state_dir()?,
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // One runner per rollout on this machine: two would publish and roll back over each other.
    let lock_path = dir.join(format!("{}.lock", a.id));
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "rollout {} is already running here ({} is locked)",
            a.id,
            lock_path.display()
        );
    }
    let topics = Topics::new(&a.broker.prefix);
    let keeper = Keeper {
        path: dir.join(format!("{}.json", a.id)),
        topic: topics.rollout(&a.id),
    };
    let mut conn = connect(&a.broker).await?;
    conn.subscribe(&topics.rollout(&a.id)).await?;
    let mut retained: Option<Rollout> = None;
    for (t, p) in conn
        .gather(Duration::from_millis(700), Duration::from_secs(5))
        .await
    {
        if t == keeper.topic && !p.is_empty() {
            retained = Some(serde_json::from_slice(&p).with_context(|| {
                format!("{t}: the retained rollout state is not one this tool reads")
            })?);
        }
    }
    conn.unsubscribe(&topics.rollout(&a.id)).await?;
    let stored = match std::fs::read(&keeper.path) {
        Ok(b) => Some(
            serde_json::from_slice::<Rollout>(&b)
                .with_context(|| format!("{}: not a rollout state", keeper.path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if retained.is_some() {
                eprintln!(
                    "rollout {}: no state in {}; taking it over from {}",
                    a.id,
                    keeper.path.display(),
                    keeper.topic
                );
            }
            retained
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", keeper.path.display())),
    };
    conn.subscribe(&topics.all_states()).await?;
    let mut watch = Watch::default();
    let mut r = match stored {
        Some(r) => {
            check_resume(&a, &r)?;
            eprintln!(
                "rollout {}: resuming {} {} at wave {}/{} ({:?})",
                r.id,
                r.model,
                r.version,
                (r.current + 1).min(r.waves.len()),
                r.waves.len(),
                r.phase
            );
            r
        }
        None => start(&a, &mut conn, &topics, &mut watch).await?,
    };
    conn.subscribe(&topics.update_status("+", &r.model)).await?;
    for (t, p) in conn
        .gather(Duration::from_millis(700), Duration::from_secs(10))
        .await
    {
        watch.take(&topics, Some(&mut r), &t, &p);
    }
    keeper.save(&mut conn, &mut r).await?;
    let code = drive(&a, &mut conn, &topics, &keeper, &mut watch, &mut r).await?;
    report(&r, &watch);
    // The retained state is what a second operator reads: on the broker before we go.
    conn.settle(Duration::from_secs(30)).await?;
    conn.disconnect().await;
    drop(lock);
    Ok(code)
}

/// What a run with the same id may not change.
fn check_resume(a: &Args, r: &Rollout) -> anyhow::Result<()> {
    if let Some(path) = &a.bundle {
        let (file, _) = open_bundle(path)?;
        let sha = tern_update::sha256_hex(&file.manifest_bytes);
        if sha != r.manifest_sha256 {
            bail!(
                "rollout {} is of {} {} (manifest {}), not of {}: choose another --id",
                r.id,
                r.model,
                r.version,
                &r.manifest_sha256[..12],
                path.display()
            );
        }
    }
    let differs = |what: &str, given: bool| -> anyhow::Result<()> {
        if given {
            bail!(
                "rollout {} exists: its {what} cannot change on resume",
                r.id
            );
        }
        Ok(())
    };
    differs("--group", a.group.is_some() && a.group != r.group)?;
    differs("--device list", !a.devices.is_empty())?;
    differs(
        "--waves",
        a.waves.as_ref().is_some_and(|w| *w != r.waves_spec),
    )?;
    differs(
        "--abort-above",
        a.abort_above
            .as_deref()
            .map(Threshold::parse)
            .transpose()?
            .is_some_and(|t| t != r.abort_above),
    )?;
    differs("--wait-secs", a.wait_secs.is_some_and(|w| w != r.wait_secs))?;
    differs("--soak-secs", a.soak_secs.is_some_and(|w| w != r.soak_secs))?;
    Ok(())
}

/// A new rollout: the bundle checked, the target's members found, the waves planned.
async fn start(
    a: &Args,
    conn: &mut Conn,
    topics: &Topics,
    watch: &mut Watch,
) -> anyhow::Result<Rollout> {
    let path = a
        .bundle
        .as_ref()
        .with_context(|| format!("rollout {} is new: give --bundle", a.id))?;
    let spec = a.waves.clone().unwrap_or_else(|| "1,5%,25%,rest".into());
    let sizes = parse_waves(&spec)?;
    let abort_above = Threshold::parse(a.abort_above.as_deref().unwrap_or("0"))?;
    let (file, signed) = crate::mqtt::checked_bundle(path, a.group.as_deref(), &a.devices)?;
    // Members: every box whose birth (or, when away, whose `offline`) names the group.
    for (t, p) in conn
        .gather(Duration::from_millis(700), Duration::from_secs(10))
        .await
    {
        watch.take(topics, None, &t, &p);
    }
    let devices: Vec<String> = match &a.group {
        Some(g) => watch
            .groups
            .iter()
            .filter(|(_, gs)| gs.contains(g))
            .map(|(d, _)| d.clone())
            .collect(),
        None => a.devices.clone(),
    };
    if devices.is_empty() {
        bail!(
            "no box of group `{}` announced itself on {}",
            a.group.as_deref().unwrap_or(""),
            topics.all_states()
        );
    }
    let mut seen = BTreeSet::new();
    if let Some(d) = devices.iter().find(|d| !seen.insert(*d)) {
        bail!("--device {d} is given twice");
    }
    // Boxes online now go first: a canary that is away would hold the first wave up.
    let (mut order, away): (Vec<String>, Vec<String>) =
        devices.into_iter().partition(|d| watch.is_online(d));
    order.extend(away);
    let waves = plan(&order, &sizes)
        .into_iter()
        .map(|devices| Wave {
            devices,
            targeted_ms: None,
            passed_ms: None,
        })
        .collect::<Vec<_>>();
    eprintln!(
        "rollout {}: {} {} to {} box(es) in {} wave(s) of {}",
        a.id,
        signed.name,
        signed.version,
        order.len(),
        waves.len(),
        waves
            .iter()
            .map(|w| w.devices.len().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Rollout {
        id: a.id.clone(),
        model: signed.name.clone(),
        version: signed.version.clone(),
        manifest_sha256: tern_update::sha256_hex(&file.manifest_bytes),
        manifest: String::from_utf8(file.manifest_bytes.clone())
            .context("the bundle's manifest is not UTF-8 JSON")?,
        artifact_sha256: signed.artifact.sha256.clone(),
        group: a.group.clone(),
        waves_spec: spec,
        abort_above,
        wait_secs: a.wait_secs.unwrap_or(600),
        soak_secs: a.soak_secs.unwrap_or(0),
        chunks_published: false,
        waves,
        current: 0,
        phase: Phase::Running,
        reason: None,
        outcomes: BTreeMap::new(),
        rollbacks: BTreeMap::new(),
        started_ms: now_ms(),
        updated_ms: now_ms(),
    })
}

/// Read messages until `until`, keeping the state current; saved when it changed.
async fn follow(
    conn: &mut Conn,
    topics: &Topics,
    keeper: &Keeper,
    watch: &mut Watch,
    r: &mut Rollout,
    until: Instant,
    mut done: impl FnMut(&Rollout, &Watch) -> bool,
) -> anyhow::Result<()> {
    loop {
        if done(r, watch) {
            return Ok(());
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        let first = match tokio::time::timeout(left, conn.messages.recv()).await {
            Err(_) => return Ok(()),
            Ok(None) => bail!("broker connection lost"),
            Ok(Some(m)) => m,
        };
        // Statuses come in bursts: take what is there, then save once.
        let mut changed = watch.take(topics, Some(&mut *r), &first.0, &first.1);
        while let Ok(m) = conn.messages.try_recv() {
            changed |= watch.take(topics, Some(&mut *r), &m.0, &m.1);
        }
        if changed {
            keeper.save(conn, r).await?;
        }
    }
}

fn at(ms: i64) -> Instant {
    let ago = Duration::from_millis(now_ms().saturating_sub(ms).max(0) as u64);
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

async fn drive(
    a: &Args,
    conn: &mut Conn,
    topics: &Topics,
    keeper: &Keeper,
    watch: &mut Watch,
    r: &mut Rollout,
) -> anyhow::Result<ExitCode> {
    match r.phase {
        Phase::Aborted => return Ok(ExitCode::from(65)),
        Phase::Completed => {
            late_joiners(a, conn, topics, keeper, watch, r).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Phase::Running => {}
    }
    if !r.chunks_published {
        let path = a.bundle.as_ref().with_context(|| {
            format!(
                "rollout {}: its chunks were not all published when it stopped; give --bundle again",
                r.id
            )
        })?;
        crate::mqtt::publish_chunks(conn, topics, path, &r.artifact_sha256).await?;
        r.chunks_published = true;
        keeper.save(conn, r).await?;
    }
    let run_started = Instant::now();
    let n = r.waves.len();
    while r.current < n {
        let w = r.current;
        if r.waves[w].targeted_ms.is_none() {
            for d in r.waves[w].devices.clone() {
                conn.publish(
                    &topics.manifest(&d, &r.model),
                    r.manifest.clone().into_bytes(),
                    true,
                )
                .await?;
            }
            conn.settle(Duration::from_secs(60)).await?;
            r.waves[w].targeted_ms = Some(now_ms());
            keeper.save(conn, r).await?;
            eprintln!(
                "wave {}/{n}: {} box(es) targeted",
                w + 1,
                r.waves[w].devices.len()
            );
        }
        let size = r.waves[w].devices.len();
        if r.waves[w].passed_ms.is_none() {
            // A run started after the wave was targeted (a resume) gives its boxes a whole
            // wait again: a box that came back and is installing is not yet a failure.
            let deadline = at(r.waves[w].targeted_ms.expect("set above")).max(run_started)
                + Duration::from_secs(r.wait_secs);
            // A box with no presence on record may be up all the same (its retained birth kept
            // on another broker node): it has a while to speak of this update before it
            // counts as away.
            let grace = (Instant::now() + UNHEARD_GRACE).min(deadline);
            follow(conn, topics, keeper, watch, r, grace, |r, watch| {
                standing(r, w, &|d| watch.online.get(d).copied().unwrap_or(true))
                    .busy
                    .is_empty()
            })
            .await?;
            follow(conn, topics, keeper, watch, r, deadline, |r, watch| {
                standing(r, w, &|d| watch.is_online(d)).busy.is_empty()
            })
            .await?;
            let s = standing(r, w, &|d| watch.is_online(d));
            // Boxes still at it when the wait is over did not make it in time.
            let failed = s.failed.len() + s.busy.len();
            eprintln!(
                "wave {}/{n}: {} committed, {} failed, {} without an outcome in {} s, {} away",
                w + 1,
                s.committed.len(),
                s.failed.len(),
                s.busy.len(),
                r.wait_secs,
                s.away.len()
            );
            if !r.abort_above.allows(failed, size) {
                let mut why: Vec<String> = s
                    .failed
                    .iter()
                    .map(|d| {
                        let o = &r.outcomes[d];
                        format!("{d} {} {}", o.state, o.reason)
                            .trim_end()
                            .to_string()
                    })
                    .collect();
                why.extend(s.busy.iter().map(|d| match r.outcomes.get(d) {
                    Some(o) => {
                        format!("{d} no outcome (last {} {})", o.state, o.reason).replace(" )", ")")
                    }
                    None => format!("{d} no outcome"),
                }));
                let reason = format!(
                    "wave {}: {failed} of {size} failed, above {}: {}",
                    w + 1,
                    r.abort_above,
                    why.join("; ")
                );
                abort(a, conn, topics, keeper, watch, r, reason).await?;
                return Ok(ExitCode::from(65));
            }
            // Only a wave whose boxes were all away has nothing to judge it by.
            if s.committed.is_empty() && failed == 0 {
                bail!(
                    "wave {}: none of its {size} box(es) was online to update within {} s; run \
                     the rollout again to wait on",
                    w + 1,
                    r.wait_secs
                );
            }
            r.waves[w].passed_ms = Some(now_ms());
            keeper.save(conn, r).await?;
        }
        if w + 1 < n && r.soak_secs > 0 {
            let until =
                at(r.waves[w].passed_ms.expect("set above")) + Duration::from_secs(r.soak_secs);
            follow(conn, topics, keeper, watch, r, until, |_, _| false).await?;
            // A box of the wave that was away and fails when it returns during the soak
            // counts against its wave.
            let s = standing(r, w, &|d| watch.is_online(d));
            if !r.abort_above.allows(s.failed.len(), size) {
                let reason = format!(
                    "wave {}: {} of {size} failed during the {} s soak, above {}: {}",
                    w + 1,
                    s.failed.len(),
                    r.soak_secs,
                    r.abort_above,
                    s.failed.join(", ")
                );
                abort(a, conn, topics, keeper, watch, r, reason).await?;
                return Ok(ExitCode::from(65));
            }
        }
        r.current = w + 1;
        keeper.save(conn, r).await?;
    }
    r.phase = Phase::Completed;
    keeper.save(conn, r).await?;
    late_joiners(a, conn, topics, keeper, watch, r).await?;
    Ok(ExitCode::SUCCESS)
}

/// Boxes that were away during their wave: wait up to `--late-secs` for them.
async fn late_joiners(
    a: &Args,
    conn: &mut Conn,
    topics: &Topics,
    keeper: &Keeper,
    watch: &mut Watch,
    r: &mut Rollout,
) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(a.late_secs);
    follow(conn, topics, keeper, watch, r, until, |r, _| {
        pending(r).is_empty()
    })
    .await
}

/// The boxes of every wave sent the manifest so far.
fn targeted(r: &Rollout) -> impl Iterator<Item = &String> {
    r.waves
        .iter()
        .filter(|w| w.targeted_ms.is_some())
        .flat_map(|w| &w.devices)
}

/// Targeted boxes without an outcome yet.
fn pending(r: &Rollout) -> Vec<&String> {
    targeted(r)
        .filter(|d| r.outcomes.get(*d).is_none_or(|o| !is_terminal(&o.state)))
        .collect()
}

/// Stop: the targeted boxes' manifests are cleared, so none that has not started installing
/// it will, and those that committed are rolled back.
async fn abort(
    a: &Args,
    conn: &mut Conn,
    topics: &Topics,
    keeper: &Keeper,
    watch: &mut Watch,
    r: &mut Rollout,
    reason: String,
) -> anyhow::Result<()> {
    eprintln!("rollout {} stopped: {reason}", r.id);
    r.phase = Phase::Aborted;
    r.reason = Some(reason);
    keeper.save(conn, r).await?;
    finish_abort(a, conn, topics, keeper, watch, r).await
}

/// The abort's work, safe to run again (a resumed aborted rollout does): withdraw every
/// targeted manifest, wait for boxes past their download (a cleared manifest only stops a
/// download) to finish, and roll back each box that committed and is not rolled back yet.
async fn finish_abort(
    a: &Args,
    conn: &mut Conn,
    topics: &Topics,
    keeper: &Keeper,
    watch: &mut Watch,
    r: &mut Rollout,
) -> anyhow::Result<()> {
    let targeted: Vec<String> = targeted(r).cloned().collect();
    for d in &targeted {
        conn.publish(&topics.manifest(d, &r.model), Vec::new(), true)
            .await?;
    }
    conn.settle(Duration::from_secs(60)).await?;
    let until = Instant::now() + Duration::from_secs(r.wait_secs);
    let busy = |r: &Rollout, watch: &Watch| -> Vec<String> {
        targeted
            .iter()
            .filter(|d| watch.is_online(d))
            .filter(|d| {
                r.outcomes
                    .get(*d)
                    .is_some_and(|o| !is_terminal(&o.state) && o.state != "downloading")
            })
            .cloned()
            .collect()
    };
    follow(conn, topics, keeper, watch, r, until, |r, w| {
        busy(r, w).is_empty()
    })
    .await?;
    let unsettled = busy(r, watch);
    if !unsettled.is_empty() {
        eprintln!(
            "  still installing after {} s (run the rollout again to roll them back once they \
             commit): {}",
            r.wait_secs,
            unsettled.join(" ")
        );
    }
    for d in &targeted {
        let done = r
            .rollbacks
            .get(d)
            .is_some_and(|s| s.starts_with("rolled back"));
        if r.outcomes.get(d).map(|o| o.state.as_str()) != Some("committed") || done {
            continue;
        }
        let result = roll_back(conn, a.command_key.as_ref(), topics, d, &r.model)
            .await
            .unwrap_or_else(|e| Err(format!("broker: {e:#}")));
        let said = match result {
            Ok(v) => format!(
                "rolled back from {} to {}",
                plain(&v["from"]),
                plain(&v["active"])
            ),
            Err(why) => format!("NOT rolled back: {why}"),
        };
        eprintln!("  {d}: {said}");
        r.rollbacks.insert(d.clone(), said);
        keeper.save(conn, r).await?;
    }
    Ok(())
}

fn report(r: &Rollout, watch: &Watch) {
    println!(
        "rollout {}: {} {} {}",
        r.id,
        r.model,
        r.version,
        match r.phase {
            Phase::Running => "running",
            Phase::Completed => "completed",
            Phase::Aborted => "ABORTED",
        }
    );
    if let Some(why) = &r.reason {
        println!("  {why}");
    }
    for (i, w) in r.waves.iter().enumerate() {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for d in &w.devices {
            let st = match r.outcomes.get(d) {
                Some(o) => o.state.as_str(),
                None if w.targeted_ms.is_none() => "not targeted",
                None => "no status",
            };
            *counts.entry(st).or_default() += 1;
        }
        let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        println!(
            "  wave {}: {} box(es): {}",
            i + 1,
            w.devices.len(),
            counts.join(", ")
        );
    }
    let p = pending(r);
    if !p.is_empty() && r.phase == Phase::Completed {
        let (away, busy): (Vec<&String>, Vec<&String>) =
            p.into_iter().partition(|d| !watch.is_online(d));
        for (what, when, names) in [
            ("not back yet", "; they update when they return", &away),
            ("online, still updating", "", &busy),
        ] {
            if names.is_empty() {
                continue;
            }
            let names: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            println!("  {what} ({}{when}): {}", names.len(), names.join(" "));
        }
    }
    for (d, said) in &r.rollbacks {
        println!("  {d}: {said}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty rollout to fill in.
    fn placeholder(id: &str) -> Rollout {
        Rollout {
            id: id.into(),
            model: String::new(),
            version: String::new(),
            manifest_sha256: String::new(),
            manifest: String::new(),
            artifact_sha256: String::new(),
            group: None,
            waves_spec: String::new(),
            abort_above: Threshold::Count(0),
            wait_secs: 0,
            soak_secs: 0,
            chunks_published: false,
            waves: vec![],
            current: 0,
            phase: Phase::Running,
            reason: None,
            outcomes: BTreeMap::new(),
            rollbacks: BTreeMap::new(),
            started_ms: 0,
            updated_ms: 0,
        }
    }

    fn devs(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("b{i:03}")).collect()
    }

    #[test]
    fn waves_follow_the_sizes_and_the_last_takes_the_rest() {
        let w = plan(&devs(100), &parse_waves("1,5%,25%,rest").unwrap());
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), [1, 5, 25, 69]);
        let all: Vec<String> = w.concat();
        assert_eq!(all, devs(100), "every box once, in order");
        // Without `rest`, what is left over joins the last wave.
        let w = plan(&devs(10), &parse_waves("2,3").unwrap());
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), [2, 8]);
        // Fewer boxes than waves: no empty wave.
        let w = plan(&devs(2), &parse_waves("1,5%,25%,rest").unwrap());
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1]);
        // A percentage of a small fleet is still a box.
        let w = plan(&devs(7), &parse_waves("10%,rest").unwrap());
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), [1, 6]);
    }

    #[test]
    fn bad_wave_specs_say_which_item() {
        for (spec, needle) in [
            ("rest,1", "`rest` can only be the last"),
            ("0,rest", "`0`"),
            ("1,150%", "`150%`"),
            ("1,,rest", "`` is not"),
            ("one", "`one`"),
        ] {
            let e = parse_waves(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn thresholds_count_or_share() {
        assert!(Threshold::parse("0").unwrap().allows(0, 5));
        assert!(!Threshold::parse("0").unwrap().allows(1, 5));
        assert!(Threshold::parse("2").unwrap().allows(2, 5));
        let p = Threshold::parse("10%").unwrap();
        assert!(p.allows(1, 10) && !p.allows(2, 10) && !p.allows(1, 5));
        assert!(Threshold::parse("ten").is_err());
        assert!(Threshold::parse("120%").is_err());
    }

    /// A rollout of model `m`, manifest `abc`, whose one wave of `n` boxes is targeted.
    fn one_wave(n: usize) -> Rollout {
        let mut r = placeholder("r");
        r.model = "m".into();
        r.manifest_sha256 = "abc".into();
        r.waves = vec![Wave {
            devices: devs(n),
            targeted_ms: Some(1),
            passed_ms: None,
        }];
        r
    }

    #[test]
    fn standing_sorts_the_wave_and_statuses_of_other_manifests_do_not_count() {
        let topics = Topics::new("t");
        let mut r = one_wave(4);
        let mut w = Watch::default();
        let status = |state: &str, sha: &str| {
            serde_json::to_vec(&serde_json::json!({"state": state, "manifest_sha256": sha}))
                .unwrap()
        };
        for d in devs(4) {
            let on = if d == "b003" { "offline" } else { "online" };
            w.take(
                &topics,
                Some(&mut r),
                &topics.state(&d),
                format!(r#"{{"state":"{on}","groups":["g"]}}"#).as_bytes(),
            );
        }
        assert!(w.take(
            &topics,
            Some(&mut r),
            "t/b000/updates/m",
            &status("committed", "abc")
        ));
        assert!(!w.take(
            &topics,
            Some(&mut r),
            "t/b000/updates/m",
            &status("committed", "abc")
        ));
        assert!(w.take(
            &topics,
            Some(&mut r),
            "t/b001/updates/m",
            &status("failed", "abc")
        ));
        // An older update's status, and another model's.
        assert!(!w.take(
            &topics,
            Some(&mut r),
            "t/b002/updates/m",
            &status("committed", "old")
        ));
        assert!(!w.take(
            &topics,
            Some(&mut r),
            "t/b002/updates/x",
            &status("committed", "abc")
        ));
        let s = standing(&r, 0, &|d| w.is_online(d));
        assert_eq!(s.committed, ["b000"]);
        assert_eq!(s.failed, ["b001"]);
        assert_eq!(s.busy, ["b002"]);
        assert_eq!(s.away, ["b003"]);
        assert_eq!(w.groups["b003"], ["g"]);
        assert_eq!(pending(&r), ["b002", "b003"]);
    }

    #[test]
    fn a_box_heard_only_through_its_status_is_up_and_its_note_is_kept() {
        let topics = Topics::new("t");
        let mut r = one_wave(2);
        let mut w = Watch::default();
        // Neither box's birth came (kept on another broker node); b001 speaks of this update.
        let s = standing(&r, 0, &|d| w.is_online(d));
        assert_eq!(s.away, ["b000", "b001"]);
        let status = serde_json::json!({
            "state": "downloading", "manifest_sha256": "abc", "note": "none of the 3 chunks arrived"
        });
        assert!(w.take(
            &topics,
            Some(&mut r),
            "t/b001/updates/m",
            &serde_json::to_vec(&status).unwrap()
        ));
        let s = standing(&r, 0, &|d| w.is_online(d));
        assert_eq!(
            (s.busy, s.away),
            (vec!["b001".to_string()], vec!["b000".to_string()])
        );
        assert_eq!(r.outcomes["b001"].reason, "none of the 3 chunks arrived");
    }

    #[test]
    fn ids_name_files_and_topics_safely() {
        assert!(check_id("model-1.2_eu").is_ok());
        for bad in ["", "a/b", "a+b", "#", "..", ".hidden", &"x".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_state_file_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.json");
        let mut r = placeholder("r");
        r.abort_above = Threshold::Percent(10.0);
        r.outcomes.insert(
            "b1".into(),
            Outcome {
                state: "failed".into(),
                reason: "self_test".into(),
            },
        );
        write_atomic(&p, &serde_json::to_vec(&r).unwrap()).unwrap();
        let back: Rollout = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
