"""Read MQTT messages as Home Assistant 2023.12 would, and say what its MQTT entities show.

Usage: check.py DISCOVERY_PREFIX < messages.json
       check.py --self-check

messages.json is a list of [topic, payload] pairs in the order a subscriber to
`<prefix>/#` and the box's topics received them. A message on a discovery topic (matched by
Home Assistant's own TOPIC_MATCHER, for a supported component) creates, updates or (empty)
removes an entity: its origin goes through MQTT_ORIGIN_INFO_SCHEMA and its config through
the platform's DISCOVERY_SCHEMA, and keys the schema would drop are reported. Every other
message is given to the entities that follow its topic, rendered by Home Assistant's
MqttValueTemplate (with `this` as the entity's state for update entities), and applied the
way the platform's message handlers apply it (the rules are copied from
homeassistant/components/mqtt/{sensor,binary_sensor,update,mixins}.py of that release). A
template that fails, and every warning Home Assistant's code logs while reading, is reported.

Prints one JSON object: `entities`, per discovery topic: the entity's component, name,
whether its config was valid (else the schema's error), and what it showed (`states`, each
distinct state in turn; `available`, each change; `attributes`, the last); and `log`, the
warnings and errors logged.
"""

import asyncio
import json
import logging
import sys

import homeassistant.bootstrap  # noqa: F401  (imports the core in the order HA does)
from homeassistant.components.mqtt import binary_sensor, sensor, update
from homeassistant.components.mqtt.discovery import SUPPORTED_COMPONENTS, TOPIC_MATCHER
from homeassistant.components.mqtt.mixins import MQTT_ORIGIN_INFO_SCHEMA
from homeassistant.components.mqtt.models import MqttValueTemplate
from homeassistant.core import HomeAssistant


class Collect(logging.Handler):
    """Every warning and error Home Assistant's code logs (an undefined variable in a
    template, a payload no entity state matches)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append("%s: %s" % (record.name, record.getMessage()))


LOG = Collect()
logging.getLogger("homeassistant").addHandler(LOG)

SCHEMAS = {
    "sensor": sensor.DISCOVERY_SCHEMA,
    "binary_sensor": binary_sensor.DISCOVERY_SCHEMA,
    "update": update.DISCOVERY_SCHEMA,
}


class Entity:
    def __init__(self, hass, component, config):
        self.hass = hass
        self.report = {
            "component": component,
            "valid": True,
            "states": [],
            "available": [],
            "attributes": None,
            "errors": [],
        }
        self.installed = None
        self.latest = None
        self.configure(component, config)

    def configure(self, component, config):
        """A config for a new entity, or a new config for this one (its state stays)."""
        self.component = component
        self.config = config
        self.report["name"] = config.get("name")
        self.templates = {
            k: MqttValueTemplate(config.get(k), hass=self.hass)
            for k in ("value_template", "json_attributes_template", "latest_version_template")
        }
        self.availability = [
            (a, MqttValueTemplate(a["value_template"], hass=self.hass))
            for a in config.get("availability", [])
        ]

    def render(self, template, payload):
        this = {"attributes": {"installed_version": self.installed,
                               "latest_version": self.latest}}
        try:
            return template.async_render_with_possible_json_value(
                payload, variables={"this": this})
        except Exception as e:  # Home Assistant logs it and drops the message
            self.report["errors"].append("%r: %s" % (payload[:200], e))
            return ""

    def show(self, state):
        states = self.report["states"]
        if not states or states[-1] != state:
            states.append(state)

    def receive(self, topic, payload):
        c = self.config
        for a, template in self.availability:
            if a["topic"] == topic:
                v = self.render(template, payload)
                up = {a["payload_available"]: True, a["payload_not_available"]: False}.get(v)
                if up is not None and (not self.report["available"] or self.report["available"][-1] != up):
                    self.report["available"].append(up)
        if c.get("json_attributes_topic") == topic:
            v = self.render(self.templates["json_attributes_template"], payload)
            try:
                attrs = json.loads(v)
                if isinstance(attrs, dict):
                    self.report["attributes"] = attrs
            except ValueError:
                self.report["errors"].append("attributes are not JSON: %r" % v)
        if c.get("state_topic") == topic:
            v = self.render(self.templates["value_template"], payload)
            if self.component == "sensor":
                self.show(None if v == "None" else v)
            elif self.component == "binary_sensor":
                if not v.strip():
                    pass  # no output from the template: ignored
                elif v == c["payload_on"]:
                    self.show("on")
                elif v == c["payload_off"]:
                    self.show("off")
                else:
                    self.report["errors"].append("no matching payload: %r" % v)
            elif self.component == "update":
                if v and v != "{}":
                    try:
                        j = json.loads(v)
                    except ValueError:
                        j = {"installed_version": v}
                    if not isinstance(j, dict):
                        j = {"installed_version": str(v)}
                    self.installed = j.get("installed_version", self.installed)
                    self.latest = j.get("latest_version", self.latest)
                    self.show_update()
        if self.component == "update" and c.get("latest_version_topic") == topic:
            v = self.render(self.templates["latest_version_template"], payload)
            if isinstance(v, str) and v != "":
                self.latest = v
                self.show_update()

    def show_update(self):
        # UpdateEntity.state: on when the latest version is newer than the installed one.
        if self.installed is None or self.latest is None:
            return
        self.show({"installed": self.installed, "latest": self.latest,
                   "state": "off" if self.installed == self.latest else "on"})


async def read(prefix, messages):
    hass = HomeAssistant("/tmp")
    entities, gone = {}, {}
    try:
        for topic, payload in messages:
            if topic.startswith(prefix + "/"):
                match = TOPIC_MATCHER.match(topic[len(prefix) + 1:])
                if not match:
                    if topic.endswith("/config"):
                        gone[topic] = {"valid": False, "error": "illegal discovery topic"}
                    continue
                component = match.group("component")
                if component not in SUPPORTED_COMPONENTS or component not in SCHEMAS:
                    gone[topic] = {"valid": False, "error": "component %s" % component}
                    continue
                if payload == "":
                    if topic in entities:
                        gone[topic] = entities.pop(topic).report
                        gone[topic]["removed"] = True
                    continue
                try:
                    raw = json.loads(payload)
                    if "origin" in raw:
                        MQTT_ORIGIN_INFO_SCHEMA(raw["origin"])
                    config = SCHEMAS[component](dict(raw))
                    dropped = sorted(set(raw) - set(config))
                    if dropped:
                        raise ValueError("keys the schema drops: %s" % dropped)
                except Exception as e:  # the schema's own words
                    entities.pop(topic, None)
                    gone[topic] = {"component": component, "valid": False, "error": str(e)}
                    continue
                if topic in entities:
                    entities[topic].configure(component, config)
                else:
                    gone.pop(topic, None)
                    entities[topic] = Entity(hass, component, config)
                continue
            for e in entities.values():
                e.receive(topic, payload)
        out = dict(gone)
        out.update({t: e.report for t, e in entities.items()})
        return {"entities": out, "log": LOG.lines}
    finally:
        await hass.async_stop(force=True)


def main():
    if sys.argv[1:] == ["--self-check"]:
        # The schemas refuse a sensor without a state topic; a template renders; a warning
        # is caught.
        report = asyncio.run(read("ha", [
            ["ha/sensor/n/a/config", json.dumps({"name": "a"})],
            ["ha/sensor/n/b/config", json.dumps({"state_topic": "s", "value_template": "{{ value_json.x }}"})],
            ["ha/sensor/n/c/config", json.dumps({"state_topic": "s", "value_template": "{{ value_json.nope }}"})],
            ["s", json.dumps({"x": 5})],
        ]))
        entities = report["entities"]
        assert entities["ha/sensor/n/a/config"]["valid"] is False, report
        assert entities["ha/sensor/n/b/config"]["states"] == ["5"], report
        # An undefined value is only a warning to Home Assistant; here it is reported.
        assert any("nope" in line for line in report["log"]), report
        print("ok")
        return
    print(json.dumps(asyncio.run(read(sys.argv[1], json.load(sys.stdin)))))


if __name__ == "__main__":
    main()
