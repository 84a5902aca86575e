"""Read MQTT messages as Home Assistant 2023.12 would, and say what its MQTT entities show.

Usage: check.py DISCOVERY_PREFIX < messages.json
       check.py --self-check

messages.json is a list of [topic, payload] pairs in the order a subscriber to
`<prefix>/#` and the box's topics received them. A message on
`<prefix>/<component>/<node>/<object>/config` creates (or, empty, removes) an entity: its
config goes through the platform's own DISCOVERY_SCHEMA. Every other message is given to
the entities that follow its topic, through Home Assistant's template engine, and applied
the way the platform's message handlers apply it (the rules are copied from
homeassistant/components/mqtt/{sensor,binary_sensor,update,mixins}.py of that release).

Prints one JSON object: per discovery topic, the entity's component, name, whether its
config was valid (else the schema's error), and the history of what it showed:
`states` (each distinct state in turn), `available` (each change), `attributes` (the last).
"""

import asyncio
import json
import sys

import homeassistant.bootstrap  # noqa: F401  (imports the core in the order HA does)
from homeassistant.components.mqtt import binary_sensor, sensor, update
from homeassistant.core import HomeAssistant

SCHEMAS = {
    "sensor": sensor.DISCOVERY_SCHEMA,
    "binary_sensor": binary_sensor.DISCOVERY_SCHEMA,
    "update": update.DISCOVERY_SCHEMA,
}


class Entity:
    def __init__(self, hass, component, config):
        self.component = component
        self.config = config
        for key, value in config.items():
            if hasattr(value, "hass"):
                value.hass = hass
        for a in config.get("availability", []):
            a["value_template"].hass = hass
        self.report = {
            "component": component,
            "name": config.get("name"),
            "valid": True,
            "states": [],
            "available": [],
            "attributes": None,
            "errors": [],
        }
        self.installed = None
        self.latest = None

    def render(self, key, payload):
        template = self.config.get(key)
        if template is None:
            return payload
        try:
            return template.async_render_with_possible_json_value(payload, "")
        except Exception as e:  # Home Assistant logs it and leaves the entity as it was
            self.report["errors"].append("%s on %r: %s" % (key, payload[:200], e))
            return ""

    def show(self, state):
        states = self.report["states"]
        if not states or states[-1] != state:
            states.append(state)

    def receive(self, topic, payload):
        c = self.config
        for a in c.get("availability", []):
            if a["topic"] == topic:
                v = a["value_template"].async_render_with_possible_json_value(payload, "")
                up = {a["payload_available"]: True, a["payload_not_available"]: False}.get(v)
                if up is not None and (not self.report["available"] or self.report["available"][-1] != up):
                    self.report["available"].append(up)
        if c.get("json_attributes_topic") == topic:
            v = self.render("json_attributes_template", payload)
            try:
                attrs = json.loads(v)
                if isinstance(attrs, dict):
                    self.report["attributes"] = attrs
            except ValueError:
                pass
        if c.get("state_topic") == topic:
            v = self.render("value_template", payload)
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
                    self.show("unmatched: " + v)
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
            v = self.render("latest_version_template", payload)
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
            parts = topic.split("/")
            if topic.startswith(prefix + "/") and parts[-1] == "config":
                component = parts[len(prefix.split("/"))]
                if payload == "":
                    if topic in entities:
                        gone[topic] = entities.pop(topic).report
                        gone[topic]["removed"] = True
                    continue
                try:
                    config = SCHEMAS[component](json.loads(payload))
                except Exception as e:  # the schema's own words
                    entities.pop(topic, None)
                    gone[topic] = {"component": component, "valid": False, "error": str(e)}
                    continue
                entities[topic] = Entity(hass, component, config)
                continue
            for e in entities.values():
                e.receive(topic, payload)
        out = dict(gone)
        out.update({t: e.report for t, e in entities.items()})
        return out
    finally:
        await hass.async_stop(force=True)


def main():
    if sys.argv[1:] == ["--self-check"]:
        # The schemas refuse a sensor without a state topic; a template renders.
        report = asyncio.run(read("ha", [
            ["ha/sensor/n/a/config", json.dumps({"name": "a"})],
            ["ha/sensor/n/b/config", json.dumps({"state_topic": "s", "value_template": "{{ value_json.x }}"})],
            ["s", json.dumps({"x": 5})],
        ]))
        assert report["ha/sensor/n/a/config"]["valid"] is False, report
        assert report["ha/sensor/n/b/config"]["states"] == ["5"], report
        print("ok")
        return
    print(json.dumps(asyncio.run(read(sys.argv[1], json.load(sys.stdin)))))


if __name__ == "__main__":
    main()
