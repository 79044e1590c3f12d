#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests offline (deploy/check.sh runs it).

Usage: validate_k8s.py [--version V]... [--external-secret NAME]... [--external-configmap NAME]...
                       FILE...

Each FILE is a YAML stream (what `kubectl kustomize` prints). Every object must:
- be of a kind whose schema kubernetes-validate bundles, and valid for it in strict mode
  (unknown fields, wrong types and missing required fields are errors) at every --version;
- have a unique kind/namespace/name.
And across the objects of one FILE:
- every PersistentVolumeClaim and ConfigMap a pod mounts exists;
- every Secret a pod mounts exists or is named with --external-secret (made by hand);
- a StatefulSet's serviceName is a headless Service, and every Service's selector matches
  the pods of some workload;
- probes name container ports that exist;
- every pod runs as non-root (runAsNonRoot in its pod or container security context).
Prints one line per problem and exits 1 when there is any.
"""

import argparse
import sys

import kubernetes_validate
import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def pod_spec(obj):
    """The pod template's spec of a workload (None for other kinds)."""
    if obj.get("kind") == "Pod":
        return obj.get("spec") or {}
    if obj.get("kind") in WORKLOADS:
        return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    if obj.get("kind") == "CronJob":
        job = ((obj.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}
        return (job.get("template") or {}).get("spec") or {}
    return None


def pod_labels(obj):
    if obj.get("kind") == "Pod":
        return (obj.get("metadata") or {}).get("labels") or {}
    template = (obj.get("spec") or {}).get("template") or {}
    return (template.get("metadata") or {}).get("labels") or {}


def name_of(obj):
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace", "")
    return f"{obj.get('kind')}/{ns + '/' if ns else ''}{meta.get('name')}"


def check_file(path, versions, external_secrets, external_configmaps=()):
    problems = []
    with open(path, encoding="utf-8") as f:
        try:
            objects = [o for o in yaml.safe_load_all(f) if o is not None]
        except yaml.YAMLError as e:
            return [f"{path}: not YAML: {e}"]
    if not objects:
        return [f"{path}: no objects"]

    seen = set()
    for obj in objects:
        if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
            problems.append(f"{path}: an object without kind/apiVersion: {str(obj)[:80]}")
            continue
        key = name_of(obj)
        if key in seen:
            problems.append(f"{path}: {key} is defined twice")
        seen.add(key)
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(
                    f"{path}: {key}: no schema for {obj['apiVersion']} {obj['kind']} "
                    f"in Kubernetes {version} (misspelt kind or apiVersion?)"
                )
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path) or "(top level)"
                problems.append(f"{path}: {key} (Kubernetes {version}): {where}: {e.message}")

    def names(kind):
        return {
            (o.get("metadata") or {}).get("name")
            for o in objects
            if isinstance(o, dict) and o.get("kind") == kind
        }

    pvcs, configmaps, secrets = (
        names("PersistentVolumeClaim"),
        names("ConfigMap") | set(external_configmaps),
        names("Secret") | set(external_secrets),
    )
    headless = {
        (o.get("metadata") or {}).get("name")
        for o in objects
        if isinstance(o, dict)
        and o.get("kind") == "Service"
        and (o.get("spec") or {}).get("clusterIP") == "None"
    }
    pods = [(o, pod_spec(o)) for o in objects if isinstance(o, dict) and pod_spec(o) is not None]

    for obj, spec in pods:
        key = name_of(obj)
        claim_templates = {
            (t.get("metadata") or {}).get("name")
            for t in (obj.get("spec") or {}).get("volumeClaimTemplates") or []
        }
        volumes = {v.get("name") for v in spec.get("volumes") or []} | claim_templates
        for v in spec.get("volumes") or []:
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim is not None and claim not in pvcs:
                problems.append(f"{path}: {key}: volume {v['name']}: no PersistentVolumeClaim {claim}")
            cm = (v.get("configMap") or {}).get("name")
            if cm is not None and cm not in configmaps:
                problems.append(f"{path}: {key}: volume {v['name']}: no ConfigMap {cm}")
            secret = (v.get("secret") or {}).get("secretName")
            if secret is not None and secret not in secrets:
                problems.append(
                    f"{path}: {key}: volume {v['name']}: no Secret {secret} "
                    "(neither in the manifests nor made by hand: --external-secret)"
                )
        pod_non_root = (spec.get("securityContext") or {}).get("runAsNonRoot") is True
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            cname = f"{key}: container {c.get('name')}"
            if not pod_non_root and (c.get("securityContext") or {}).get("runAsNonRoot") is not True:
                problems.append(f"{path}: {cname}: runAsNonRoot is not set")
            for m in c.get("volumeMounts") or []:
                if m.get("name") not in volumes:
                    problems.append(f"{path}: {cname}: mounts volume {m.get('name')}, which the pod lacks")
            ports = {p.get("name") for p in c.get("ports") or []} | {
                p.get("containerPort") for p in c.get("ports") or []
            }
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(probe_name) or {}
                for how in ("httpGet", "tcpSocket", "grpc"):
                    port = (probe.get(how) or {}).get("port")
                    if port is not None and port not in ports:
                        problems.append(f"{path}: {cname}: {probe_name} uses port {port}, not one of its ports")
        if obj.get("kind") == "StatefulSet":
            service = (obj.get("spec") or {}).get("serviceName")
            if service not in headless:
                problems.append(f"{path}: {key}: serviceName {service} is not a headless Service here")

    for svc in objects:
        if not isinstance(svc, dict) or svc.get("kind") != "Service":
            continue
        selector = (svc.get("spec") or {}).get("selector") or {}
        if selector and not any(
            all(pod_labels(o).get(k) == v for k, v in selector.items()) for o, _ in pods
        ):
            problems.append(f"{path}: {name_of(svc)}: its selector {selector} matches no pods")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="append", dest="versions")
    parser.add_argument("--external-secret", action="append", default=[])
    parser.add_argument("--external-configmap", action="append", default=[])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    versions = args.versions or [kubernetes_validate.latest_version()]
    problems = []
    for path in args.files:
        found = check_file(path, versions, args.external_secret, args.external_configmap)
        problems += found
        if not found:
            with open(path, encoding="utf-8") as f:
                count = sum(1 for o in yaml.safe_load_all(f) if o is not None)
            print(f"{path}: {count} objects valid (Kubernetes {', '.join(versions)})")
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
