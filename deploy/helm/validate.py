#!/usr/bin/env python3
"""Validates the tollgate Helm chart without a cluster and without the helm binary.

    python3 -m venv /tmp/helm-venv
    /tmp/helm-venv/bin/pip install helm-python-sdk jsonschema pyyaml kubernetes-validate
    /tmp/helm-venv/bin/python deploy/helm/validate.py [--tollgate PATH/TO/tollgate]

What it runs, for the default values and each case below:
  1. `helm lint` (Helm's own Go SDK through helm-python-sdk; strict: warnings fail);
  2. values.yaml + the case's values against values.schema.json (python jsonschema, and Helm's
     own schema check);
  3. `helm template` (the same Go engine, offline) and a YAML parse of every document;
  4. every rendered object against the Kubernetes OpenAPI schemas (kubernetes-validate,
     strict: unknown fields fail);
  5. the rendered tollgate.toml parsed as TOML, and with --tollgate, `tollgate check-config` on it
     (the binary's own validation of every key);
  6. the cases that must fail (schema violations) do fail.
Exit 0 when everything passes. With helm installed, the same checks are
`helm lint --strict deploy/helm/tollgate` and `helm template t deploy/helm/tollgate`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parent / "tollgate"
KUBE_VERSION = "1.30.0"


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# Cases rendered on top of values.yaml (name, overrides).
CASES: list[tuple[str, dict]] = [
    ("defaults", {}),
    (
        "redis-secret-no-hpa-no-netpol-ipv6",
        {
            "redis": {"url": "", "existingSecret": "tollgate-redis"},
            "proxy": {"autoscaling": {"enabled": False}, "replicas": 3},
            "networkPolicy": {"enabled": False},
            "listenHost": "::",
            "adminToken": {"existingSecret": "tollgate-admin"},
        },
    ),
    (
        "tls-metrics-extra",
        {
            "ingress": {
                "className": "nginx",
                "tls": [{"secretName": "tollgate-tls", "hosts": ["*.apps.example.com", "mcp.example.com"]}],
            },
            "networkPolicy": {
                "mcpFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
                "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            },
            "payments": {"extra": {"suggested_deposit_usd": "5", "settle_interval_seconds": 120}},
            "extraConfig": '[prices]\ndeploy_usd = "0.10"\n\n[database]\nmax_size_mb = 100\n',
            "control": {"persistence": {"storageClass": "fast-ssd"}},
        },
    ),
]

# Overrides that values.schema.json must refuse.
BAD_CASES: list[tuple[str, dict]] = [
    ("unknown key", {"proxy": {"replica": 2}}),
    ("no redis", {"redis": {"url": "", "existingSecret": ""}}),
    ("bad base domain", {"baseDomain": "Not A Domain"}),
    ("port out of range", {"proxy": {"ports": {"http": 70000}}}),
    ("chart-owned payments key in extra", {"payments": {"extra": {"rpc_url": "http://x"}}}),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tollgate", help="a tollgate binary: run check-config on each rendered tollgate.toml")
    args = ap.parse_args()

    failures: list[str] = []
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    print(f"helm SDK {helm.helm_sdk_version()} (helm-python-sdk / helm-c {helm.helm_c_version()})")

    report = helm.lint(str(CHART), strict=True, kube_version=f"v{KUBE_VERSION}")
    for m in report.get("messages") or []:
        print(f"  lint [{m.get('severity')}] {m.get('path')}: {m.get('error')}")
    if report.get("errors"):
        failures.append(f"helm lint: {report['errors']}")
    print(f"helm lint --strict: {report.get('total_charts_linted')} chart(s), "
          f"{len(report.get('messages') or [])} message(s), errors: {report.get('errors') or 'none'}")

    with helm.Chart.load(str(CHART)) as chart:
        for name, over in CASES:
            values = deep_merge(base, over)
            errs = sorted(jsonschema.Draft7Validator(schema).iter_errors(values), key=str)
            if errs:
                failures.append(f"{name}: schema: {[e.message for e in errs]}")
                continue
            try:
                chart.validate_schema(over)
            except helm.HelmError as e:
                failures.append(f"{name}: helm schema check: {e}")
                continue
            rendered = chart.render(over, name="t", namespace="tollgate", is_install=True)
            kinds = []
            with tempfile.TemporaryDirectory() as tmp:
                for path, text in sorted(rendered.items()):
                    if path.endswith("NOTES.txt"):
                        continue
                    for doc in yaml.safe_load_all(text):
                        if not doc:
                            continue
                        kinds.append(doc["kind"])
                        try:
                            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
                        except kubernetes_validate.ValidationError as e:
                            failures.append(f"{name}: {path} {doc['kind']}: {e.message}")
                        except kubernetes_validate.utils.SchemaNotFoundError as e:
                            failures.append(f"{name}: {path}: no schema: {e}")
                        if doc["kind"] == "ConfigMap":
                            toml_text = doc["data"]["tollgate.toml"]
                            try:
                                tomllib.loads(toml_text)
                            except tomllib.TOMLDecodeError as e:
                                failures.append(f"{name}: tollgate.toml: {e}")
                            if args.tollgate:
                                f = Path(tmp) / f"{name}.toml"
                                f.write_text(toml_text)
                                r = subprocess.run([args.tollgate, "check-config", str(f)],
                                                   capture_output=True, text=True)
                                print(f"  {name}: tollgate check-config rc={r.returncode} "
                                      f"{(r.stdout + r.stderr).strip().splitlines()[:1]}")
                                if r.returncode != 0:
                                    failures.append(f"{name}: check-config: {r.stdout}{r.stderr}")
            print(f"case {name}: rendered {len(kinds)} objects: {', '.join(sorted(kinds))}")

        for name, over in BAD_CASES:
            values = deep_merge(base, over)
            if not list(jsonschema.Draft7Validator(schema).iter_errors(values)):
                failures.append(f"bad case '{name}' passed the schema")
            try:
                chart.validate_schema(over)
                failures.append(f"bad case '{name}' passed Helm's schema check")
            except helm.HelmError:
                pass
        print(f"schema refuses {len(BAD_CASES)} bad value sets: "
              f"{'yes' if not any('bad case' in f for f in failures) else 'NO'}")

    for f in failures:
        print("FAIL", f)
    print("helm chart: " + ("ok" if not failures else f"{len(failures)} failure(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
