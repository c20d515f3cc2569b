"""Static checks of the deployment files in packaging/: Dockerfiles, the devcontainer Feature,
Kubernetes manifests and the systemd unit. Nothing here needs Docker, a cluster or systemd as
PID 1: fields are checked against hand-written schemas, names against what refers to them,
and every tether flag or TETHER_* variable against what the real binary's --help prints.
The Feature's install.sh and entrypoint are run for real, into a scratch directory."""
import configparser
import filecmp
import http.client
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
DOCKER = PACKAGING / "docker"
FEATURE = PACKAGING / "devcontainer-feature" / "tether"
KUBE = PACKAGING / "kubernetes"
SYSTEMD = PACKAGING / "systemd"
INSTALLED_BIN = "/usr/local/bin/tether"


# ---------------------------------------------------------------------------------------
# what the binary accepts

_help_cache = {}


def help_text(tether_bin, command):
    key = (str(tether_bin), command)
    if key not in _help_cache:
        r = subprocess.run([str(tether_bin), command, "--help"], capture_output=True,
                           text=True, timeout=10)
        assert r.returncode == 0, "tether %s --help: %s" % (command, r.stderr)
        _help_cache[key] = r.stdout + r.stderr
    return _help_cache[key]


def help_flags(tether_bin, command):
    """The long options `tether COMMAND --help` lists (and -h)."""
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text(tether_bin, command))) | {"-h"}


def help_env(tether_bin, command):
    """The TETHER_* variables `tether COMMAND --help` names."""
    return set(re.findall(r"\bTETHER_[A-Z_]+\b", help_text(tether_bin, command)))


def unknown_flags(tether_bin, command, words):
    """The words of an argument list that look like options but that COMMAND does not have."""
    known = help_flags(tether_bin, command)
    return [w for w in words if w.startswith("-") and w.split("=", 1)[0] not in known]


def help_default_seconds(tether_bin, command, flag):
    """The default of a DURATION flag, from its '(default 1m)' in --help, in seconds."""
    text = help_text(tether_bin, command)
    m = re.search(re.escape(flag) + r"\b.*?\(default (\d+)(ms|s|m|h)", text, re.S)
    assert m, "no default for %s in tether %s --help" % (flag, command)
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def project_version():
    text = (REPO / "meson.build").read_text()
    m = re.search(r"project\s*\(.*?\bversion\s*:\s*'([^']+)'", text, re.S)
    assert m, "no version in meson.build's project()"
    return m.group(1)


# ---------------------------------------------------------------------------------------
# Kubernetes: a schema of the fields these manifests may use


class Obj:
    """An object with these fields (name -> spec), of which `required` must be present."""

    def __init__(self, fields, required=()):
        self.fields = fields
        self.required = tuple(required)


class MapOf:
    """A map from strings to values of one spec (labels, resources.limits)."""

    def __init__(self, value):
        self.value = value


class ListOf:
    def __init__(self, item):
        self.item = item


class OneOf:
    """A string from a fixed set."""

    def __init__(self, *values):
        self.values = values


INT_OR_STR = (int, str)
QUANTITY = INT_OR_STR  # "100m", "64Mi", 1

META = Obj({"name": str, "namespace": str, "labels": MapOf(str), "annotations": MapOf(str)},
           required=["name"])
TEMPLATE_META = Obj({"labels": MapOf(str), "annotations": MapOf(str)})
SECCOMP = Obj({"type": OneOf("RuntimeDefault", "Localhost", "Unconfined"),
               "localhostProfile": str}, required=["type"])
CAPABILITIES = Obj({"add": ListOf(str), "drop": ListOf(str)})
CONTAINER_SECURITY = Obj({
    "allowPrivilegeEscalation": bool, "readOnlyRootFilesystem": bool, "runAsNonRoot": bool,
    "runAsUser": int, "runAsGroup": int, "privileged": bool, "capabilities": CAPABILITIES,
    "seccompProfile": SECCOMP})
POD_SECURITY = Obj({
    "runAsNonRoot": bool, "runAsUser": int, "runAsGroup": int, "fsGroup": int,
    "supplementalGroups": ListOf(int), "seccompProfile": SECCOMP})
PORT_REF = INT_OR_STR
PROBE = Obj({
    "tcpSocket": Obj({"port": PORT_REF, "host": str}, required=["port"]),
    "httpGet": Obj({"path": str, "port": PORT_REF, "host": str,
                    "scheme": OneOf("HTTP", "HTTPS")}, required=["port"]),
    "exec": Obj({"command": ListOf(str)}, required=["command"]),
    "initialDelaySeconds": int, "periodSeconds": int, "timeoutSeconds": int,
    "successThreshold": int, "failureThreshold": int})
ENV_VAR = Obj({
    "name": str, "value": str,
    "valueFrom": Obj({
        "secretKeyRef": Obj({"name": str, "key": str, "optional": bool}, required=["name", "key"]),
        "fieldRef": Obj({"fieldPath": str}, required=["fieldPath"])})},
    required=["name"])
CONTAINER = Obj({
    "name": str, "image": str, "imagePullPolicy": OneOf("Always", "IfNotPresent", "Never"),
    "command": ListOf(str), "args": ListOf(str), "workingDir": str, "env": ListOf(ENV_VAR),
    "ports": ListOf(Obj({"name": str, "containerPort": int,
                         "protocol": OneOf("TCP", "UDP", "SCTP")}, required=["containerPort"])),
    "readinessProbe": PROBE, "livenessProbe": PROBE, "startupProbe": PROBE,
    "securityContext": CONTAINER_SECURITY,
    "resources": Obj({"requests": MapOf(QUANTITY), "limits": MapOf(QUANTITY)}),
    "volumeMounts": ListOf(Obj({"name": str, "mountPath": str, "readOnly": bool, "subPath": str},
                               required=["name", "mountPath"]))},
    required=["name", "image"])
VOLUME = Obj({
    "name": str,
    "emptyDir": Obj({"medium": OneOf("", "Memory"), "sizeLimit": QUANTITY}),
    "secret": Obj({"secretName": str, "defaultMode": int, "optional": bool,
                   "items": ListOf(Obj({"key": str, "path": str, "mode": int},
                                       required=["key", "path"]))},
                  required=["secretName"])},
    required=["name"])
POD_SPEC = Obj({
    "containers": ListOf(CONTAINER), "initContainers": ListOf(CONTAINER),
    "volumes": ListOf(VOLUME), "restartPolicy": OneOf("Always", "OnFailure", "Never"),
    "terminationGracePeriodSeconds": int, "automountServiceAccountToken": bool,
    "serviceAccountName": str, "securityContext": POD_SECURITY, "nodeSelector": MapOf(str)},
    required=["containers"])
DEPLOYMENT_SPEC = Obj({
    "replicas": int,
    "selector": Obj({"matchLabels": MapOf(str)}, required=["matchLabels"]),
    "strategy": Obj({"type": OneOf("Recreate", "RollingUpdate"),
                     "rollingUpdate": Obj({"maxSurge": INT_OR_STR, "maxUnavailable": INT_OR_STR})}),
    "template": Obj({"metadata": TEMPLATE_META, "spec": POD_SPEC}, required=["metadata", "spec"])},
    required=["selector", "template"])
SERVICE_SPEC = Obj({
    "type": OneOf("ClusterIP", "NodePort", "LoadBalancer"), "selector": MapOf(str),
    "ports": ListOf(Obj({"name": str, "port": int, "targetPort": PORT_REF,
                         "protocol": OneOf("TCP", "UDP", "SCTP")}, required=["port"]))},
    required=["selector", "ports"])
KINDS = {
    ("apps/v1", "Deployment"): Obj({"apiVersion": str, "kind": str, "metadata": META,
                                    "spec": DEPLOYMENT_SPEC}, ["apiVersion", "kind", "metadata", "spec"]),
    ("v1", "Service"): Obj({"apiVersion": str, "kind": str, "metadata": META,
                            "spec": SERVICE_SPEC}, ["apiVersion", "kind", "metadata", "spec"]),
    ("v1", "Pod"): Obj({"apiVersion": str, "kind": str, "metadata": META, "spec": POD_SPEC},
                       ["apiVersion", "kind", "metadata", "spec"]),
    ("v1", "Secret"): Obj({"apiVersion": str, "kind": str, "metadata": META,
                           "type": OneOf("Opaque"), "stringData": MapOf(str), "data": MapOf(str)},
                          ["apiVersion", "kind", "metadata"]),
}


def type_name(spec):
    if isinstance(spec, tuple):
        return " or ".join(t.__name__ for t in spec)
    return spec.__name__


def is_type(value, spec):
    types = spec if isinstance(spec, tuple) else (spec,)
    # bool is an int in Python, never in YAML's sense of the schema.
    return any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in types)


def schema_errors(value, spec, path):
    """Every way value departs from spec, each as 'path: why'."""
    if isinstance(spec, Obj):
        if not isinstance(value, dict):
            return ["%s: expected an object, got %r" % (path, value)]
        errors = []
        for key in spec.required:
            if key not in value:
                errors.append("%s.%s: required field missing" % (path, key))
        for key, item in value.items():
            sub = "%s.%s" % (path, key) if path else str(key)
            if key not in spec.fields:
                errors.append("%s: unknown field" % sub)
            else:
                errors += schema_errors(item, spec.fields[key], sub)
        return errors
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            return ["%s: expected a list, got %r" % (path, value)]
        return [e for i, item in enumerate(value)
                for e in schema_errors(item, spec.item, "%s[%d]" % (path, i))]
    if isinstance(spec, MapOf):
        if not isinstance(value, dict):
            return ["%s: expected a map, got %r" % (path, value)]
        return [e for k, v in value.items() for e in
                ([] if isinstance(k, str) else ["%s: key %r is not a string" % (path, k)]) +
                schema_errors(v, spec.value, "%s.%s" % (path, k))]
    if isinstance(spec, OneOf):
        if value not in spec.values:
            return ["%s: %r is not one of %s" % (path, value, ", ".join(map(repr, spec.values)))]
        return []
    if not is_type(value, spec):
        return ["%s: expected %s, got %r" % (path, type_name(spec), value)]
    return []


def load_manifests(name):
    with open(str(KUBE / name)) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def all_manifests():
    return {name: load_manifests(name)
            for name in ("relay.yaml", "workspace-pod.yaml", "secret.example.yaml")}


def pod_specs(docs):
    """(where, pod labels, pod spec) of each Deployment and Pod in docs."""
    out = []
    for d in docs:
        if d["kind"] == "Deployment":
            out.append(("Deployment %s" % d["metadata"]["name"],
                        d["spec"]["template"]["metadata"].get("labels", {}),
                        d["spec"]["template"]["spec"]))
        elif d["kind"] == "Pod":
            out.append(("Pod %s" % d["metadata"]["name"], d["metadata"].get("labels", {}), d["spec"]))
    return out


def containers_of(spec):
    return spec.get("initContainers", []) + spec["containers"]


def port_matches(ref, container):
    return any(ref in (p.get("name"), p["containerPort"]) for p in container.get("ports", []))


def is_mounted(container, path):
    return any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
               for m in container.get("volumeMounts", []))


def test_kubernetes_manifests_match_the_schema():
    errors = []
    for name, docs in all_manifests().items():
        assert docs, "%s holds no documents" % name
        for i, doc in enumerate(docs):
            where = "%s[%d]" % (name, i)
            if not isinstance(doc, dict):
                errors.append("%s: not a mapping" % where)
                continue
            kind = (doc.get("apiVersion"), doc.get("kind"))
            if kind not in KINDS:
                errors.append("%s: unexpected apiVersion/kind %s/%s" % (where, *kind))
                continue
            errors += ["%s (%s): %s" % (where, kind[1], e) for e in schema_errors(doc, KINDS[kind], "")]
    assert not errors, "\n".join(errors)


def test_kubernetes_names_refer_to_what_exists():
    manifests = all_manifests()
    secrets = {d["metadata"]["name"]: d for d in manifests["secret.example.yaml"]
               if d["kind"] == "Secret"}
    errors = []
    relay_docs = manifests["relay.yaml"]
    deployments = [d for d in relay_docs if d["kind"] == "Deployment"]
    services = [d for d in relay_docs if d["kind"] == "Service"]
    assert deployments and services, "relay.yaml needs a Deployment and a Service"
    for dep in deployments:
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            errors.append("Deployment %s: selector %r does not match its template's labels %r"
                          % (dep["metadata"]["name"], selector, labels))
    for svc in services:
        sel = svc["spec"]["selector"]
        targets = [(where, spec) for where, labels, spec in pod_specs(relay_docs)
                   if sel and all(labels.get(k) == v for k, v in sel.items())]
        if not targets:
            errors.append("Service %s: selector %r matches no pod template in relay.yaml"
                          % (svc["metadata"]["name"], sel))
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for where, spec in targets:
                if not any(port_matches(target, c) for c in spec["containers"]):
                    errors.append("Service %s: targetPort %r is no containerPort of %s"
                                  % (svc["metadata"]["name"], target, where))
    for name, docs in manifests.items():
        for where, labels, spec in pod_specs(docs):
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for c in containers_of(spec):
                cw = "%s: %s, container %s" % (name, where, c["name"])
                for m in c.get("volumeMounts", []):
                    if m["name"] not in volumes:
                        errors.append("%s: volumeMount %s names no volume" % (cw, m["name"]))
                for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                    probe = c.get(probe_name)
                    if probe:
                        action = probe.get("tcpSocket") or probe.get("httpGet")
                        if action and not port_matches(action["port"], c):
                            errors.append("%s: %s port %r is not a declared containerPort"
                                          % (cw, probe_name, action["port"]))
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref and (ref["name"] not in secrets or
                                ref["key"] not in secrets[ref["name"]].get("stringData", {})):
                        errors.append("%s: env %s refers to a missing secret key %s/%s"
                                      % (cw, env["name"], ref["name"], ref["key"]))
            for v in volumes.values():
                if "secret" not in v:
                    continue
                secret = secrets.get(v["secret"]["secretName"])
                if secret is None:
                    errors.append("%s: %s: volume %s: no Secret %s in secret.example.yaml"
                                  % (name, where, v["name"], v["secret"]["secretName"]))
                # tether refuses secrets that group or others may read: ask for 0400.
                if v["secret"].get("defaultMode") != 0o400:
                    errors.append("%s: %s: volume %s: defaultMode should be 0400 (tether refuses "
                                  "token files readable by group or others), got %r"
                                  % (name, where, v["name"], v["secret"].get("defaultMode")))
    assert not errors, "\n".join(errors)


def tether_invocation(container):
    """(subcommand, the rest of the words) when the container runs tether, else None."""
    words = container.get("command", []) + container.get("args", [])
    if len(words) >= 2 and os.path.basename(words[0]) == "tether":
        return words[1], words[2:]
    return None


def test_kubernetes_containers_use_real_tether_flags_and_paths(tether_bin):
    errors = []
    runs = set()
    for name, docs in all_manifests().items():
        for where, labels, spec in pod_specs(docs):
            for c in containers_of(spec):
                cw = "%s: %s, container %s" % (name, where, c["name"])
                inv = tether_invocation(c)
                if inv is None:
                    continue
                command, rest = inv
                runs.add(command)
                errors += ["%s: tether %s has no option %s" % (cw, command, f)
                           for f in unknown_flags(tether_bin, command, rest)]
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                errors += ["%s: tether %s reads no %s" % (cw, command, k)
                           for k in env if k.startswith("TETHER_") and k not in help_env(tether_bin, command)]
                # Files tether reads must be in a volume (the image holds only the binary).
                paths = [env.get("TETHER_TOKEN_FILE")] + [
                    rest[i + 1] for i, w in enumerate(rest[:-1])
                    if w in ("--tokens", "--token-file", "--tls-cert", "--tls-key", "--manifest")]
                if c["command"][0] != INSTALLED_BIN:
                    paths.append(c["command"][0])
                errors += ["%s: %s is in no mounted volume" % (cw, p)
                           for p in paths if p and not is_mounted(c, p)]
                if command == "agent" and not (env.get("TETHER_URL") or "--url" in rest):
                    errors.append("%s: the agent has no TETHER_URL or --url" % cw)
                if command == "agent" and not any(k in env for k in ("TETHER_TOKEN_FILE", "TETHER_TOKEN")) \
                        and "--token-file" not in rest:
                    errors.append("%s: the agent has no token" % cw)
                if command == "relay":
                    for flag in ("--listen", "--tokens"):
                        if flag not in rest:
                            errors.append("%s: the relay needs %s" % (cw, flag))
    assert runs == {"agent", "relay"}, \
        "expected containers running tether agent and tether relay, got %r" % runs
    assert not errors, "\n".join(errors)


def test_kubernetes_relay_is_locked_down_and_agent_finds_it():
    manifests = all_manifests()
    errors = []
    for where, labels, spec in pod_specs(manifests["relay.yaml"]):
        pod_sc = spec.get("securityContext", {})
        for c in containers_of(spec):
            sc = c.get("securityContext", {})
            cw = "%s, container %s" % (where, c["name"])
            if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                errors.append("%s: runAsNonRoot is not set" % cw)
            if sc.get("readOnlyRootFilesystem") is not True:
                errors.append("%s: readOnlyRootFilesystem is not true" % cw)
            if sc.get("allowPrivilegeEscalation") is not False:
                errors.append("%s: allowPrivilegeEscalation is not false" % cw)
            res = c.get("resources", {})
            if not res.get("requests") or not res.get("limits", {}).get("memory"):
                errors.append("%s: needs resource requests and a memory limit" % cw)
        for c in spec["containers"]:
            if not (c.get("readinessProbe") and c.get("livenessProbe")):
                errors.append("%s, container %s: needs readiness and liveness probes" % (where, c["name"]))
    # The agent's URL names the relay's Service and one of its ports.
    services = {d["metadata"]["name"]: d for d in manifests["relay.yaml"] if d["kind"] == "Service"}
    for where, labels, spec in pod_specs(manifests["workspace-pod.yaml"]):
        for c in spec["containers"]:
            for e in c.get("env", []):
                if e["name"] != "TETHER_URL":
                    continue
                m = re.match(r"^(?:ws|wss|http|https)://([a-z0-9.-]+):(\d+)/?$", e.get("value", ""))
                host, port = (m.group(1).split(".")[0], int(m.group(2))) if m else (None, None)
                svc = services.get(host)
                if not svc or port not in [p["port"] for p in svc["spec"]["ports"]]:
                    errors.append("%s: TETHER_URL %r is not the relay Service and port"
                                  % (where, e.get("value")))
    assert not errors, "\n".join(errors)


def test_kubernetes_example_secrets_load_in_a_real_relay(tether_bin, tmp_path):
    secrets = {d["metadata"]["name"]: d["stringData"]
               for d in load_manifests("secret.example.yaml")}
    tokens_text = secrets["tether-relay-tokens"]["tokens.json"]
    tokens = json.loads(tokens_text)
    assert isinstance(tokens.get("agents"), dict) and isinstance(tokens.get("users"), dict)
    agent_token = secrets["tether-agent-dev-1"]["token"].strip()
    assert agent_token in tokens["agents"], "the agent Secret's token is not in the relay's agents"
    # The relay's own parser is the judge of the format.
    path = tmp_path / "tokens.json"
    path.write_text(tokens_text)
    path.chmod(0o600)
    relay = subprocess.Popen([str(tether_bin), "relay", "--listen", "127.0.0.1:0", "--tokens",
                              str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = relay.stderr.readline()
        assert "listening" in line, "the relay did not start with the example tokens: %s%s" % (
            line, relay.stderr.read() if relay.poll() is not None else "")
        # Every httpGet probe's path answers 200 with no token, as the kubelet asks.
        port = int(re.search(r":(\d+)", line.split("listening on", 1)[1]).group(1))
        paths = [c[p]["httpGet"]["path"]
                 for d in load_manifests("relay.yaml") if d["kind"] == "Deployment"
                 for c in d["spec"]["template"]["spec"]["containers"]
                 for p in ("readinessProbe", "livenessProbe", "startupProbe")
                 if "httpGet" in c.get(p, {})]
        assert paths, "the relay's probes are not HTTP GETs of its health path"
        for probe_path in paths:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", probe_path)
                r = conn.getresponse()
                r.read()
                assert r.status == 200, "GET %s without a token: HTTP %d" % (probe_path, r.status)
            finally:
                conn.close()
    finally:
        relay.kill()
        relay.wait(timeout=10)
        relay.stderr.close()


# ---------------------------------------------------------------------------------------
# systemd

UNIT = SYSTEMD / "tether-agent.service"
UNIT_KEYS = {
    "Unit": {"Description", "Documentation", "Wants", "After", "Requires", "Before",
             "StartLimitIntervalSec", "StartLimitBurst", "ConditionPathExists"},
    "Service": {"Type", "EnvironmentFile", "Environment", "ExecStart", "ExecStartPre",
                "StateDirectory", "StateDirectoryMode", "User", "Group", "Restart", "RestartSec",
                "RestartPreventExitStatus", "KillMode", "TimeoutStopSec", "WorkingDirectory",
                "LimitNOFILE", "KeyringMode"},
    "Install": {"WantedBy"},
}


def read_unit(path):
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",),
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def systemd_seconds(value):
    total = 0
    for num, unit in re.findall(r"(\d+)\s*(ms|s|min|m|h)?", value):
        total += int(num) * {"ms": 0.001, "s": 1, "": 1, "min": 60, "m": 60, "h": 3600}[unit]
    return total


def test_systemd_unit_passes_systemd_analyze_verify(tether_bin, tmp_path):
    # systemd-analyze verify works offline (systemd need not be PID 1: it is not here), but
    # wants ExecStart's binary to exist, so a copy runs the built one. It exits 0 on unknown
    # keys and bad values, only printing them: any output fails the check.
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed; test_systemd_unit_keys_and_flags still "
                    "checks the unit's keys")
    text = UNIT.read_text()
    assert re.search(r"^ExecStart=%s " % re.escape(INSTALLED_BIN), text, re.M)
    copy = tmp_path / UNIT.name
    copy.write_text(re.sub(r"^ExecStart=%s" % re.escape(INSTALLED_BIN),
                           "ExecStart=%s" % tether_bin, text, flags=re.M))
    r = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True,
                       text=True, timeout=30)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 and not out, "systemd-analyze verify: exit %d\n%s" % (r.returncode, out)


def test_systemd_unit_keys_and_flags(tether_bin):
    unit = read_unit(UNIT)
    errors = []
    for section in unit.sections():
        if section not in UNIT_KEYS:
            errors.append("[%s]: unexpected section" % section)
            continue
        errors += ["[%s] %s: not a key this unit should use" % (section, k)
                   for k in unit[section] if k not in UNIT_KEYS[section]]
    svc = unit["Service"]
    exec_words = svc["ExecStart"].split()
    if exec_words[:2] != [INSTALLED_BIN, "agent"]:
        errors.append("ExecStart should run %s agent: %r" % (INSTALLED_BIN, svc["ExecStart"]))
    errors += ["ExecStart: tether agent has no option %s" % f for f in
               unknown_flags(tether_bin, "agent", [w for w in exec_words[2:] if not w.startswith("$")])]
    if svc.get("Type", "simple") != "simple":
        errors.append("Type=%s: the agent does not speak sd_notify" % svc["Type"])
    if svc.get("KillMode") not in ("mixed", "process"):
        errors.append("KillMode=%s: the agent hangs up its sessions itself after the shutdown "
                      "script; control-group would signal them first" % svc.get("KillMode"))
    stop_needed = help_default_seconds(tether_bin, "agent", "--shutdown-timeout") + 4
    if systemd_seconds(svc.get("TimeoutStopSec", "90s")) < stop_needed:
        errors.append("TimeoutStopSec=%s is shorter than the agent's shutdown (%gs)"
                      % (svc.get("TimeoutStopSec"), stop_needed))
    if svc.get("User", "root") in ("root", "0"):
        errors.append("User= must name a non-root user")
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectSystem"):
        if key in svc:
            errors.append("%s= would apply to the user's sessions too" % key)
    if svc.get("Restart") != "on-failure":
        errors.append("Restart=%s: on-failure, so that the relay's shutdown (exit 0) stays down"
                      % svc.get("Restart"))
    # agent.env.example: the variables the agent reads, and the unit's $TETHER_AGENT_ARGS.
    env_keys = set(re.findall(r"^\s*\$?(\w+)\s*=", re.sub(r"^#\s*(?=\w+=)", "",
                                                          (SYSTEMD / "agent.env.example").read_text(),
                                                          flags=re.M), re.M))
    unit_vars = set(re.findall(r"\$\{?(\w+)", svc["ExecStart"]))
    for key in sorted(env_keys):
        if key not in help_env(tether_bin, "agent") and key not in unit_vars:
            errors.append("agent.env.example: %s is read by neither the agent nor the unit" % key)
    for line in (SYSTEMD / "agent.env.example").read_text().splitlines():
        m = re.match(r"^#?\s*TETHER_AGENT_ARGS=(.*)$", line)
        if m:
            errors += ["agent.env.example: tether agent has no option %s" % f
                       for f in unknown_flags(tether_bin, "agent", m.group(1).split())]
    assert "TETHER_URL" in env_keys and "TETHER_TOKEN_FILE" in env_keys
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------------------------------
# Dockerfiles

DOCKER_INSTRUCTIONS = {"FROM", "RUN", "COPY", "ADD", "USER", "WORKDIR", "ENTRYPOINT", "CMD",
                       "ENV", "ARG", "LABEL", "EXPOSE", "VOLUME", "SHELL", "HEALTHCHECK",
                       "STOPSIGNAL", "ONBUILD"}


def dockerfile_instructions(text):
    """[(line number, INSTRUCTION, arguments)], with backslash continuations joined and
    comment lines (also those inside a continuation) dropped, as BuildKit does."""
    out, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and current is None):
            continue
        if current is None:
            current, start = "", number
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, args = current.strip().partition(" ")
        out.append((start, word.upper(), args.strip()))
        current = None
    assert current is None, "a continuation runs off the end of the file"
    return out


def exec_form(args):
    """The JSON array of an exec-form instruction, or None for shell form."""
    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def copy_destinations(args):
    """(sources, destination, flags) of a COPY."""
    words = args.split()
    flags = [w for w in words if w.startswith("--")]
    rest = [w for w in words if not w.startswith("--")]
    return rest[:-1], rest[-1], flags


def check_dockerfile(path, tether_bin, want_from):
    text = path.read_text()
    instructions = dockerfile_instructions(text)
    errors = []
    names = [i for _, i, _ in instructions]
    errors += ["%s:%d: unknown instruction %s" % (path.name, n, i)
               for n, i, _ in instructions if i not in DOCKER_INSTRUCTIONS]
    if want_from and (not names or names[0] != "FROM"):
        errors.append("%s: does not start with FROM" % path.name)
    if not want_from and "FROM" in names:
        errors.append("%s: a fragment to paste must not have FROM" % path.name)
    copies = [copy_destinations(a) for _, i, a in instructions if i == "COPY"]
    tether_copies = [c for c in copies if c[1] == INSTALLED_BIN]
    if not tether_copies:
        errors.append("%s: no COPY to %s" % (path.name, INSTALLED_BIN))
    for sources, dest, flags in tether_copies:
        if sources != ["tether"] and not any(f.startswith("--from=") for f in flags):
            errors.append("%s: COPY %s takes %r, not the context file tether" % (path.name, dest, sources))
    entrypoints = [(n, a) for n, i, a in instructions if i == "ENTRYPOINT"]
    if len(entrypoints) != 1:
        errors.append("%s: expected one ENTRYPOINT, found %d" % (path.name, len(entrypoints)))
    else:
        n, args = entrypoints[0]
        argv = exec_form(args)
        if argv is None:
            errors.append("%s:%d: ENTRYPOINT is not exec form (distroless has no shell)" % (path.name, n))
        elif argv[:2] != [INSTALLED_BIN, "agent"]:
            errors.append("%s:%d: ENTRYPOINT %r does not run the COPYed %s agent"
                          % (path.name, n, argv, INSTALLED_BIN))
        else:
            errors += ["%s:%d: tether agent has no option %s" % (path.name, n, f)
                       for f in unknown_flags(tether_bin, "agent", argv[2:])]
        users = [a for m, i, a in instructions if i == "USER" and m < n]
        if not users:
            errors.append("%s: no USER before ENTRYPOINT: the agent would run as root" % path.name)
        elif users[-1].split(":")[0] in ("root", "0"):
            errors.append("%s: USER %s is root" % (path.name, users[-1]))
    for n, i, args in instructions:
        if i == "CMD":
            argv = exec_form(args)
            if argv is None:
                errors.append("%s:%d: CMD is not exec form" % (path.name, n))
            else:
                errors += ["%s:%d: tether agent has no option %s" % (path.name, n, f)
                           for f in unknown_flags(tether_bin, "agent", argv)]
        if i in ("ENV", "ARG") and "TETHER_TOKEN" in args:
            errors.append("%s:%d: %s sets a token variable: tokens come at run time, and a "
                          "token file set here would beat TETHER_TOKEN" % (path.name, n, i))
    return instructions, errors


def test_dockerfile_fragment(tether_bin):
    path = DOCKER / "Dockerfile.fragment"
    instructions, errors = check_dockerfile(path, tether_bin, want_from=False)
    # The documented alternative: COPY --from= an image holding the binary, commented out.
    alternatives = [copy_destinations(line.lstrip("# ")[len("COPY "):])
                    for line in path.read_text().splitlines()
                    if re.match(r"^#\s+COPY\s+--from=", line)]
    if not alternatives:
        errors.append("Dockerfile.fragment: no commented COPY --from= alternative")
    for sources, dest, flags in alternatives:
        if dest != INSTALLED_BIN or sources != [INSTALLED_BIN]:
            errors.append("Dockerfile.fragment: COPY --from= alternative copies %r to %s" % (sources, dest))
    assert not errors, "\n".join(errors)


def test_dockerfile_example(tether_bin):
    path = DOCKER / "example" / "Dockerfile"
    instructions, errors = check_dockerfile(path, tether_bin, want_from=True)
    args = {i: a for _, i, a in instructions}  # the last of each
    if args.get("FROM") != "debian:12-slim":
        errors.append("example: FROM %r, expected debian:12-slim" % args.get("FROM"))
    user = args.get("USER", "")
    runs = " ".join(a for _, i, a in instructions if i == "RUN")
    m = re.search(r"useradd\b([^&;|]*)", runs)
    if not m or not re.search(r"\s%s\s*$" % re.escape(user), m.group(1)):
        errors.append("example: no useradd creates USER %r" % user)
    elif "--create-home" not in m.group(1) and " -m" not in m.group(1):
        errors.append("example: useradd makes no home (the agent keeps its host key there)")
    if args.get("WORKDIR") != "/home/%s" % user:
        errors.append("example: WORKDIR %r is not the home of %s" % (args.get("WORKDIR"), user))
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------------------------------
# the devcontainer Feature

FEATURE_KEYS = {"id", "version", "name", "description", "documentationURL", "licenseURL",
                "keywords", "options", "containerEnv", "privileged", "init", "capAdd",
                "securityOpt", "entrypoint", "customizations", "dependsOn", "installsAfter",
                "legacyIds", "deprecated", "mounts"}
OPTION_KEYS = {"type", "default", "description", "proposals", "enum"}
OPTION_TYPES = {"string": str, "boolean": bool}
SCRIPTS = [FEATURE / "install.sh", FEATURE / "entrypoint.sh"]


def feature_json():
    with open(str(FEATURE / "devcontainer-feature.json")) as f:
        return json.load(f)


def option_env_name(option_id):
    """The variable install.sh gets an option in: upper case, other characters as _ (spec)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", option_id).upper()


def test_feature_json():
    feature = feature_json()
    errors = ["unknown top-level key %s" % k for k in feature if k not in FEATURE_KEYS]
    for key in ("id", "version", "name"):
        if not isinstance(feature.get(key), str) or not feature.get(key):
            errors.append("%s: required string missing" % key)
    if feature.get("id") != FEATURE.name:
        errors.append("id %r is not the Feature's folder name %r" % (feature.get("id"), FEATURE.name))
    if feature.get("version") != project_version():
        errors.append("version %r is not meson.build's %r" % (feature.get("version"), project_version()))
    install = (FEATURE / "install.sh").read_text()
    expected = {"url": "", "tokenFile": "/run/secrets/tether-token", "binary": "tether"}
    options = feature.get("options", {})
    if set(options) != set(expected):
        errors.append("options %r, expected %r" % (sorted(options), sorted(expected)))
    for oid, opt in options.items():
        errors += ["options.%s.%s: unknown key" % (oid, k) for k in opt if k not in OPTION_KEYS]
        want = OPTION_TYPES.get(opt.get("type"))
        if want is None:
            errors.append("options.%s.type %r is not string or boolean" % (oid, opt.get("type")))
        elif not isinstance(opt.get("default"), want):
            errors.append("options.%s.default %r is not a %s" % (oid, opt.get("default"), opt["type"]))
        if oid in expected and opt.get("default") != expected[oid]:
            errors.append("options.%s.default %r, expected %r" % (oid, opt.get("default"), expected[oid]))
        if not re.search(r"\$\{?%s\b" % option_env_name(oid), install):
            errors.append("install.sh does not read option %s as $%s" % (oid, option_env_name(oid)))
    if feature.get("entrypoint") != "/usr/local/share/tether/entrypoint.sh":
        errors.append("entrypoint %r" % feature.get("entrypoint"))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_feature_scripts_parse_under_dash_and_busybox(script):
    shells = [["/bin/sh", "-n"], ["dash", "-n"]]
    if shutil.which("busybox"):
        shells.append(["busybox", "sh", "-n"])
    for shell in shells:
        if not shutil.which(shell[0]):
            continue
        r = subprocess.run(shell + [str(script)], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, "%s %s: %s" % (" ".join(shell), script.name, r.stderr)
    assert script.read_text().startswith("#!/bin/sh\n")
    assert os.access(str(script), os.X_OK), "%s is not executable" % script.name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_feature_scripts_pass_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is missing (apt-get install shellcheck)")
        pytest.skip("shellcheck is not installed")
    r = subprocess.run([shellcheck, "-s", "sh", "-S", "style", str(script)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and not r.stdout.strip(), "shellcheck -s sh %s:\n%s%s" % (
        script.name, r.stdout, r.stderr)


def feature_shells():
    shells = [["/bin/sh"]]
    if shutil.which("busybox"):
        shells.append(["busybox", "sh"])
    return shells


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TETHER_", "_REMOTE_", "_CONTAINER_"))
           and k not in ("URL", "TOKENFILE", "BINARY")}
    env.update(extra)
    return env


def processes_of(exe):
    """Pids of the processes running exe (its /proc/PID/exe), zombies aside."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink("/proc/%s/exe" % entry) == str(exe):
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def process_environ(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        return dict(v.decode(errors="replace").partition("=")[::2]
                    for v in f.read().split(b"\0") if v)


def kill_all(exe):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pids = processes_of(exe)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise AssertionError("processes of %s survive SIGKILL: %r" % (exe, processes_of(exe)))


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + what)


def run_entrypoint(shell, entrypoint, command, out_dir, **env):
    """(exit status, stdout, stderr) of the entrypoint. Files, not pipes: the agent it starts
    in the background keeps them open, and a pipe would never see its end."""
    out, err = out_dir / "entrypoint.out", out_dir / "entrypoint.err"
    with open(str(out), "w") as o, open(str(err), "w") as e:
        rc = subprocess.run(shell + [str(entrypoint)] + command, env=clean_env(**env),
                            stdin=subprocess.DEVNULL, stdout=o, stderr=e, timeout=10).returncode
    return rc, out.read_text(), err.read_text()


def run_install(shell, root, **options):
    env = clean_env(TETHER_FEATURE_ROOT=str(root), **options)
    return subprocess.run(shell + [str(FEATURE / "install.sh")], cwd=str(FEATURE), env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("shell", feature_shells(), ids=lambda s: s[0])
def test_feature_install_and_entrypoint_start_the_agent(shell, tether_bin, tmp_path):
    root = tmp_path / "root"
    token = tmp_path / "agent.token"
    token.write_text("feature-test-token\n")
    token.chmod(0o600)
    r = run_install(shell, root, BINARY=str(tether_bin), URL="ws://127.0.0.1:9/",
                    TOKENFILE=str(token))
    assert r.returncode == 0, r.stdout + r.stderr
    installed = root / INSTALLED_BIN.lstrip("/")
    assert stat.S_IMODE(installed.stat().st_mode) == 0o755
    assert filecmp.cmp(str(installed), str(tether_bin), shallow=False)
    entrypoint = root / feature_json()["entrypoint"].lstrip("/")
    assert entrypoint.is_file() and os.access(str(entrypoint), os.X_OK), \
        "install.sh did not write the entrypoint devcontainer-feature.json names"

    try:
        # The container's command runs (exec), and the agent starts beside it, configured.
        rc, out, err = run_entrypoint(shell, entrypoint, ["echo", "hello"], tmp_path,
                                      TETHER_FEATURE_ROOT=str(root))
        assert (rc, out) == (0, "hello\n"), err
        pids = wait_for(lambda: processes_of(installed), 5, "the agent to start")
        assert len(pids) == 1, pids
        with open("/proc/%d/cmdline" % pids[0], "rb") as f:
            assert f.read().split(b"\0")[1] == b"agent"
        env = process_environ(pids[0])
        assert env.get("TETHER_URL") == "ws://127.0.0.1:9/"
        assert env.get("TETHER_TOKEN_FILE") == str(token)
        # Port 9 refuses: the agent keeps retrying rather than exiting.
        time.sleep(0.5)
        assert processes_of(installed) == pids, "the agent exited: %s" % (
            tmp_path / "entrypoint.err").read_text()
        kill_all(installed)

        # TETHER_TOKEN at run time: the agent gets it, the container's command does not.
        rc, out, err = run_entrypoint(shell, entrypoint, ["sh", "-c", 'echo "${TETHER_TOKEN-unset}"'],
                                      tmp_path, TETHER_FEATURE_ROOT=str(root),
                                      TETHER_TOKEN="from-env")
        assert (rc, out) == (0, "unset\n"), out + err
        pids = wait_for(lambda: processes_of(installed), 5, "the agent to start")
        assert "TETHER_TOKEN_FILE" not in process_environ(pids[0]), \
            "a token file from the options would win over TETHER_TOKEN"
        kill_all(installed)

        # Without a URL, only the command runs.
        r = run_install(shell, root, BINARY=str(tether_bin), TOKENFILE=str(token))
        assert r.returncode == 0, r.stderr
        rc, out, err = run_entrypoint(shell, entrypoint, ["echo", "alone"], tmp_path,
                                      TETHER_FEATURE_ROOT=str(root))
        assert (rc, out) == (0, "alone\n"), err
        time.sleep(0.3)
        assert not processes_of(installed) and "started" not in err, "an agent started with no URL"
    finally:
        kill_all(installed)


@pytest.mark.parametrize("shell", feature_shells(), ids=lambda s: s[0])
@pytest.mark.parametrize("case", ["missing-binary", "bad-url", "relative-token-file"])
def test_feature_install_refuses_bad_options_and_writes_nothing(shell, case, tether_bin, tmp_path):
    root = tmp_path / "root"
    missing = tmp_path / "no-such-tether"
    options = {"BINARY": str(tether_bin), "URL": "ws://127.0.0.1:9/"}
    expect = {"missing-binary": str(missing), "bad-url": "url", "relative-token-file": "tokenFile"}[case]
    if case == "missing-binary":
        options["BINARY"] = str(missing)
    elif case == "bad-url":
        options["URL"] = "ftp://relay.example.com"
    else:
        options["TOKENFILE"] = "run/secrets/token"
    r = run_install(shell, root, **options)
    assert r.returncode != 0, "install.sh accepted %s: %s" % (case, r.stdout)
    assert expect in r.stderr, "the error does not name %r: %s" % (expect, r.stderr)
    written = [str(p) for p in root.rglob("*")] if root.exists() else []
    assert not written, "install.sh wrote %r before failing" % written
