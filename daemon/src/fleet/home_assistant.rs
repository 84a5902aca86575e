//! Home Assistant MQTT discovery: the box as a device, with an entity per pipeline (its latest
//! label and score), per thresholded score output and configured class (on/off), and per model
//! (its installed version and its update's state).
//!
//! Every entity reads topics the box already publishes; nothing is sent twice for Home
//! Assistant. Availability is the retained birth and its will, so an entity goes unavailable
//! only when the broker says the box is gone. Templates quote every name as a JSON string,
//! which Jinja reads as the same string literal.

use serde_json::{Value, json};

use crate::config::HomeAssistant;
use crate::engine::{OutputSpec, Postprocess};

use super::Topics;

/// What discovery needs to know of a pipeline.
pub struct Pipeline<'a> {
    pub name: &'a str,
    /// The active model's declared outputs; `None` for a format 1 package (its `top` says it
    /// all) or a model not loaded.
    pub outputs: Option<&'a [OutputSpec]>,
}

/// One discovery message: its topic (`<prefix>/<component>/<node>/<object>/config`) and body.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    pub topic: String,
    pub config: Value,
}

/// The discovery messages of a box running `pipelines` and `models`, in a stable order.
pub fn entities(
    ha: &HomeAssistant,
    topics: &Topics,
    pipelines: &[Pipeline<'_>],
    models: &[String],
) -> Vec<Entity> {
    let node = node_id(topics);
    let device = json!({
        "identifiers": [node],
        "name": topics.device,
        "manufacturer": "tern",
        "model": "ternd",
        "sw_version": crate::VERSION,
    });
    let availability = json!([{
        "topic": topics.state(),
        "value_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }]);
    let mut out = Vec::new();
    let mut add = |component: &str, object: String, mut config: Value| {
        let object = id(&object);
        config["unique_id"] = format!("{node}_{object}").into();
        config["object_id"] = format!("{node}_{object}").into();
        config["device"] = device.clone();
        config["availability"] = availability.clone();
        config["origin"] = json!({"name": "ternd", "sw_version": crate::VERSION});
        out.push(Entity {
            topic: format!("{}/{component}/{node}/{object}/config", ha.discovery_prefix),
            config,
        });
    };
    for p in pipelines {
        let results = topics.results(p.name);
        let outputs = p.outputs.unwrap_or(&[]);
        if let Some((state, score)) = reading(p.outputs) {
            add(
                "sensor",
                format!("result_{}", p.name),
                json!({
                    "name": p.name,
                    "icon": "mdi:label-outline",
                    "state_topic": results,
                    "value_template": state,
                    "json_attributes_topic": results,
                    // Not the sequence number or latency: Home Assistant records a state
                    // row for every change of an attribute.
                    "json_attributes_template": format!(
                        "{{{{ {{'score': {score}, 'model': value_json.model, 'version': value_json.version, \
                         'source': value_json.source}} | tojson }}}}"
                    ),
                }),
            );
        }
        for o in outputs {
            if let Postprocess::Score {
                threshold: Some(_), ..
            } = o.postprocess
            {
                let on = format!(
                    "value_json.get('outputs', {{}}).get({}, {{}})",
                    quote(&o.name)
                );
                add(
                    "binary_sensor",
                    format!("score_{}_{}", p.name, o.name),
                    json!({
                        "name": format!("{} {}", p.name, o.name),
                        "state_topic": results,
                        // Empty (ignored) when a result lacks the output's on/off state.
                        "value_template": format!(
                            "{{% set o = {on} %}}{{% if o.on is defined %}}{{{{ 'ON' if o.on else 'OFF' }}}}{{% endif %}}"
                        ),
                        "json_attributes_topic": results,
                        "json_attributes_template": format!(
                            "{{{{ {{'score': {on}.get('score')}} | tojson }}}}"
                        ),
                    }),
                );
            }
        }
        for class in ha.classes.get(p.name).into_iter().flatten() {
            let c = quote(class);
            let mut seen = vec![format!(
                "value_json.get('top', [])[:1] | selectattr('label', 'eq', {c}) | list"
            )];
            for o in outputs {
                if matches!(o.postprocess, Postprocess::Detect { .. }) {
                    seen.push(format!(
                        "value_json.get('outputs', {{}}).get({}, {{}}).get('boxes', []) | selectattr('label', 'eq', {c}) | list",
                        quote(&o.name)
                    ));
                }
            }
            add(
                "binary_sensor",
                format!("class_{}_{class}", p.name),
                json!({
                    "name": format!("{} {class}", p.name),
                    "state_topic": results,
                    "value_template": format!("{{{{ 'ON' if {} else 'OFF' }}}}", seen.join(" or ")),
                }),
            );
        }
    }
    for m in models {
        let q = quote(m);
        let status = topics.update_status(m);
        add(
            "update",
            format!("model_{m}"),
            json!({
                "name": format!("{m} model"),
                "title": m,
                "state_topic": topics.state(),
                // The birth names the installed version (the offline will names none, and an
                // empty rendering is ignored). It leaves a version on its way in as the latest
                // (`this` is the entity as Home Assistant shows it), so a birth during a
                // download does not hide it, whichever of the two retained messages comes
                // first.
                "value_template": format!(
                    "{{% for m in value_json.get('models', []) if m.name == {q} %}}\
                     {{% set latest = this.attributes.get('latest_version') %}}\
                     {{% set pending = latest not in [none, this.attributes.get('installed_version')] %}}\
                     {{{{ {{'installed_version': m.version, 'latest_version': latest if pending else m.version}} | tojson }}}}\
                     {{% endfor %}}"
                ),
                "latest_version_topic": status,
                // A version on its way in is the latest; one refused, failed or rolled back
                // leaves the installed one the latest.
                "latest_version_template": "{% if value_json.get('version') and value_json.get('state') not in ['failed', 'rolled_back', 'refused'] %}{{ value_json.version }}{% else %}{{ this.attributes.get('installed_version') or '' }}{% endif %}",
            }),
        );
        add(
            "sensor",
            format!("update_{m}"),
            json!({
                "name": format!("{m} update"),
                "icon": "mdi:package-down",
                "state_topic": status,
                "value_template": "{{ value_json.state }}",
                "json_attributes_topic": status,
                // A status carries only the keys that apply to its state.
                "json_attributes_template": "{{ {'version': value_json.get('version'), 'percent': value_json.get('percent'), 'code': value_json.get('code'), 'reason': value_json.get('reason'), 'note': value_json.get('note')} | tojson }}",
            }),
        );
    }
    // Two names that differ only in characters an id may not hold would share a topic: the
    // first keeps it, and the clash is said rather than one entity silently replacing another.
    let mut seen = std::collections::HashSet::new();
    out.retain(|e| {
        let fresh = seen.insert(e.topic.clone());
        if !fresh {
            tracing::warn!(topic = %e.topic, name = %e.config["name"], "two Home Assistant entities would share a discovery topic; the second is not announced");
        }
        fresh
    });
    out
}

/// The sensor's state and score expressions for a pipeline's results: the first output that
/// has a label or a value to show; `None` when nothing does (only raw outputs).
fn reading(outputs: Option<&[OutputSpec]>) -> Option<(String, String)> {
    let top = || {
        (
            "{{ value_json.top[0].label[:255] if value_json.get('top') else 'none' }}".to_string(),
            "(value_json.top[0].score if value_json.get('top') else none)".to_string(),
        )
    };
    let Some(outputs) = outputs else {
        return Some(top());
    };
    for o in outputs {
        let get = format!(
            "value_json.get('outputs', {{}}).get({}, {{}})",
            quote(&o.name)
        );
        match &o.postprocess {
            Postprocess::Classify { .. } => return Some(top()),
            Postprocess::Detect { .. } => {
                let sorted =
                    format!("({get}.get('boxes', []) | sort(attribute='score', reverse=true))");
                return Some((
                    format!("{{% set b = {sorted} %}}{{{{ b[0].label[:255] if b else 'none' }}}}"),
                    format!("({sorted}[0].score if {get}.get('boxes') else none)"),
                ));
            }
            Postprocess::Ctc { .. } => {
                return Some((
                    // A state is at most 255 characters in Home Assistant.
                    format!("{{{{ {get}.get('text', '')[:255] }}}}"),
                    format!("{get}.get('score')"),
                ));
            }
            Postprocess::Score { .. } => {
                return Some((
                    format!("{{{{ {get}.get('score', 0) | round(3) }}}}"),
                    format!("{get}.get('score')"),
                ));
            }
            Postprocess::TextBoxes { .. } | Postprocess::Raw { .. } => {}
        }
    }
    None
}

/// The box's node id: `tern_<device>`, made unique by a hash of the box's base topic when
/// the device name had to change to be an id or the fleet prefix is not the default (two
/// boxes of one name under two prefixes on one broker are two devices).
fn node_id(topics: &Topics) -> String {
    let plain = id(&format!("tern_{}", topics.device));
    if plain == format!("tern_{}", topics.device)
        && topics.state() == format!("tern/{}/state", topics.device)
    {
        return plain;
    }
    let hash = tern_update::sha256_hex(topics.state().as_bytes());
    format!("{plain}_{}", &hash[..8])
}

/// A name as a Jinja string literal.
fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// A name as a discovery id: Home Assistant takes `[a-zA-Z0-9_-]` in a node or object id.
fn id(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ha(classes: &[(&str, &[&str])]) -> HomeAssistant {
        HomeAssistant {
            discovery_prefix: "ha".into(),
            classes: classes
                .iter()
                .map(|(p, c)| (p.to_string(), c.iter().map(|s| s.to_string()).collect()))
                .collect(),
        }
    }

    fn outputs(toml: &str) -> Vec<OutputSpec> {
        #[derive(serde::Deserialize)]
        struct O {
            outputs: Vec<OutputSpec>,
        }
        toml::from_str::<O>(toml).expect("outputs parse").outputs
    }

    #[test]
    fn every_pipeline_model_event_and_class_gets_an_entity_with_safe_ids() {
        let topics = Topics::new("tern", "box 1", &[]);
        let det = outputs(
            r#"
            [[outputs]]
            name = "boxes"
            postprocess = { kind = "detect", format = "yolo", labels = ["person", "car"] }
            [[outputs]]
            name = "speech"
            postprocess = { kind = "score", threshold = 0.5 }
            [[outputs]]
            name = "level"
            postprocess = { kind = "score" }
            "#,
        );
        let raw = outputs(
            r#"
            [[outputs]]
            name = "x"
            postprocess = { kind = "raw" }
            "#,
        );
        let es = entities(
            &ha(&[("door", &["person"])]),
            &topics,
            &[
                Pipeline {
                    name: "door",
                    outputs: Some(&det),
                },
                Pipeline {
                    name: "digits",
                    outputs: None,
                },
                Pipeline {
                    name: "dump",
                    outputs: Some(&raw),
                },
            ],
            &["digits-mlp".to_string()],
        );
        // "box 1" is not an id as it is: the node id carries a hash of the box's topics.
        let node = format!(
            "tern_box_1_{}",
            &tern_update::sha256_hex(b"tern/box 1/state")[..8]
        );
        let topics_of: Vec<String> = es.iter().map(|e| e.topic.replace(&node, "N")).collect();
        assert_eq!(
            topics_of,
            [
                "ha/sensor/N/result_door/config",
                "ha/binary_sensor/N/score_door_speech/config",
                "ha/binary_sensor/N/class_door_person/config",
                "ha/sensor/N/result_digits/config",
                "ha/update/N/model_digits-mlp/config",
                "ha/sensor/N/update_digits-mlp/config",
            ]
        );
        for e in &es {
            assert_eq!(e.config["device"]["identifiers"][0], node.as_str());
            assert_eq!(e.config["availability"][0]["topic"], "tern/box 1/state");
        }
        // A plain name under the default prefix is its own id; under another prefix it is not.
        let plain = |prefix: &str| node_id(&Topics::new(prefix, "b1", &[]));
        assert_eq!(plain("tern"), "tern_b1");
        assert!(
            plain("site-2/tern").starts_with("tern_b1_"),
            "{}",
            plain("site-2/tern")
        );
        assert_ne!(plain("site-2/tern"), plain("site-3/tern"));
        assert_eq!(es[0].config["state_topic"], "tern/box 1/results/door");
        assert!(
            es[2].config["value_template"]
                .as_str()
                .unwrap()
                .contains(r#".get("boxes", {})"#),
            "the class looks in the detector's boxes: {}",
            es[2].config["value_template"]
        );
        assert_eq!(
            es[4].config["latest_version_topic"],
            "tern/box 1/updates/digits-mlp"
        );
    }

    #[test]
    fn names_that_clash_as_ids_keep_the_first_entity() {
        let topics = Topics::new("tern", "b", &[]);
        let es = entities(
            &ha(&[]),
            &topics,
            &[
                Pipeline {
                    name: "a b",
                    outputs: None,
                },
                Pipeline {
                    name: "a.b",
                    outputs: None,
                },
            ],
            &[],
        );
        assert_eq!(es.len(), 1);
        assert_eq!(es[0].config["name"], "a b");
    }

    #[test]
    fn names_are_quoted_as_string_literals() {
        assert_eq!(quote(r#"it's "x""#), r#""it's \"x\"""#);
        assert_eq!(id("tern_a/b é"), "tern_a_b__");
    }
}
