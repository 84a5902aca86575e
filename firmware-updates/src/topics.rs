//! Every MQTT topic of tern's wire protocol, built and read here and nowhere else: the daemon's
//! fleet link and outbox and the operator's `tern-update` share this file, so the two ends of
//! the protocol cannot drift apart.
//!
//! ```text
//!  <prefix>/<device>/state                     retained birth; `offline` as the last will
//!  <prefix>/<device>/telemetry                 periodic figures, the latest retained
//!  <prefix>/<device>/events                    update and feed news
//!  <prefix>/<device>/results/<pipeline>        inference results (with `seq`)
//!  <prefix>/<device>/capture/<pipeline>        captured samples (capture.export)
//!  <prefix>/<device>/cmd/<name>                commands to one box
//!  <prefix>/<device>/reply/<id>                replies for MQTT 3.1.1 requesters
//!  <prefix>/<device>/update/<model>            retained manifest for one box
//!  <prefix>/<device>/updates/<model>           retained outcome of the box's update
//!  <prefix>/fleet/<group>/cmd/<name>           commands to a group
//!  <prefix>/fleet/<group>/update/<model>       retained manifest for a group
//!  <prefix>/fleet/announce | keys              ask all to re-announce; retained key rotation
//!  <prefix>/fleet/time                         retained signed time (freshness of manifests)
//!  <prefix>/fleet/rollouts/<id>                retained state of a `tern-update rollout`
//!  <prefix>/artifacts/<sha256>/<index>         retained chunk of an artifact
//! ```

/// Topics of a fleet under one prefix (`tern` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Topics {
        Topics {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn state(&self, device: &str) -> String {
        format!("{}/{device}/state", self.prefix)
    }

    /// Every box's birth or `offline`.
    pub fn all_states(&self) -> String {
        format!("{}/+/state", self.prefix)
    }

    pub fn command(&self, device: &str, name: &str) -> String {
        format!("{}/{device}/cmd/{name}", self.prefix)
    }

    pub fn group_command(&self, group: &str, name: &str) -> String {
        format!("{}/fleet/{group}/cmd/{name}", self.prefix)
    }

    /// Where an update manifest is retained: `group:<name>` names a group, anything else a
    /// device.
    pub fn manifest(&self, target: &str, model: &str) -> String {
        match target.strip_prefix("group:") {
            Some(g) => format!("{}/fleet/{g}/update/{model}", self.prefix),
            None => format!("{}/{target}/update/{model}", self.prefix),
        }
    }

    /// A box's update outcome for `model` (`+` for every box or model in a filter).
    pub fn update_status(&self, device: &str, model: &str) -> String {
        format!("{}/{device}/updates/{model}", self.prefix)
    }

    pub fn announce(&self) -> String {
        format!("{}/fleet/announce", self.prefix)
    }

    pub fn keys(&self) -> String {
        format!("{}/fleet/keys", self.prefix)
    }

    pub fn time(&self) -> String {
        format!("{}/fleet/time", self.prefix)
    }

    /// A rollout's retained state; `+` for every rollout in a filter.
    pub fn rollout(&self, id: &str) -> String {
        format!("{}/fleet/rollouts/{id}", self.prefix)
    }

    /// Every box's latest (retained) telemetry.
    pub fn all_telemetry(&self) -> String {
        format!("{}/+/telemetry", self.prefix)
    }

    pub fn chunk(&self, sha256: &str, index: usize) -> String {
        format!("{}/artifacts/{sha256}/{index}", self.prefix)
    }

    pub fn artifacts(&self, sha256: &str) -> String {
        format!("{}/artifacts/{sha256}", self.prefix)
    }

    /// A device's retained `state` or `updates/<model>` message, read back from its topic.
    pub fn parse_device(&self, topic: &str) -> Option<(String, DeviceTopic)> {
        let rest = topic.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let (device, rest) = rest.split_once('/')?;
        if device == "fleet" || device == "artifacts" {
            return None;
        }
        let what = match rest.split_once('/') {
            None if rest == "state" => DeviceTopic::State,
            None if rest == "telemetry" => DeviceTopic::Telemetry,
            Some(("updates", model)) if !model.contains('/') => {
                DeviceTopic::UpdateStatus(model.to_string())
            }
            _ => return None,
        };
        Some((device.to_string(), what))
    }
}

/// What a device topic read back by the operator's tool is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTopic {
    State,
    Telemetry,
    UpdateStatus(String),
}

/// One box's view: its own topics and its groups'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub fleet: Topics,
    pub device: String,
    pub groups: Vec<String>,
    base: String,
}

/// What a topic delivered to a box is to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A command, for `target`: the device id, or `group:<name>`.
    Command {
        name: String,
        target: String,
    },
    Announce,
    Manifest,
    Keys,
    Time,
    Chunk {
        sha256: String,
        index: usize,
    },
    Other,
}

impl Device {
    pub fn new(prefix: &str, device: &str, groups: &[String]) -> Device {
        Device {
            fleet: Topics::new(prefix),
            device: device.to_string(),
            groups: groups.to_vec(),
            base: format!("{prefix}/{device}"),
        }
    }

    pub fn state(&self) -> String {
        self.fleet.state(&self.device)
    }

    pub fn telemetry(&self) -> String {
        format!("{}/telemetry", self.base)
    }

    pub fn events(&self) -> String {
        format!("{}/events", self.base)
    }

    pub fn results(&self, pipeline: &str) -> String {
        format!("{}/results/{pipeline}", self.base)
    }

    pub fn capture(&self, pipeline: &str) -> String {
        format!("{}/capture/{pipeline}", self.base)
    }

    pub fn reply(&self, id: &str) -> String {
        format!("{}/reply/{id}", self.base)
    }

    pub fn update_status(&self, model: &str) -> String {
        self.fleet.update_status(&self.device, model)
    }

    /// An MQTT 5 response topic the box will publish a reply on: anything outside tern's own
    /// topics, or this box's reply topics. A requester cannot make the box publish onto
    /// another box's command topics or its own state, events or results.
    pub fn may_answer_on(&self, topic: &str) -> bool {
        let ours = format!("{}/", self.fleet.prefix);
        !topic.starts_with(&ours) || topic.starts_with(&format!("{}/reply/", self.base))
    }

    /// The manifest filters: the device's and its groups'.
    pub fn manifest_filters(&self) -> Vec<String> {
        let mut f = vec![format!("{}/update/+", self.base)];
        for g in &self.groups {
            f.push(format!("{}/fleet/{g}/update/+", self.fleet.prefix));
        }
        f
    }

    /// What the updater reads before any manifest, in order: the broker sends retained
    /// messages per subscription in order, and a rotation must be in force before the
    /// manifests signed with the new keys arrive, and the time before manifests judged by it.
    pub fn trust_filters(&self) -> [String; 2] {
        [self.fleet.keys(), self.fleet.time()]
    }

    /// Everything the box subscribes to, in order (see [`Device::trust_filters`]).
    pub fn filters(&self, updates: bool) -> Vec<String> {
        let mut f = Vec::new();
        if updates {
            f.extend(self.trust_filters());
        }
        f.extend([format!("{}/cmd/+", self.base), self.fleet.announce()]);
        for g in &self.groups {
            f.push(format!("{}/fleet/{g}/cmd/+", self.fleet.prefix));
        }
        if updates {
            f.extend(self.manifest_filters());
        }
        f
    }

    pub fn route(&self, topic: &str) -> Route {
        let prefix = &self.fleet.prefix;
        if topic == self.fleet.announce() {
            return Route::Announce;
        }
        if let Some(name) = topic
            .strip_prefix(&self.base)
            .and_then(|t| t.strip_prefix("/cmd/"))
        {
            return Route::Command {
                name: name.to_string(),
                target: self.device.clone(),
            };
        }
        let fleet = topic
            .strip_prefix(prefix.as_str())
            .and_then(|t| t.strip_prefix("/fleet/"));
        if let Some((group, name)) = fleet.and_then(|r| r.split_once("/cmd/"))
            && self.groups.iter().any(|g| g == group)
        {
            return Route::Command {
                name: name.to_string(),
                target: format!("group:{group}"),
            };
        }
        if topic == self.fleet.keys() {
            return Route::Keys;
        }
        if topic == self.fleet.time() {
            return Route::Time;
        }
        let mine = topic
            .strip_prefix(&self.base)
            .and_then(|t| t.strip_prefix("/update/"))
            .is_some();
        let group = fleet
            .and_then(|r| r.split_once("/update/"))
            .is_some_and(|(g, _)| self.groups.iter().any(|x| x == g));
        if mine || group {
            return Route::Manifest;
        }
        if let Some(rest) = topic
            .strip_prefix(prefix.as_str())
            .and_then(|t| t.strip_prefix("/artifacts/"))
            && let Some((sha, index)) = rest.split_once('/')
            && let Ok(index) = index.parse::<usize>()
        {
            return Route::Chunk {
                sha256: sha.to_string(),
                index,
            };
        }
        Route::Other
    }

    /// The model an update topic of this box names (`.../update/<model>`), if `topic` is one.
    pub fn manifest_model<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let ours = topic
            .strip_prefix(self.fleet.prefix.as_str())?
            .strip_prefix('/')?;
        let (_, model) = ours.split_once("/update/")?;
        (!model.contains('/')).then_some(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_device_group_and_fleet_topics() {
        let t = Device::new("tern", "b1", &["g".to_string()]);
        assert_eq!(
            t.route("tern/b1/cmd/ping"),
            Route::Command {
                name: "ping".into(),
                target: "b1".into()
            }
        );
        assert_eq!(
            t.route("tern/fleet/g/cmd/status"),
            Route::Command {
                name: "status".into(),
                target: "group:g".into()
            }
        );
        assert_eq!(t.route("tern/fleet/other/cmd/status"), Route::Other);
        assert_eq!(t.route("tern/b2/cmd/ping"), Route::Other);
        assert_eq!(t.route("tern/fleet/announce"), Route::Announce);
        assert_eq!(t.route("tern/fleet/keys"), Route::Keys);
        assert_eq!(t.route("tern/fleet/time"), Route::Time);
        assert_eq!(t.route("tern/b1/update/m"), Route::Manifest);
        assert_eq!(t.route("tern/fleet/g/update/m"), Route::Manifest);
        assert_eq!(t.route("tern/fleet/h/update/m"), Route::Other);
        assert_eq!(
            t.route(&t.fleet.chunk("ab", 3)),
            Route::Chunk {
                sha256: "ab".into(),
                index: 3
            }
        );
        assert_eq!(t.route("tern/artifacts/ab/x"), Route::Other);
        assert!(t.may_answer_on("apps/dashboard/answers"));
        assert!(t.may_answer_on("tern/b1/reply/x"));
        assert!(!t.may_answer_on("tern/b2/cmd/models.rollback"));
        assert!(!t.may_answer_on("tern/b1/state"));
        assert_eq!(t.manifest_model("tern/fleet/g/update/m"), Some("m"));
        assert_eq!(t.manifest_model("tern/b1/update/m"), Some("m"));
        assert_eq!(t.manifest_model("file:/x.bundle"), None);
    }

    #[test]
    fn built_topics_read_back() {
        let f = Topics::new("t");
        assert_eq!(f.manifest("group:g", "m"), "t/fleet/g/update/m");
        assert_eq!(f.manifest("b1", "m"), "t/b1/update/m");
        assert_eq!(
            f.parse_device(&f.state("b1")),
            Some(("b1".into(), DeviceTopic::State))
        );
        assert_eq!(
            f.parse_device(&f.update_status("b1", "m")),
            Some(("b1".into(), DeviceTopic::UpdateStatus("m".into())))
        );
        assert_eq!(
            f.parse_device("t/b1/telemetry"),
            Some(("b1".into(), DeviceTopic::Telemetry))
        );
        assert_eq!(f.parse_device(&f.rollout("r1")), None);
        assert_eq!(f.parse_device("t/fleet/announce"), None);
        assert_eq!(f.parse_device("t/b1/results/p"), None);
        let d = Device::new("t", "b1", &[]);
        assert_eq!(d.filters(false), vec!["t/b1/cmd/+", "t/fleet/announce"]);
        assert_eq!(
            d.filters(true),
            vec![
                "t/fleet/keys",
                "t/fleet/time",
                "t/b1/cmd/+",
                "t/fleet/announce",
                "t/b1/update/+"
            ]
        );
    }
}
