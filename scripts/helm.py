#!/usr/bin/env python3
"""Helm, offline, through the Helm v4 SDK of the PyPI wheel helm-python-sdk: lint, render, check values, and
install/upgrade/uninstall against $KUBECONFIG. The tests drive the chart with it; it prints JSON on stdout and
exits non-zero with one line on stderr when Helm refuses.

  helm.py lint CHART [--values JSON]                  the lint report (strict); exit 1 when it has errors
  helm.py render CHART [--values JSON] [--name N] [--namespace NS] [--out-dir DIR]
                                                      [{"template": path, "object": {...}}], one per document;
                                                      with --out-dir, each template's YAML also as a file there
  helm.py check-values CHART --values JSON           exit 1 with values.schema.json's complaint
  helm.py install|upgrade CHART --name N --namespace NS [--values JSON] [--server-side auto|true|false]
                                                      the release (Kubernetes 1.20 cannot server-side apply an
                                                      APIService: its aggregator panics, so pass false there)
  helm.py uninstall --name N --namespace NS
"""
import argparse
import json
import os
import sys

import helm_python as helm
from helm_python import _native
from ruamel.yaml import YAML


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["lint", "render", "check-values", "install", "upgrade", "uninstall"])
    parser.add_argument("chart", nargs="?")
    parser.add_argument("--values", default="{}", help="values as JSON")
    parser.add_argument("--name", default="bitsmith")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--out-dir")
    parser.add_argument("--server-side", choices=["auto", "true", "false"], default="auto")
    args = parser.parse_args()
    values = json.loads(args.values)
    try:
        if args.action == "lint":
            report = helm.lint(args.chart, values, strict=True, namespace=args.namespace)
            print(json.dumps(report))
            return 1 if report["errors"] else 0
        if args.action == "check-values":
            helm.Chart.load(args.chart).validate_schema(values)
            return 0
        if args.action == "render":
            chart = helm.Chart.load(args.chart)
            chart.validate_schema(values)
            rendered = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
            documents = []
            for path, text in sorted(rendered.items()):
                if not path.endswith(".yaml"):
                    continue
                objects = [o for o in YAML(typ="safe").load_all(text) if o]
                documents += [{"template": path, "object": o} for o in objects]
                if args.out_dir and objects:
                    with open(os.path.join(args.out_dir, path.replace("/", "_")), "w") as out:
                        out.write(text)
            notes = rendered.get(f"{chart.name}/templates/NOTES.txt")
            print(json.dumps({"documents": documents, "notes": notes}))
            return 0
        config = helm.Config(kubeconfig_path=os.environ["KUBECONFIG"], namespace=args.namespace)
        if args.action == "uninstall":
            release = config.uninstall(args.name, timeout=120)
        else:
            release = install_or_upgrade(config, args, values)
        print(json.dumps(release, default=str))
        return 0
    except helm.HelmError as error:
        print(f"helm {args.action}: {' '.join(str(error).split())}", file=sys.stderr)
        return 1


def install_or_upgrade(config: helm.Config, args: argparse.Namespace, values: dict) -> dict:
    """Config.install/upgrade, plus the server-side apply switch their Python signatures leave out (the C ABI
    takes it: a bool for install, "auto"/"true"/"false" for upgrade)."""
    options = {"namespace": args.namespace, "timeout_seconds": 120}
    if args.action == "install":
        options["create_namespace"] = True
        if args.server_side != "auto":
            options["server_side_apply"] = args.server_side == "true"
    else:
        options["server_side_apply"] = args.server_side
    payload = _native.call_string(
        f"helm_{args.action}",
        config._raw(),
        config._context_arg(None),
        _native.HANDLE(0),
        args.chart,
        args.name,
        json.dumps(values),
        json.dumps(options),
    )
    return json.loads(payload)


if __name__ == "__main__":
    sys.exit(main())
